"""Greedy decoding of holdout prompts, the same way for every runtime: a model directory through a teacher
backend (transformers, the vLLM engine, vLLM servers: whatever writes the teacher's responses writes a
student's too), a `.gguf` through llama.cpp (many sequences in one batch, a finished one's slot taking the next
prompt). Evaluation and bench score what this returns.

Greedy decoding ends a response at its first stop token (kept out of the returned text) or after
`max_new_tokens`; a backend decodes prompts in batches of similar length; all are returned in their own order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from distill.teacher.common import Sampling


class ResponseWriter(Protocol):
    """What decoding needs of a backend: `generate_topk` as every teacher backend has it."""

    def generate_topk(self, prompts, k, sampling: Sampling, seeds): ...


@dataclass
class Decoded:
    """Greedy responses (token ids, stop token removed) and the tokens decoded, for a throughput figure."""

    responses: list[list[int]]
    new_tokens: int
    seconds: float


def _strip_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for j, t in enumerate(tokens):
        if t in stops:
            return tokens[:j]
    return tokens


def greedy_backend(engine: ResponseWriter, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                   batch_size: int = 16, desc: str | None = None) -> Decoded:
    """Greedy responses of a teacher backend to `prompts`, batched by prompt length (less padding)."""
    import time

    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=0, stop_ids=list(stop_ids))
    if getattr(engine, "name", None) == "vllm":  # its scheduler batches continuously: give it every prompt at once
        batch_size = max(batch_size, len(prompts))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    new_tokens, start = 0, time.perf_counter()
    with tqdm(total=len(prompts), desc=desc or "decoding", unit="response", disable=desc is None) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            written = engine.generate_topk([prompts[i] for i in idx], 1, sampling, [0] * len(idx))
            for i, g in zip(idx, written):
                new_tokens += len(g.response)
                out[i] = _strip_stop(list(g.response), set(stop_ids))
            bar.update(len(idx))
    return Decoded(out, new_tokens, time.perf_counter() - start)


def load_gguf_for_decoding(path: str | Path, n_ctx: int = 1024, parallel: int = 16, n_threads: int | None = None):
    """A llama.cpp model for greedy decoding of `parallel` prompts at once, each with `n_ctx` positions
    (prompt and response); `parallel` 1 decodes one prompt at a time, for latency."""
    from distill.models.llamacpp_batch import BatchedLlama

    return BatchedLlama(path, n_ctx, parallel, n_threads)


def greedy_gguf(gguf, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], n_ctx: int = 1024,
                desc: str | None = None, parallel: int = 16) -> Decoded:
    """Greedy responses of a GGUF model (a path, or a model from `load_gguf_for_decoding`, which brings its own
    `parallel`) through llama.cpp, many prompts in one batch, so each step reads the weights once for all of
    them (models/llamacpp_batch.py)."""
    import time

    llm = load_gguf_for_decoding(gguf, n_ctx, parallel) if isinstance(gguf, (str, Path)) else gguf
    start = time.perf_counter()
    try:
        with tqdm(total=len(prompts), desc=desc or "decoding", unit="response", disable=desc is None) as bar:
            written = llm.greedy(prompts, max_new_tokens, stop_ids, on_done=lambda i: bar.update(1))
    finally:
        if llm is not gguf:
            llm.close()
    stops = set(stop_ids)
    return Decoded([_strip_stop(t, stops) for t in written], sum(map(len, written)), time.perf_counter() - start)
