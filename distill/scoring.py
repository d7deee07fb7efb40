"""Scoring every label of a classification example in one forward pass.

The prompt is followed by all label answers packed into one sequence; a 4-D attention mask lets each
answer token see the prompt and the earlier tokens of its own answer only, and position ids restart
after the prompt for each answer. The cost is prompt + the sum of answer lengths, not the product of
prompt length and label count, and the result equals scoring each answer separately.
Only the positions that predict answer tokens go through the (vocabulary-sized) output layer.
"""
from __future__ import annotations

import torch


def pack_batch(prompts: list[list[int]], label_ids: list[list[int]], pad_id: int):
    """Build input ids, 4-D masks, positions, and the (row, position, target) of every answer token."""
    lab_total = sum(len(x) for x in label_ids)
    seq_len = max(len(p) for p in prompts) + lab_total
    B = len(prompts)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    positions = torch.zeros((B, seq_len), dtype=torch.long)
    allowed = torch.zeros((B, seq_len, seq_len), dtype=torch.bool)
    pred_pos = torch.zeros((B, lab_total), dtype=torch.long)  # where the logits for each answer token are
    targets = torch.tensor([t for lab in label_ids for t in lab], dtype=torch.long).expand(B, -1)
    owner = torch.tensor([j for j, lab in enumerate(label_ids) for _ in lab], dtype=torch.long)
    causal = torch.ones((seq_len, seq_len), dtype=torch.bool).tril()
    for b, p in enumerate(prompts):
        P = len(p)
        input_ids[b, :P] = torch.tensor(p)
        positions[b, :P] = torch.arange(P)
        allowed[b, :P, :P] = causal[:P, :P]
        cur, k = P, 0
        for lab in label_ids:
            L = len(lab)
            input_ids[b, cur:cur + L] = torch.tensor(lab)
            positions[b, cur:cur + L] = torch.arange(P, P + L)
            allowed[b, cur:cur + L, :P] = True
            allowed[b, cur:cur + L, cur:cur + L] = causal[:L, :L]
            pred_pos[b, k] = P - 1
            pred_pos[b, k + 1:k + L] = torch.arange(cur, cur + L - 1)
            cur += L
            k += L
        for i in range(cur, seq_len):  # padding attends to itself only (keeps softmax finite)
            allowed[b, i, i] = True
    return input_ids, allowed, positions, pred_pos, targets, owner


def _backbone_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def label_logprobs(model, prompts, label_ids, pad_id: int) -> torch.Tensor:
    """[B, n_labels] log-probabilities of each full label answer given each prompt (differentiable)."""
    input_ids, allowed, positions, pred_pos, targets, owner = pack_batch(prompts, label_ids, pad_id)
    device = next(model.parameters()).device
    decoder, head = _backbone_and_head(model)
    dtype = head.weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    hidden = decoder(input_ids=input_ids.to(device), attention_mask=mask[:, None].to(device),
                     position_ids=positions.to(device)).last_hidden_state
    picked = hidden.gather(1, pred_pos.to(device)[..., None].expand(-1, -1, hidden.shape[-1]))
    logp = torch.log_softmax(head(picked).float(), dim=-1)
    tok_lp = logp.gather(-1, targets.to(device)[..., None]).squeeze(-1)  # [B, lab_total]
    out = torch.zeros((len(prompts), len(label_ids)), dtype=tok_lp.dtype, device=device)
    return out.index_add(1, owner.to(device), tok_lp)


@torch.no_grad()
def label_logprobs_reference(model, prompt, label_ids) -> torch.Tensor:
    """Slow reference: score each label with its own plain forward pass."""
    scores = []
    for lab in label_ids:
        ids = torch.tensor([prompt + lab])
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
        P = len(prompt)
        scores.append(sum(logp[P - 1 + t, lab[t]].item() for t in range(len(lab))))
    return torch.tensor(scores)
