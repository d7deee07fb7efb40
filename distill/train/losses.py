"""Distillation losses on the teacher's cached support.

The teacher cache holds, per position, its top-k log-probabilities and the probability mass left
outside them (the tail). Both distributions are compared on k+1 buckets: the k cached tokens and
"everything else". At temperature 1 and k = vocabulary size this is exactly the dense divergence;
for smaller k it is the divergence between the two distributions coarsened to those buckets, which
keeps the tail's mass in the loss instead of silently renormalising the top k. A temperature T
acts on both bucket distributions alike (each softmax(log-prob / T) over the k+1 buckets). Slots a
backend left without a teacher entry (filler ids at -inf) are not buckets: the student's mass on
them stays in its "everything else", exactly as if the row had been cached with a smaller k.

Soft labels (classification) are the same computation with the label set as the support.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.config import DIVERGENCES, SAMPLED  # the names, once: config.Loss and config.OnPolicyLoss

__all__ = ["DIVERGENCES", "SAMPLED", "dense_kd", "divergence", "loss_kwargs", "sampled_reverse_kl", "soft_label_kd",
           "sparse_kd", "student_buckets", "teacher_buckets", "total_loss"]


def _kl(logp, logq):
    """KL(p || q) summed over the last axis; 0 log 0 = 0. Terms where p = 0 are left out of the
    gradient too (both logs are replaced there first), so outcomes where p = q = 0 (cache slots with
    no teacher entry) give 0 and no NaN."""
    p = logp.exp()
    live = p != 0  # not `p > 0`: a NaN teacher probability must reach the loss (and stop training), not vanish
    zero = torch.zeros_like(p)
    return torch.where(live, p * (torch.where(live, logp, zero) - torch.where(live, logq, zero)), zero).sum(-1)


def _log_mix(logp, logq, w):
    """log(w p + (1 - w) q), stably; -inf with zero gradient where both terms are 0."""
    w = torch.as_tensor(w, dtype=logp.dtype, device=logp.device)
    a, b = logp + torch.log(w), logq + torch.log1p(-w)
    none = torch.isneginf(a) & torch.isneginf(b)
    return torch.logaddexp(a.masked_fill(none, 0.0), b.masked_fill(none, 0.0)).masked_fill(none, float("-inf"))


def divergence(logp, logq, kind: str = "forward_kl", beta: float = 0.5, lam: float = 0.1):
    """Per-row divergence between teacher log-probs `logp` and student log-probs `logq`."""
    if kind == "forward_kl":
        return _kl(logp, logq)
    if kind == "reverse_kl":
        return _kl(logq, logp)
    if kind == "jsd":  # generalised JSD: beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
        if beta <= 0:
            return _kl(logp, logq)
        if beta >= 1:
            return _kl(logq, logp)
        logm = _log_mix(logp, logq, beta)
        return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)
    if kind == "skew_forward_kl":  # KL(p || lam p + (1-lam) q)
        return _kl(logp, _log_mix(logp, logq, lam))
    if kind == "skew_reverse_kl":  # KL(q || lam q + (1-lam) p)
        return _kl(logq, _log_mix(logq, logp, lam))
    if kind == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")


def total_loss(kd, ce, alpha: float, temperature: float):
    """The training objective alpha * T^2 * D + (1 - alpha) * CE (T^2 keeps the soft term's gradient
    on the scale of the hard one's as T changes, Hinton et al.); tensors or floats."""
    return alpha * temperature ** 2 * kd + (1 - alpha) * ce


def _reduce(d, reduction: str):
    if reduction == "mean":
        return d.mean()
    if reduction == "sum":
        return d.sum()
    if reduction == "none":
        return d
    raise ValueError(f"unknown reduction {reduction!r}; expected mean, sum or none")


def loss_kwargs(kind: str, jsd_beta: float = 0.5, skew_lambda: float = 0.1) -> dict:
    """The keyword arguments `divergence` takes for `kind`: jsd's beta, the skews' lambda, none for the
    others. The values' ranges are the recipe's (config: train.jsd_beta, train.skew_lambda), checked there."""
    if kind == "jsd":
        return {"beta": jsd_beta}
    if kind.startswith("skew_"):
        return {"lam": skew_lambda}
    return {}


def soft_label_kd(student_scores, teacher_scores, temperature: float = 1.0, kind: str = "forward_kl",
                  reduction: str = "mean", **kw):
    """Divergence between teacher and student distributions over the label set, at temperature T
    (averaged over rows by default; `reduction="sum"` or `"none"` for sums or per-row values).

    Scores are unnormalised log-probabilities of each label answer; both are softmaxed over labels.
    A teacher score of -inf is a label with probability exactly 0: forward KL, JSD with beta < 1, the
    skews with lambda > 0 and TVD stay finite; reverse KL (and JSD at beta = 1, skew_reverse_kl at
    lambda = 0) is +inf with NaN gradients wherever the student gives such a label any mass, which is
    that divergence's value, not masked here (unlike `sparse_kd`'s slots with no teacher entry).
    """
    logp = F.log_softmax(teacher_scores.float() / temperature, dim=-1)
    logq = F.log_softmax(student_scores.float() / temperature, dim=-1)
    return _reduce(divergence(logp, logq, kind, **kw), reduction)


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, stably."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_buckets(topk_logprobs, tail_mass, temperature: float = 1.0):
    """Teacher log-probs over k+1 buckets (top k, tail), sharpened or flattened by temperature.

    The temperature acts on the bucket distribution (the tail counted as one outcome): the cache holds
    no per-token tail probabilities, so the tempered full distribution cannot be coarsened exactly.
    `student_buckets` treats the student the same way, so a student equal to the teacher has zero
    divergence at every temperature.
    """
    tail = torch.log(tail_mass.float().clamp_min(1e-12))[..., None]
    logp = torch.cat([topk_logprobs.float(), tail], dim=-1)
    if temperature != 1.0:
        return F.log_softmax(logp / temperature, dim=-1)
    return logp - torch.logsumexp(logp, -1, keepdim=True)


def student_buckets(student_logits, topk_ids, has_entry, temperature: float = 1.0):
    """Student log-probs over the teacher's k cached tokens plus the rest of the vocabulary, then
    tempered as a (k+1)-outcome distribution, as `teacher_buckets` does for the teacher.

    Slots where `has_entry` is False (filler ids of a row the backend gave fewer than k tokens for)
    are not buckets: -inf here as in the teacher's, and the student's mass on those ids stays in its
    tail, so the row is the same as one cached without them.
    Only [N, k] values and one log-sum-exp per row are formed from the [N, V] logits (no second
    vocabulary-sized log-softmax beside the cross-entropy's).
    """
    z = student_logits.float()
    logq_top = z.gather(-1, topk_ids.long()) - torch.logsumexp(z, dim=-1, keepdim=True)
    logq_top = logq_top.masked_fill(~has_entry, float("-inf"))
    some = has_entry.any(-1, keepdim=True)  # a row of filler only covers nothing (and has no NaN gradient)
    covered = torch.logsumexp(logq_top.masked_fill(~some, 0.0), dim=-1, keepdim=True)
    covered = covered.masked_fill(~some, float("-inf"))
    logq = torch.cat([logq_top, _log1mexp(covered)], dim=-1)
    return F.log_softmax(logq / temperature, dim=-1) if temperature != 1.0 else logq


def sparse_kd(student_logits, topk_ids, topk_logprobs, tail_mass, temperature: float = 1.0,
              kind: str = "forward_kl", reduction: str = "mean", **kw):
    """Divergence per position between the cached teacher top-k (+tail) and the student, averaged
    over positions (or summed, or per position, by `reduction`).

    student_logits: [N, V]; topk_ids / topk_logprobs: [N, k]; tail_mass: [N]. Ids beyond the student's
    vocabulary are an error upstream (the trainer checks the cache against the student). A slot at
    log-prob -inf has no teacher entry (filler) and is dropped from both bucket distributions.
    """
    logp = teacher_buckets(topk_logprobs, tail_mass, temperature)
    logq = student_buckets(student_logits, topk_ids, ~torch.isneginf(topk_logprobs), temperature)
    return _reduce(divergence(logp, logq, kind, **kw), reduction)


def dense_kd(student_logits, teacher_logits, temperature: float = 1.0, kind: str = "forward_kl",
             reduction: str = "mean", **kw):
    """Divergence between full teacher and student distributions (online distillation, teacher in the
    loop); -inf teacher logits are tokens at probability 0, with the consequences `soft_label_kd` lists."""
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return _reduce(divergence(logp, logq, kind, **kw), reduction)


def sampled_reverse_kl(student_logits, targets, topk_ids, topk_logprobs, tail_mass, reduction: str = "mean"):
    """The single-sample estimate of KL(student || teacher) at each position of a response the student
    sampled itself: log q(b) - log p(b), b the bucket of the sampled token (one of the teacher's k cached
    tokens, or everything else), at temperature 1.

    Its value is the estimate; its gradient, (log q(b) - log p(b)) * grad log q(b), is the score-function
    gradient of the expected estimate, unbiased for the gradient of the (k+1)-bucket reverse KL at that
    position when b was drawn from the student (the per-token reward of on-policy distillation, with
    no credit passed to earlier tokens). targets: [N], the sampled token at each position.
    """
    logp = teacher_buckets(topk_logprobs, tail_mass)
    has_entry = ~torch.isneginf(topk_logprobs)
    logq = student_buckets(student_logits, topk_ids, has_entry)
    hit = (topk_ids.long() == targets.long()[:, None]) & has_entry
    bucket = torch.where(hit.any(-1), hit.float().argmax(-1), topk_ids.shape[-1])[:, None]
    lq, lp = logq.gather(-1, bucket)[:, 0], logp.gather(-1, bucket)[:, 0]
    est = (lq - lp).detach()
    return _reduce(est + est * (lq - lq.detach()), reduction)
