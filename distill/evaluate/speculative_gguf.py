"""Speculative decoding in llama.cpp (`distill bench --draft D.gguf --teacher T.gguf`): the figures of
evaluate/speculative.py for a teacher and a draft that are both GGUF files.

llama-cpp-python runs a draft through its `draft_model` hook: after each accepted run the hook proposes
tokens, the teacher evaluates them in one batch (one forward pass over all of them) and keeps the leading
ones its own greedy choice agrees with. The hook here is a second llama.cpp model decoding greedily, its KV
cache reused across calls (llama-cpp-python matches the longest common prefix). Acceptance is counted as in
speculative.py, from one draft pass over each prompt + the teacher's output; speed is the teacher alone
against the teacher with the draft, and the outputs must be identical.
"""
from __future__ import annotations

import time

import numpy as np

from distill.evaluate.acceptance import acceptance_stats, check_identical, counted
from distill.models.llamacpp import load_gguf


def _draft_model_class():
    from llama_cpp.llama_speculative import LlamaDraftModel

    class GreedyDraft(LlamaDraftModel):
        """The draft llama.cpp model proposing `gamma` greedy tokens after the teacher's context."""

        def __init__(self, llm, gamma: int):
            self.llm, self.gamma = llm, gamma

        def __call__(self, input_ids, **kwargs):
            out = []
            for t in self.llm.generate(list(input_ids), temp=0.0, top_k=1, reset=True):
                out.append(t)
                if len(out) >= self.gamma:
                    break
            return np.array(out, dtype=np.intc)

    return GreedyDraft


def load(path: str, n_ctx: int, threads: int | None = None, draft=None, logits_all: bool = False):
    """A model for decoding (the last position's logits only, unless asked), with a draft when given."""
    threads_kw = {"n_threads": threads} if threads else {}
    return load_gguf(path, n_ctx, logits_all=logits_all, draft_model=draft, **threads_kw)


def greedy(llm, prompt: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """One greedy response, the stop token kept (as speculative.greedy_one keeps it)."""
    out = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(int(t))
        if t in stops or len(out) >= max_new_tokens:
            break
    return out


def timed(llm, prompts, max_new_tokens: int, stops: set[int]) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    outputs = [greedy(llm, p, max_new_tokens, stops) for p in prompts]
    return outputs, time.perf_counter() - start


def draft_matches(llm, prompts, outputs) -> list[list[bool]]:
    """match[t]: whether the draft's greedy token after prompt + output[:t] is output[t], from one evaluation
    of each whole sequence (a model loaded with logits_all)."""
    result = []
    for p, o in zip(prompts, outputs):
        llm.reset()
        llm.eval(p + o)
        best = np.asarray(llm.scores[len(p) - 1:len(p) - 1 + len(o)]).argmax(-1)
        result.append([int(g) == t for g, t in zip(best, o)])
    return result


def size(llm) -> dict:
    return {"parameters": int(llm._model.n_params()),
            "layers": int(llm.metadata.get(f"{llm.metadata.get('general.architecture', 'llama')}.block_count", 0))
            or None}


def gguf_figures(teacher_path: str, draft_path: str, prompts: list[list[int]], max_new_tokens: int,
                 stop_ids: list[int], gammas, threads: int | None = None) -> dict:
    """The report of speculative.speculative_figures, through llama.cpp."""
    n_ctx = max(len(p) for p in prompts) + max_new_tokens + max(gammas) + 8
    stops = set(stop_ids)
    alone_llm = load(teacher_path, n_ctx, threads)
    timed(alone_llm, prompts[:1], max_new_tokens, stops)
    alone, alone_s = timed(alone_llm, prompts, max_new_tokens, stops)
    t_size = size(alone_llm)
    del alone_llm
    scorer = load(draft_path, n_ctx, threads, logits_all=True)
    matches = draft_matches(scorer, prompts, alone)
    d_size = size(scorer)
    del scorer
    draft = _draft_model_class()(load(draft_path, n_ctx, threads), gammas[0])
    assisted_llm = load(teacher_path, n_ctx, threads, draft=draft, logits_all=True)
    tokens = sum(len(o) for o in alone)
    rows = []
    for g in gammas:
        draft.gamma = g
        timed(assisted_llm, prompts[:1], max_new_tokens, stops)
        assisted, seconds = timed(assisted_llm, prompts, max_new_tokens, stops)
        check_identical(alone, assisted, g)
        rows.append({**acceptance_stats(matches, g), "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
                     "speedup": alone_s / max(seconds, 1e-9), "outputs_identical": True})
    best = max(rows, key=lambda r: r["tokens_per_s"])
    return {"n": len(prompts), "tokens": tokens, "runtime": "llama.cpp", "device": "cpu",
            "teacher_size": t_size, "draft_size": d_size,
            "alone": {"seconds": alone_s, "tokens_per_s": tokens / max(alone_s, 1e-9)},
            "gammas": rows, "best_gamma": best["gamma"], "best_speedup": best["speedup"],
            "acceptance": {g: acceptance_stats(matches, g) for g in counted(gammas)}, "outputs": alone}
