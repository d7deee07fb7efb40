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
    """Left-pad prompts so every row shares one layout: [pad | prompt | answer 1 | answer 2 | ...].

    Returns input ids, a boolean [B, S, S] "may attend" matrix, position ids, the positions whose
    logits predict answer tokens (one list for all rows), the answer tokens, and which label each
    answer token belongs to.
    """
    P = max(len(p) for p in prompts)
    lab_total = sum(len(x) for x in label_ids)
    S = P + lab_total
    B = len(prompts)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    positions = torch.zeros((B, S), dtype=torch.long)
    allowed = torch.zeros((B, S, S), dtype=torch.bool)
    causal = torch.ones((S, S), dtype=torch.bool).tril()
    answers = torch.tensor([t for lab in label_ids for t in lab], dtype=torch.long)
    owner = torch.tensor([j for j, lab in enumerate(label_ids) for _ in lab], dtype=torch.long)
    pred_pos, cur = [], P
    for lab in label_ids:
        pred_pos += [P - 1] + list(range(cur, cur + len(lab) - 1))
        cur += len(lab)
    input_ids[:, P:] = answers
    for b, p in enumerate(prompts):
        start = P - len(p)
        input_ids[b, start:P] = torch.tensor(p)
        positions[b, start:P] = torch.arange(len(p))
        allowed[b, start:P, start:P] = causal[: len(p), : len(p)]
        for i in range(start):  # padding attends to itself only (keeps softmax finite)
            allowed[b, i, i] = True
        cur = P
        for lab in label_ids:
            L = len(lab)
            positions[b, cur:cur + L] = torch.arange(len(p), len(p) + L)
            allowed[b, cur:cur + L, start:P] = True
            allowed[b, cur:cur + L, cur:cur + L] = causal[:L, :L]
            cur += L
    return input_ids, allowed, positions, torch.tensor(pred_pos), answers, owner


def label_logprobs(model, prompts, label_ids, pad_id: int) -> torch.Tensor:
    """[B, n_labels] log-probabilities of each full label answer given each prompt (differentiable).

    Goes through the model's own forward (so DDP, DeepSpeed and PEFT wrappers see the call), asking
    for logits only at the answer-predicting positions via `logits_to_keep`.
    """
    input_ids, allowed, positions, pred_pos, answers, owner = pack_batch(prompts, label_ids, pad_id)
    param = next(model.parameters())
    device = param.device
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    logits = model(input_ids=input_ids.to(device), attention_mask=mask[:, None].to(device),
                   position_ids=positions.to(device), logits_to_keep=pred_pos.to(device), use_cache=False).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok_lp = logp.gather(-1, answers.to(device).expand(len(prompts), -1)[..., None]).squeeze(-1)
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


def target_logits(model, seqs, positions, pad_id: int) -> torch.Tensor:
    """Logits that predict each target token: row r is the output at position t-1 for target t.

    seqs: token id sequences; positions: for each sequence, the target positions t (t >= 1).
    Sequences are right-padded into one batch; through the model's own forward (so DDP, DeepSpeed
    and PEFT wrappers see the call), with `logits_to_keep` limited to the positions some row needs,
    so the vocabulary-sized output layer runs only where a target is predicted. Returns [N, V],
    the rows in order of sequence then target.
    """
    B, W = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, W), pad_id, dtype=torch.long)
    att = torch.zeros((B, W), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        att[b, : len(s)] = 1
    pred = [torch.as_tensor(p, dtype=torch.long) - 1 for p in positions]
    if any(len(p) and int(p.min()) < 0 for p in pred):
        raise ValueError("target position 0 has no preceding token to predict it from")
    keep = torch.unique(torch.cat(pred))  # sorted
    col = torch.searchsorted(keep, torch.cat(pred))
    row = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(pred)])
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=att.to(device), logits_to_keep=keep.to(device),
                   use_cache=False).logits
    return logits[row.to(device), col.to(device)]
