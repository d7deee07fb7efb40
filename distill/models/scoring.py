"""Scoring every label of a classification example in one forward pass over a prefix tree.

The label answers' token ids form a prefix tree (trie); its nodes are laid out once after the
prompt, so an answer prefix that several labels share (the chat template's tokens, a common first
word) is fed once. A 4-D attention mask lets each node see the prompt and its own ancestors only,
and a node's position id is the prompt length plus its depth, so every answer token sees exactly
what it would see in a plain pass over prompt + answer: the result equals scoring each answer
separately. A token's log-probability is read at its parent node's position (the first token's at
the last prompt position), so a leaf (an answer's last token, unless another answer goes on from
it) is never fed, and only the fed positions go through the vocabulary-sized output layer.
Cost: prompt + inner trie nodes, not prompt x labels nor prompt + all answer tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class TrieLayout:
    """The label answers' prefix tree, as fed after a (left-padded) prompt of width P.

    Only inner nodes (those with children) are fed: inner node r sits at position P + r, parents
    before children. A leaf's token predicts nothing, so it is only read, never fed. Every fed
    position, and the last prompt token, predicts some node: logits are kept at the last F + 1
    positions, and `col[i]` is the one that predicts node i (0: the last prompt token, 1 + r: inner node r).
    The `pair_*` tensors list every answer token as (label, node), for summing a label's path.
    """

    tokens: torch.Tensor      # [N] every node's token id
    col: torch.Tensor         # [N]
    fed_tokens: torch.Tensor  # [F] the inner nodes' token ids, in feeding order
    fed_depth: torch.Tensor   # [F] 0 for an answer's first token
    ancestors: torch.Tensor   # [F, F] bool: inner node r may attend inner node q (q is r or one of its ancestors)
    pair_label: torch.Tensor  # [T]
    pair_node: torch.Tensor   # [T]

    @property
    def n_nodes(self) -> int:
        return len(self.tokens)

    @property
    def n_fed(self) -> int:
        return len(self.fed_tokens)


def trie_layout(label_ids) -> TrieLayout:
    """The prefix tree of `label_ids` (one token id list per label); cached, as callers pass the same
    labels every batch."""
    return _trie_layout(tuple(tuple(int(t) for t in lab) for lab in label_ids))


def _build_trie(label_ids):
    """Nodes in creation order (each parent before its children) and each label's path through them."""
    children: dict[tuple[int, int], int] = {}  # (parent node or -1, token) -> node
    tokens, parent, depth, paths = [], [], [], []
    for j, lab in enumerate(label_ids):
        if not lab:
            raise ValueError(f"label {j} has an empty answer (no token ids); cannot score it")
        node, path = -1, []
        for d, t in enumerate(lab):
            if (node, t) not in children:
                children[(node, t)] = len(tokens)
                tokens.append(t)
                parent.append(node)
                depth.append(d)
            node = children[(node, t)]
            path.append(node)
        paths.append(path)
    return tokens, parent, depth, paths


@lru_cache(maxsize=16)
def _trie_layout(label_ids: tuple[tuple[int, ...], ...]) -> TrieLayout:
    tokens, parent, depth, paths = _build_trie(label_ids)
    fed = sorted({p for p in parent if p >= 0})
    rank = {node: r for r, node in enumerate(fed)}
    ancestors = torch.zeros((len(fed), len(fed)), dtype=torch.bool)
    for r, node in enumerate(fed):
        if parent[node] >= 0:
            ancestors[r] = ancestors[rank[parent[node]]]
        ancestors[r, r] = True
    pairs = [(j, node) for j, path in enumerate(paths) for node in path]
    return TrieLayout(_long(tokens), _long([0 if p < 0 else 1 + rank[p] for p in parent]),
                      _long([tokens[n] for n in fed]), _long([depth[n] for n in fed]), ancestors,
                      _long([j for j, _ in pairs]), _long([n for _, n in pairs]))


def _long(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def trie_batch(prompts: list[list[int]], layout: TrieLayout, pad_id: int):
    """Left-pad prompts so every row shares one layout: [pad | prompt | inner trie nodes].

    Returns input ids [B, S] (S = P + F), a boolean [B, S, S] "may attend" matrix and position ids [B, S].
    """
    B, P = len(prompts), max(len(p) for p in prompts)
    S = P + layout.n_fed
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    start = P - lens
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, P - len(p):P] = torch.as_tensor(p, dtype=torch.long)
    input_ids[:, P:] = layout.fed_tokens
    idx = torch.arange(S)
    positions = (idx[None, :P] - start[:, None]).clamp(min=0)  # padding at position 0
    positions = torch.cat([positions, lens[:, None] + layout.fed_depth[None]], dim=1)
    in_prompt = (idx[None] >= start[:, None]) & (idx[None] < P)
    allowed = in_prompt[:, None, :] & torch.ones((S, S), dtype=torch.bool).tril()[None]
    allowed[:, P:, P:] = layout.ancestors
    allowed[:, idx, idx] = True  # padding attends to itself only (keeps softmax finite)
    return input_ids, allowed, positions


def label_logprobs(model, prompts, label_ids, pad_id: int) -> torch.Tensor:
    """[B, n_labels] log-probabilities of each full label answer given each prompt (differentiable).

    Goes through the model's own forward (so DDP, DeepSpeed and PEFT wrappers see the call), asking
    for logits via `logits_to_keep` only at the positions that predict answer tokens, each once.
    """
    layout = trie_layout(label_ids)
    param = next(model.parameters())
    device = param.device
    c, cache = shared_prefix(model, prompts, min(len(q) for q in prompts) - 1, device)
    input_ids, allowed, positions = trie_batch([q[c:] for q in prompts], layout, pad_id)
    if c:  # every row sees the shared prefix, at positions 0..c-1
        allowed = torch.cat([torch.ones(allowed.shape[:2] + (c,), dtype=torch.bool), allowed], 2)
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    logits = model(input_ids=input_ids.to(device), attention_mask=mask[:, None].to(device),
                   position_ids=(positions + c).to(device), logits_to_keep=layout.n_fed + 1,
                   past_key_values=cache, use_cache=cache is not None).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    node_lp = logp[:, layout.col.to(device), layout.tokens.to(device)]  # [B, N]
    out = torch.zeros((len(prompts), len(label_ids)), dtype=node_lp.dtype, device=device)
    return out.index_add(1, layout.pair_label.to(device), node_lp[:, layout.pair_node.to(device)])


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


def last_logits(model, seqs, n_last: int, pad_id: int) -> torch.Tensor:
    """[B, n_last, V] logits at the last `n_last` positions of each sequence (differentiable).

    Sequences are left-padded (position ids counted from each sequence's first token), so their ends
    share columns and the vocabulary-sized output layer runs B * n_last times, whatever the lengths.
    Through the model's own forward, as target_logits.
    """
    device = next(model.parameters()).device
    c, cache = shared_prefix(model, seqs, min(len(q) for q in seqs) - n_last, device)
    seqs = [s[c:] for s in seqs]
    B, W = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, W), pad_id, dtype=torch.long)
    att = torch.zeros((B, c + W), dtype=torch.long)
    att[:, :c] = 1
    for b, s in enumerate(seqs):
        ids[b, W - len(s):] = torch.as_tensor(s, dtype=torch.long)
        att[b, c + W - len(s):] = 1
    positions = (att.cumsum(1) - 1).clamp(min=0)[:, c:]
    return model(input_ids=ids.to(device), attention_mask=att.to(device), position_ids=positions.to(device),
                 logits_to_keep=n_last, past_key_values=cache, use_cache=cache is not None).logits


MIN_SHARED_PREFIX = 4  # shorter shared prefixes are fed with each row (an extra forward costs more)


def shared_prefix_len(model, seqs, limit: int) -> int:
    """How many leading tokens (at most `limit`) every sequence of the batch shares (a chat template's
    system turn, the task's instruction): those are run once, not once a row. 0 when there is nothing
    worth sharing, or the model is wrapped for several processes (DDP, DeepSpeed: one forward a step, as
    they expect), or it trains with gradient checkpointing (its layers drop any cache they are given)."""
    if len(seqs) < 2 or type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine"):
        return 0
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        return 0
    first, n = seqs[0], min(limit, min(len(s) for s in seqs))
    c = 0
    while c < n and all(s[c] == first[c] for s in seqs):
        c += 1
    return c if c >= MIN_SHARED_PREFIX else 0


def shared_prefix(model, seqs, limit: int, device):
    """(c, cache): the batch's shared prefix length and its key/value cache, from one forward over it,
    repeated for each row (differentiable: with gradients on, each row's gradient flows back through
    it); (0, None) when nothing is shared (see shared_prefix_len) or the model returns no cache."""
    c = shared_prefix_len(model, seqs, limit)
    if not c:
        return 0, None
    out = model(input_ids=torch.tensor([seqs[0][:c]], dtype=torch.long, device=device), use_cache=True,
                logits_to_keep=1)
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        return 0, None
    cache.batch_repeat_interleave(len(seqs))
    return c, cache


def target_logits(model, seqs, positions, pad_id: int) -> torch.Tensor:
    """Logits that predict each target token: row r is the output at position t-1 for target t.

    seqs: token id sequences; positions: for each sequence, the target positions t (t >= 1).
    Sequences are right-padded into one batch; through the model's own forward (so DDP, DeepSpeed
    and PEFT wrappers see the call), with `logits_to_keep` limited to the positions some row needs,
    so the vocabulary-sized output layer runs only where a target is predicted, and the prompt prefix
    every sequence shares run once (shared_prefix). Returns [N, V], the rows in order of sequence then
    target.
    """
    seqs = [s.tolist() if torch.is_tensor(s) else list(s) for s in seqs]  # a cache's rows are tensors
    pred = [torch.as_tensor(p, dtype=torch.long) - 1 for p in positions]
    if any(len(p) and int(p.min()) < 0 for p in pred):
        raise ValueError("target position 0 has no preceding token to predict it from")
    device = next(model.parameters()).device
    c, cache = shared_prefix(model, seqs, int(torch.cat(pred).min()) if sum(map(len, pred)) else 0, device)
    seqs, pred = [s[c:] for s in seqs], [p - c for p in pred]
    B, W = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, W), pad_id, dtype=torch.long)
    att = torch.ones((B, c + W), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        att[b, c + len(s):] = 0
    keep = torch.unique(torch.cat(pred))  # sorted
    col = torch.searchsorted(keep, torch.cat(pred))
    row = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(pred)])
    logits = model(input_ids=ids.to(device), attention_mask=att.to(device), logits_to_keep=keep.to(device),
                   past_key_values=cache, use_cache=cache is not None).logits
    return logits[row.to(device), col.to(device)]
