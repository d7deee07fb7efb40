"""The transformers backend: a plain forward pass, no serving engine (fastest for small models on CPU)."""
from __future__ import annotations

import torch

from distill.models.loading import load_causal_lm
from distill.models.scoring import label_logprobs, target_logits
from distill.teacher.common import Generated, Sampling, tail_mass


class HFTeacher:
    name = "transformers"

    def __init__(self, model_path: str, dtype: str = "bfloat16", vocab_limit: int | None = None):
        # on a CUDA GPU when there is one: a GPU machine without vLLM still scores there, not on its CPU
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_path, dtype).to(device).eval()
        self.pad_id = 0
        rows = self.model.get_output_embeddings().weight.shape[0]
        # padded embedding rows (rows >= the tokenizer's size) never enter a top-k row nor a response
        self.vocab_limit = min(vocab_limit or rows, rows)

    @torch.no_grad()
    def label_logprobs(self, prompts, label_ids) -> torch.Tensor:
        return label_logprobs(self.model, prompts, label_ids, self.pad_id).float().cpu()

    def _rows(self, logits):
        """Logits [n, V] -> top k among real tokens of the full-softmax log-probabilities."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        if self.vocab_limit < logp.shape[-1]:
            logp = logp[..., : self.vocab_limit]
        return logp

    @torch.no_grad()
    def topk(self, seqs, positions, k):
        """The output layer runs only at the positions that predict a target, and the prompt prefix every
        sequence shares runs once (scoring.target_logits)."""
        logp = self._rows(target_logits(self.model, seqs, positions, self.pad_id))
        vals, idx = (t.cpu() for t in logp.topk(k, dim=-1))
        sizes = [len(p) for p in positions]
        return [(i, v, tail_mass(v)) for i, v in zip(idx.split(sizes), vals.split(sizes))]

    @torch.no_grad()
    def generate_topk(self, prompts, k, sampling: Sampling, seeds) -> list[Generated]:
        """Sample responses for a batch of prompts; the top k of the raw (T = 1) distribution at each
        response token comes from the same pass. One generator per batch, seeded by its first seed."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p)
            att[i, width - len(p):] = 1
        rows = self.model.get_output_embeddings().weight.shape[0]
        kwargs = {}
        if self.vocab_limit < rows:
            kwargs["suppress_tokens"] = list(range(self.vocab_limit, rows))
        greedy = sampling.temperature <= 0
        torch.manual_seed(int(seeds[0]) if len(seeds) else sampling.seed)
        out = self.model.generate(
            input_ids=ids.to(self.model.device), attention_mask=att.to(self.model.device),
            max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
            top_k=0, min_p=None, repetition_penalty=None, eos_token_id=list(sampling.stop_ids) or None,
            pad_token_id=self.pad_id,
            output_logits=True, return_dict_in_generate=True, **kwargs)
        new = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, dim=1)  # [B, steps, V], raw: before temperature / top-p (on its device)
        stops = set(sampling.stop_ids)
        res = []
        for b in range(len(prompts)):
            toks = new[b].tolist()
            n = len(toks)
            for j, t in enumerate(toks):
                if t in stops:
                    n = j + 1
                    break
            vals, idx = (t.cpu() for t in self._rows(logits[b, :n]).topk(k, dim=-1))  # only the top k leave the device
            res.append(Generated(toks[:n], idx, vals, tail_mass(vals)))
        return res

    def close(self):
        del self.model
