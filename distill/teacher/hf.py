"""The transformers backend: a plain forward pass, no serving engine (fastest for small models on CPU)."""
from __future__ import annotations

import torch

from ..models import load_causal_lm
from ..scoring import label_logprobs


class HFTeacher:
    name = "transformers"

    def __init__(self, model_path: str, dtype: str = "bfloat16"):
        self.model = load_causal_lm(model_path, dtype).eval()
        self.pad_id = 0

    @torch.no_grad()
    def label_logprobs(self, prompts, label_ids) -> torch.Tensor:
        return label_logprobs(self.model, prompts, label_ids, self.pad_id).float().cpu()

    @torch.no_grad()
    def topk(self, seqs, positions, k):
        out = []
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
        logits = self.model(input_ids=ids, attention_mask=att).logits
        for i, pos in enumerate(positions):
            pred = torch.as_tensor(pos, dtype=torch.long) - 1  # logits at t-1 predict token t
            logp = torch.log_softmax(logits[i, pred].float(), dim=-1)
            vals, idx = logp.topk(k, dim=-1)
            tail = (1.0 - vals.exp().sum(-1)).clamp_min(0.0)
            out.append((idx, vals, tail))
        return out

    def close(self):
        del self.model
