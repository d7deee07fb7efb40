"""A compact encoding for cached top-k distributions.

Per position the cache holds k (token id, log-probability) pairs and the probability mass outside
them (the tail). Stored naively that is 8 bytes per pair (int32 + float32): 512 bytes a token at k=64.
This codec stores the same information in about a fifth of that (92 bytes a token at k=64 measured on
SmolLM2-135M, mean KL error 2e-4 nats):

* Token ids: renumbered per shard by frequency (the shard stores that table once), so the tokens a
  teacher often ranks highly get small numbers; each position's k numbers are sorted ascending and
  stored as gaps (the first gap is the number itself). Gaps are split into byte planes (low byte,
  high byte, ...) and LZMA-compressed: the upper planes are almost all zeros and cost next to nothing.
* Log-probabilities, in the same (id-sorted) order: per position the largest value `top` (float16)
  and the range `span` = top - smallest (float16, rounded up). Each value's distance d = top - v from
  the top is companded (see `_compand`) and quantised to `bits` bits (default 6). The compander spends
  its levels where the probability mass is: the error of an entry grows as its probability shrinks,
  which is what keeps the KL error of the whole distribution small. The top entry decodes to `top`
  (d = 0) and is the only one that does, so the rank-1 token survives. The largest code means "no
  entry" (-inf), used where a backend returned fewer than k usable tokens.
* Tail mass: float16.

Decoding sorts each position by value (descending; ties by id), so `decode(encode(x))` has the same
layout as the input: the same ids in rank order, values within the quantisation error. The inverse
compander is computed once per distinct (span, code) pair of a shard, not per entry, and the sort
is one argsort of a key holding value and id: a shard decodes about 4x faster than entry by entry.
Everything is numpy; the encoded form is a dict of uint8 / float tensors that safetensors stores.
"""
from __future__ import annotations

import lzma

import numpy as np
import torch

NAME = "tkq2"
# The compander: u(d) = [(1 - exp(-d / C)) + BETA * d / span] / [(1 - exp(-span / C)) + BETA], level density
# ~ exp(-d / C) + BETA / span. The exponential part puts levels where the probability mass is (the KL
# error of an entry scales with its probability); the linear part bounds the error of improbable
# entries, which a distillation temperature of 2 flattens upwards. Measured on SmolLM2-135M top-64 at 7
# bits: KL error 4.3e-5 nats at T=1 and 4.5e-5 at T=2 (pure exp with C = 3: 7.7e-5 and 2.9e-4).
# The default is 6 bits: 1.9e-4 nats at k=64, 92 bytes a token (scripts/bench_generate.py).
COMPANDER_C = 4.5
COMPANDER_BETA = 0.3
DEFAULT_BITS = 6
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]


def _pack(a: np.ndarray, preset: int = 6) -> torch.Tensor:
    """LZMA2 at `preset` (lower: faster, larger); every preset up to 6 decodes with _FILTERS."""
    filters = _FILTERS if preset == 6 else [{"id": lzma.FILTER_LZMA2, "preset": preset}]
    raw = lzma.compress(np.ascontiguousarray(a).tobytes(), format=lzma.FORMAT_RAW, filters=filters)
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())


def _unpack(t: torch.Tensor, dtype, count: int) -> np.ndarray:
    try:
        raw = lzma.decompress(t.numpy().tobytes(), format=lzma.FORMAT_RAW, filters=_FILTERS)
    except lzma.LZMAError as e:
        raise ValueError(f"corrupt top-k block ({e})") from None
    out = np.frombuffer(raw, dtype=dtype)
    if out.size != count:
        raise ValueError(f"corrupt top-k block: expected {count} values, found {out.size}")
    return out


def _planes(x: np.ndarray, planes: int) -> np.ndarray:
    x = x.astype(np.uint64)
    return np.stack([(x >> (8 * p)) & 0xFF for p in range(planes)]).astype(np.uint8)


def _unplanes(b: np.ndarray) -> np.ndarray:
    out = np.zeros(b.shape[1:], dtype=np.uint64)
    for p in range(b.shape[0]):
        out |= b[p].astype(np.uint64) << np.uint64(8 * p)
    return out.astype(np.int64) if b.shape[0] < 8 else out


def id_planes(vocab_size: int) -> int:
    """Bytes per token id of this vocabulary (ceil(log2 V) bits, rounded up to whole bytes)."""
    bits = max(1, int(np.ceil(np.log2(max(2, vocab_size)))))
    return (bits + 7) // 8


def encode(ids, logprobs, tail, vocab_size: int, bits: int = DEFAULT_BITS, preset: int = 6) -> dict[str, torch.Tensor]:
    """ids [N, k] (any int), logprobs [N, k] (-inf = no entry), tail [N] -> tensors to store.
    `preset` is LZMA's effort (0..6; 0 encodes ~10x faster, ~14% larger; decoding is the same)."""
    if not 0 <= preset <= 6:
        raise ValueError(f"preset: expected 0..6, got {preset}")
    ids = np.asarray(torch.as_tensor(ids).cpu().numpy(), dtype=np.int64)
    vals = np.asarray(torch.as_tensor(logprobs).float().cpu().numpy(), dtype=np.float32)
    tail = np.asarray(torch.as_tensor(tail).float().cpu().numpy(), dtype=np.float32)
    if not 2 <= bits <= 16:
        raise ValueError(f"bits: expected 2..16, got {bits}")
    if ids.ndim != 2 or vals.shape != ids.shape or tail.shape != (ids.shape[0],):
        raise ValueError(f"shape mismatch: ids {ids.shape}, logprobs {vals.shape}, tail {tail.shape}")
    n, k = ids.shape
    if n and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token id out of range [0, {vocab_size}): min {ids.min()}, max {ids.max()}")
    planes = id_planes(vocab_size)
    # ids -> per-shard frequency ranks (frequent tokens get small numbers), sorted per row, gaps
    distinct, counts = np.unique(ids, return_counts=True)
    table = distinct[np.argsort(-counts, kind="stable")]
    rank_of = np.zeros(int(distinct.max()) + 1 if distinct.size else 1, dtype=np.int64)
    rank_of[table] = np.arange(table.size)
    mapped = rank_of[ids]
    order = np.argsort(mapped, axis=1, kind="stable")
    mapped_s = np.take_along_axis(mapped, order, 1)
    vals_s = np.take_along_axis(vals, order, 1)
    gaps = np.diff(mapped_s, axis=1, prepend=0)

    finite = np.isfinite(vals_s)
    has = finite.any(1)
    best = np.where(finite, vals_s, -np.inf).argmax(1)
    top = np.where(has, vals_s[np.arange(n), best], 0.0).astype(np.float16)
    top32 = top.astype(np.float32)
    low = np.where(has, np.where(finite, vals_s, np.inf).min(1, initial=np.inf), 0.0)
    span16 = _round_up_f16(np.maximum(top32 - low, 0.0))
    span = span16.astype(np.float64)
    levels = (1 << bits) - 2  # codes 0..levels are values; levels + 1 = no entry
    d = np.clip(np.where(finite, top32[:, None] - vals_s, 0.0), 0.0, span[:, None])
    u = _compand(d, span[:, None])
    codes = np.rint(np.clip(u, 0.0, 1.0) * levels).astype(np.int64)
    codes = np.maximum(codes, 1)  # only the best entry of a row decodes to the top value: rank 1 survives
    codes[np.arange(n), best] = 0
    codes[~finite] = levels + 1
    cdt = np.uint8 if bits <= 8 else np.uint16
    return {
        "tk_table": _pack(_planes(table, planes), preset),
        "tk_gaps": _pack(_planes(gaps, planes), preset),
        "tk_codes": _pack(codes.astype(cdt), preset),
        "tk_top": torch.from_numpy(top.view(np.int16).copy()),
        "tk_span": torch.from_numpy(span16.view(np.int16).copy()),
        "tk_tail": torch.from_numpy(tail.astype(np.float16).view(np.int16).copy()),
        "tk_shape": torch.tensor([n, k, planes, bits, table.size], dtype=torch.int64),
    }


def _compand(d: np.ndarray, span: np.ndarray) -> np.ndarray:
    """Distance below the top (0..span) -> [0, 1]; 0 where span is 0."""
    span = np.broadcast_to(span, d.shape)
    safe = np.where(span > 0, span, 1.0)
    num = -np.expm1(-d / COMPANDER_C) + COMPANDER_BETA * d / safe
    den = -np.expm1(-safe / COMPANDER_C) + COMPANDER_BETA
    return np.where(span > 0, num / den, 0.0)


def _expand(u: np.ndarray, span: np.ndarray) -> np.ndarray:
    """Inverse of `_compand` (Newton's method from the inverse of its exponential part; converges to
    float64 precision in a few steps: the function is smooth, increasing and concave)."""
    span = np.broadcast_to(span, u.shape)
    safe = np.where(span > 0, span, 1.0)
    den = -np.expm1(-safe / COMPANDER_C) + COMPANDER_BETA
    target = u * den
    d = np.clip(-COMPANDER_C * np.log1p(-np.minimum(target, 1 - 1e-12)), 0.0, safe)
    for _ in range(12):
        f = -np.expm1(-d / COMPANDER_C) + COMPANDER_BETA * d / safe - target
        fp = np.exp(-d / COMPANDER_C) / COMPANDER_C + COMPANDER_BETA / safe
        d = np.clip(d - f / fp, 0.0, safe)
    return np.where(span > 0, d, 0.0)


def _round_up_f16(x: np.ndarray) -> np.ndarray:
    h = np.minimum(x, 65000.0).astype(np.float16)
    low = h.astype(np.float32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def pack_ints(a) -> tuple[torch.Tensor, torch.Tensor]:
    """Any 1-D integer array -> (compressed bytes, [count, planes]): zigzag deltas in byte planes.

    Positions (runs of +1) and offsets cost almost nothing; token ids about a byte each."""
    a = np.asarray(torch.as_tensor(a).cpu().numpy(), dtype=np.int64).ravel()
    d = np.diff(a, prepend=0)
    z = (d << 1) ^ (d >> 63)  # zigzag: small negative and positive steps become small numbers
    top = int(z.max()) if z.size else 0
    planes = max(1, (top.bit_length() + 7) // 8)
    return _pack(_planes(z, planes)), torch.tensor([a.size, planes], dtype=torch.int64)


def unpack_ints(blob: torch.Tensor, info: torch.Tensor, dtype=torch.int64) -> torch.Tensor:
    count, planes = (int(x) for x in info)
    z = _unplanes(_unpack(blob, np.uint8, count * planes).reshape(planes, count)).astype(np.uint64)
    d = (z >> np.uint64(1)).astype(np.int64) ^ -(z & np.uint64(1)).astype(np.int64)
    return torch.from_numpy(np.cumsum(d)).to(dtype)


def is_encoded(tensors: dict) -> bool:
    return "tk_shape" in tensors


def decode(t: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored tensors -> (topk_ids int32 [N, k], topk_logprobs float32 [N, k], tail_mass float32 [N])."""
    n, k, planes, bits, n_table = (int(x) for x in t["tk_shape"])
    table = _unplanes(_unpack(t["tk_table"], np.uint8, planes * n_table).reshape(planes, n_table))
    mapped_s = np.cumsum(_unplanes(_unpack(t["tk_gaps"], np.uint8, planes * n * k).reshape(planes, n, k)), axis=1)
    if n and (mapped_s.max() >= n_table):
        raise ValueError("corrupt top-k block: token number outside the shard's table")
    ids_s = table[mapped_s] if n else np.zeros((0, k), dtype=np.int64)
    cdt = np.uint8 if bits <= 8 else np.uint16
    codes = _unpack(t["tk_codes"], cdt, n * k).reshape(n, k).astype(np.int64)
    levels = (1 << bits) - 2
    top = t["tk_top"].numpy().view(np.float16).astype(np.float64)
    # the inverse compander of every (span, code) pair that occurs: a float16 span takes few values,
    # so this is a small table (the same numbers as expanding each entry, at a fraction of the work)
    spans, which = np.unique(t["tk_span"].numpy().view(np.float16), return_inverse=True)
    grid = _expand(np.broadcast_to(np.arange(levels + 1) / levels, (spans.size, levels + 1)),
                   spans.astype(np.float64)[:, None])
    d = grid[which.reshape(-1)[:, None], np.minimum(codes, levels)]
    vals_s = np.where(codes > levels, -np.inf, top[:, None] - d).astype(np.float32)
    # back to rank order: value descending, ties by token id (one sort of a key holding both)
    key = _descending_key(vals_s) << 32 | ids_s
    order = np.argsort(key, axis=1)
    ids_r = (np.take_along_axis(key, order, 1) & 0xFFFFFFFF).astype(np.int32)
    vals_r = np.take_along_axis(vals_s, order, 1)
    tail = t["tk_tail"].numpy().view(np.float16).astype(np.float32)
    return torch.from_numpy(ids_r), torch.from_numpy(np.ascontiguousarray(vals_r)), torch.from_numpy(tail.copy())


def _descending_key(v: np.ndarray) -> np.ndarray:
    """float32 values -> int64 keys whose ascending order is the values' descending order (-inf last)."""
    b = (-v).view(np.int32).astype(np.int64)
    return np.where(b < 0, b ^ 0x7FFFFFFF, b) if (b < 0).any() else b


def bucket_kl(ref_ids, ref_logprobs, ref_tail, ids, logprobs, tail, temperature: float = 1.0) -> torch.Tensor:
    """KL(reference || decoded) per position over the k + 1 buckets (top k and tail) the loss uses,
    at a distillation temperature (buckets softened as the loss does).

    Rows are aligned by token id, so the two may list their entries in different orders."""
    def buckets(i, lp, tl):
        i, lp = torch.as_tensor(i).long(), torch.as_tensor(lp).double()
        order = torch.argsort(i, dim=-1, stable=True)
        lp = lp.gather(-1, order)
        tl = torch.log(torch.as_tensor(tl).double().clamp_min(1e-12))[..., None]
        x = torch.cat([lp, tl], -1) / temperature
        return x - torch.logsumexp(x, -1, keepdim=True), i.gather(-1, order)

    (p, pi), (q, qi) = buckets(ref_ids, ref_logprobs, ref_tail), buckets(ids, logprobs, tail)
    if not torch.equal(pi, qi):
        raise ValueError("the decoded rows hold other token ids than the reference")
    pe = p.exp()
    return torch.where(pe > 0, pe * (p - q), torch.zeros_like(pe)).sum(-1)
