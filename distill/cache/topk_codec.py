"""A compact encoding for cached top-k distributions.

Per position the cache holds k (token id, log-probability) pairs and the probability mass outside
them (the tail). Stored naively that is 8 bytes per pair (int32 + float32). This codec stores the same
information in a fraction of that, at a KL error far below what distillation notices (figures and the
script that measures them: docs/benchmarks.md):

* Token ids: renumbered per shard by frequency (the shard stores that table once), so the tokens a
  teacher often ranks highly get small numbers; each position's k numbers are sorted ascending and
  stored as gaps (the first gap is the number itself). Gaps are split into byte planes (low byte,
  high byte, ...) and compressed: the upper planes are almost all zeros and cost next to nothing.
* Log-probabilities, in the same (id-sorted) order: per position the largest value `top` (float16)
  and the range `span` = top - smallest (float16, rounded up). Each value's distance d = top - v from
  the top is companded (see `_compand`) and quantised to `bits` bits (default 6). The compander spends
  its levels where the probability mass is: the error of an entry grows as its probability shrinks,
  which is what keeps the KL error of the whole distribution small. The top entry decodes to `top`
  (d = 0) and is the only one that does, so the rank-1 token survives. The largest code means "no
  entry" (-inf), used where a backend returned fewer than k usable tokens.
* Tail mass: float16.

Blocks are compressed with zlib (codec "tkq3", what new caches get: its decoder is faster than LZMA's, for a
few more bytes on disk) or LZMA2 (codec "tkq2", the caches written before it; they still read). Both hold the
same numbers and decode to the same tensors.

Decoding sorts each position by value (descending; ties by id), so `decode(encode(x))` has the same
layout as the input: the same ids in rank order, values within the quantisation error; the sort is
one np.sort of keys holding value and id. `decode(..., ranked=False)` skips it: each row holds the
same (id, value) pairs in stored order, which is all a loss that takes the top k as a set needs
(training streams shards so). The inverse compander is computed once per distinct span (kept for
the process's life), not per entry, and a shard is decoded a few hundred rows at a time so the
intermediates stay in cache. Everything is numpy; the encoded form is a dict of uint8 / float
tensors that safetensors stores.
"""
from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass

import numpy as np
import torch

# The codec's names (the manifest's codec.name): the block compressor is all that differs, and every
# shard says which it used (tk_shape's sixth number, pack_ints' third; absent: LZMA2), so a cache of
# either name reads the same. NAME is what new caches are written with.
LZMA, DEFLATE = 0, 1
PACKERS = {"tkq2": LZMA, "tkq3": DEFLATE}
NAME = "tkq3"
# The compander: u(d) = [(1 - exp(-d / C)) + BETA * d / span] / [(1 - exp(-span / C)) + BETA], level density
# ~ exp(-d / C) + BETA / span. The exponential part puts levels where the probability mass is (the KL
# error of an entry scales with its probability); the linear part bounds the error of improbable
# entries, which a distillation temperature of 2 flattens upwards; its KL errors against a pure
# exponential, and the 6-bit default's, are in docs/benchmarks.md (scripts/bench_generate.py).
COMPANDER_C = 4.5
COMPANDER_BETA = 0.3
DEFAULT_BITS = 6
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
_CHUNK = 1 << 15  # entries decoded at a time


def _pack(a: np.ndarray, preset: int = 6, packer: int = DEFLATE) -> torch.Tensor:
    """One block: LZMA2 at `preset` (lower: faster, larger; every preset up to 6 decodes with
    _FILTERS), or zlib at level max(1, preset), the smaller of its default and run-length strategies
    (runs: the byte planes of small numbers, almost all zeros above the first)."""
    data = np.ascontiguousarray(a).tobytes()
    if packer == LZMA:
        filters = _FILTERS if preset == 6 else [{"id": lzma.FILTER_LZMA2, "preset": preset}]
        raw = lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)
    elif packer == DEFLATE:
        raw = min((_deflate(data, max(1, preset), strategy) for strategy in (zlib.Z_DEFAULT_STRATEGY, zlib.Z_RLE)),
                  key=len)
    else:
        raise ValueError(f"unknown block compressor {packer}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())


def _deflate(data: bytes, level: int, strategy: int) -> bytes:
    z = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    return z.compress(data) + z.flush()


def _unpack(t: torch.Tensor, dtype, count: int, packer: int = LZMA) -> np.ndarray:
    size = count * np.dtype(dtype).itemsize
    try:
        if packer == DEFLATE:
            raw = zlib.decompress(t.numpy(), bufsize=max(1, size))
        elif packer == LZMA:
            raw = lzma.decompress(t.numpy(), format=lzma.FORMAT_RAW, filters=_FILTERS)
        else:
            raise ValueError(f"unknown block compressor {packer}")
    except (lzma.LZMAError, zlib.error) as e:
        raise ValueError(f"corrupt top-k block ({e})") from None
    if len(raw) != size:
        raise ValueError(f"corrupt top-k block: expected {count} values, found {len(raw) / np.dtype(dtype).itemsize:g}")
    return np.frombuffer(raw, dtype=dtype)


def _planes(x: np.ndarray, planes: int) -> np.ndarray:
    x = x.astype(np.uint64)
    return np.stack([(x >> (8 * p)) & 0xFF for p in range(planes)]).astype(np.uint8)


def _two_planes(b: np.ndarray) -> np.ndarray:
    """Two byte planes [2, ...] -> uint16 numbers: one little-endian view of the planes interleaved."""
    pair = np.empty(b.shape[1:] + (2,), dtype=np.uint8)
    pair[..., 0], pair[..., 1] = b[0], b[1]
    return pair.view("<u2")[..., 0]


def _unplanes(b: np.ndarray) -> np.ndarray:
    """Byte planes [planes, ...] -> the numbers (int32 up to 3 planes, int64 up to 7, else uint64)."""
    planes = b.shape[0]
    if planes == 1:
        return b[0].astype(np.int32)
    if planes == 2:  # the common case (vocabularies up to 65536)
        return _two_planes(b).astype(np.int32)
    wide = np.int32 if planes <= 3 else np.int64 if planes < 8 else np.uint64
    out = b[0].astype(wide)
    for p in range(1, planes):
        out |= b[p].astype(wide) << wide(8 * p)
    return out


def _numbers(b: np.ndarray) -> np.ndarray:
    """Byte planes [planes, rows, k] of gaps (under 2^63) -> uint16 or int64 numbers, for a cumsum."""
    if b.shape[0] == 2:
        return _two_planes(b)
    out = b[0].astype(np.int64)
    for p in range(1, b.shape[0]):
        out |= b[p].astype(np.int64) << np.int64(8 * p)
    return out


def id_planes(vocab_size: int) -> int:
    """Bytes per token id of this vocabulary (ceil(log2 V) bits, rounded up to whole bytes)."""
    bits = max(1, int(np.ceil(np.log2(max(2, vocab_size)))))
    return (bits + 7) // 8


def encode(ids, logprobs, tail, vocab_size: int, bits: int = DEFAULT_BITS, preset: int = 6,
           name: str = NAME) -> dict[str, torch.Tensor]:
    """ids [N, k] (any int), logprobs [N, k] (-inf = no entry), tail [N] -> tensors to store.
    `name`: the codec (PACKERS: which compressor its blocks use). `preset` is the compressor's effort
    (0..6; LZMA at 0 encodes much faster for a somewhat larger file; zlib takes level max(1, preset))."""
    if not 0 <= preset <= 6:
        raise ValueError(f"preset: expected 0..6, got {preset}")
    if name not in PACKERS:
        raise ValueError(f"unknown top-k codec {name!r} (known: {', '.join(PACKERS)})")
    packer = PACKERS[name]
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
        "tk_table": _pack(_planes(table, planes), preset, packer),
        "tk_gaps": _pack(_planes(gaps, planes), preset, packer),
        "tk_codes": _pack(codes.astype(cdt), preset, packer),
        "tk_top": torch.from_numpy(top.view(np.int16).copy()),
        "tk_span": torch.from_numpy(span16.view(np.int16).copy()),
        "tk_tail": torch.from_numpy(tail.astype(np.float16).view(np.int16).copy()),
        "tk_shape": torch.tensor([n, k, planes, bits, table.size] + ([packer] if packer != LZMA else []),
                                 dtype=torch.int64),
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


def pack_ints(a, name: str = NAME) -> tuple[torch.Tensor, torch.Tensor]:
    """Any 1-D integer array -> (compressed bytes, [count, planes]): zigzag deltas in byte planes.

    Positions (runs of +1) and offsets cost almost nothing; token ids about a byte each."""
    a = np.asarray(torch.as_tensor(a).cpu().numpy(), dtype=np.int64).ravel()
    d = np.diff(a, prepend=0)
    z = (d << 1) ^ (d >> 63)  # zigzag: small negative and positive steps become small numbers
    top = int(z.max()) if z.size else 0
    planes = max(1, (top.bit_length() + 7) // 8)
    packer = PACKERS[name]
    return _pack(_planes(z, planes), 6, packer), torch.tensor([a.size, planes] + ([packer] if packer != LZMA else []),
                                                             dtype=torch.int64)


def unpack_ints(blob: torch.Tensor, info: torch.Tensor, dtype=torch.int64) -> torch.Tensor:
    count, planes, packer = (int(x) for x in (info.tolist() + [LZMA])[:3])
    z = _unplanes(_unpack(blob, np.uint8, count * planes, packer).reshape(planes, count)).astype(np.uint64)
    d = (z >> np.uint64(1)).astype(np.int64) ^ -(z & np.uint64(1)).astype(np.int64)
    # converted in numpy: a torch conversion of this size may wait for its intra-op threads
    return torch.from_numpy(np.cumsum(d).astype(torch.empty(0, dtype=dtype).numpy().dtype, copy=False))


def is_encoded(tensors: dict) -> bool:
    return "tk_shape" in tensors


def decode(t: dict, ranked: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored tensors -> (topk_ids int32 [N, k], topk_logprobs float32 [N, k], tail_mass float32 [N]).

    `ranked`: each row in rank order (value descending, ties by token id), as the teacher gave it.
    Without it, each row holds the same (id, value) pairs in the order they are stored (by the
    shard's token numbering): what a loss that treats the k entries as a set needs (losses.sparse_kd),
    without the per-row sort."""
    n, k, planes, bits, n_table, packer = (int(x) for x in (t["tk_shape"].tolist() + [LZMA])[:6])
    table = _unplanes(_unpack(t["tk_table"], np.uint8, planes * n_table, packer).reshape(planes, n_table))
    gap_planes = _unpack(t["tk_gaps"], np.uint8, planes * n * k, packer).reshape(planes, n, k)
    cdt = np.uint8 if bits <= 8 else np.uint16
    codes = _unpack(t["tk_codes"], cdt, n * k, packer).reshape(n, k)
    levels = (1 << bits) - 2
    top = t["tk_top"].numpy().view(np.float16).astype(np.float64)
    # the inverse compander of every (span, code) pair that occurs: a float16 span takes few values,
    # so this is a small table (the same numbers as expanding each entry, at a fraction of the work);
    # one column per code, the "no entry" codes (levels + 1 and beyond) at +inf below the top: -inf
    spans, which = np.unique(t["tk_span"].numpy().view(np.uint16), return_inverse=True)
    width = levels + 2
    grid = np.full((spans.size, width), np.inf)
    grid[:, :levels + 1] = _expanded(spans, bits)
    grid, row_base = grid.reshape(-1), which.reshape(-1).astype(np.int64) * width
    ids_s, vals_s = np.empty((n, k), dtype=table.dtype), np.empty((n, k), dtype=np.float32)
    # a few hundred rows at a time: the int64 / float64 intermediates stay in the core's cache
    step = max(1, _CHUNK // max(1, k))
    for a in range(0, n, step):
        b = min(n, a + step)
        mapped = np.cumsum(_numbers(gap_planes[:, a:b]), axis=1, dtype=np.int64)  # int64: numpy gathers fastest
        if k and (mapped.max() >= n_table or mapped.min() < 0):
            raise ValueError("corrupt top-k block: token number outside the shard's table")
        # mode="wrap" skips the bounds check, every index having been checked (here, or by construction)
        np.take(table, mapped, mode="wrap", out=ids_s[a:b])
        d = np.take(grid, row_base[a:b, None] + np.minimum(codes[a:b], levels + 1), mode="wrap")
        vals_s[a:b] = np.subtract(top[a:b, None], d, out=d)  # rounded to float32 once, as astype does
    ids_s = ids_s.astype(np.int32, copy=False)
    tail = torch.from_numpy(t["tk_tail"].numpy().view(np.float16).astype(np.float32))
    if not ranked:
        return torch.from_numpy(ids_s), torch.from_numpy(vals_s), tail
    # back to rank order: value descending, ties by token id (one sort of keys holding both, the
    # value's 32 bits above the id's; both come back out of the sorted keys)
    key = np.sort(_descending_key(vals_s) << 32 | ids_s.astype(np.int64), axis=1)
    ids_r = (key & 0xFFFFFFFF).astype(np.int32)
    return torch.from_numpy(ids_r), torch.from_numpy(_from_descending_key(key >> 32)), tail


_EXPANDED: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # bits -> (known [2^16], rows [2^16, levels + 1])


def _expanded(spans: np.ndarray, bits: int) -> np.ndarray:
    """The inverse compander at every code for each span (float16 bit patterns) -> [spans, levels + 1].

    Up to 8 bits, rows are kept for the process's life, indexed by the span's 16 bits (a few thousand
    distinct spans occur; the table's pages are touched only for those), so each is expanded once;
    threads that meet an unknown span at once compute the same row."""
    levels = (1 << bits) - 2
    grid = lambda s: _expand(np.broadcast_to(np.arange(levels + 1) / levels, (s.size, levels + 1)),  # noqa: E731
                             s.view(np.float16).astype(np.float64)[:, None])
    if bits > 8:
        return grid(spans)
    if bits not in _EXPANDED:
        _EXPANDED.setdefault(bits, (np.zeros(1 << 16, dtype=bool), np.zeros((1 << 16, levels + 1))))
    known, rows = _EXPANDED[bits]
    new = spans[~known[spans]]
    if new.size:
        rows[new] = grid(new)
        known[new] = True
    return rows[spans]


def _descending_key(v: np.ndarray) -> np.ndarray:
    """float32 values -> int64 keys whose ascending order is the values' descending order (-inf last)."""
    b = (-v).view(np.int32).astype(np.int64)
    return np.where(b < 0, b ^ 0x7FFFFFFF, b)


def _from_descending_key(b: np.ndarray) -> np.ndarray:
    """The inverse of `_descending_key`."""
    return -np.where(b < 0, b ^ 0x7FFFFFFF, b).astype(np.int32).view(np.float32)


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


# -- the cache's top-k examples and shard tensors (cache/store.py re-exports these) ---------------------
_AUX = ("index", "input_ids", "seq_offsets", "positions", "pos_offsets")


def decode_topk(stored: dict[str, torch.Tensor], ranked: bool = True) -> dict[str, torch.Tensor]:
    """A stored top-k shard (encoded or plain) -> the plain tensors `pack_topk` made. `ranked=False`:
    each position's k (id, log-prob) pairs in the codec's stored order, not rank order (topk_codec.decode)."""
    if not is_encoded(stored):
        return stored
    ids, vals, tail = decode(stored, ranked)
    out = {"topk_ids": ids, "topk_logprobs": vals, "tail_mass": tail}
    for key in _AUX:
        narrow = key in ("input_ids", "positions")
        out[key] = unpack_ints(stored[key + "_z"], stored[key + "_zi"], torch.int32 if narrow else torch.int64)
    return out


@dataclass(frozen=True)
class TopkExample:
    """One example of a top-k split: its token ids, the target positions (tokens the student must
    predict) and, per target, the teacher's top-k ids [n, k], log-probabilities [n, k] and tail mass [n]."""

    sequence: torch.Tensor | list[int]
    positions: torch.Tensor | list[int]
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_mass: torch.Tensor


def example_topk(data: dict, i: int) -> TopkExample:
    """The i-th example of a loaded top-k split."""
    s0, s1 = int(data["seq_offsets"][i]), int(data["seq_offsets"][i + 1])
    p0, p1 = int(data["pos_offsets"][i]), int(data["pos_offsets"][i + 1])
    return TopkExample(data["input_ids"][s0:s1], data["positions"][p0:p1], data["topk_ids"][p0:p1],
                       data["topk_logprobs"][p0:p1], data["tail_mass"][p0:p1])


def pack_topk(examples: list[TopkExample], start: int) -> dict[str, torch.Tensor]:
    """The tensors of a top-k shard holding `examples`, the split's examples from number `start` on."""
    seq_off, pos_off = [0], [0]
    for e in examples:
        seq_off.append(seq_off[-1] + len(e.sequence))
        pos_off.append(pos_off[-1] + len(e.positions))
    return {
        "index": torch.arange(start, start + len(examples), dtype=torch.long),
        "input_ids": torch.tensor([t for e in examples for t in e.sequence], dtype=torch.int32),
        "seq_offsets": torch.tensor(seq_off, dtype=torch.long),
        "positions": torch.tensor([t for e in examples for t in e.positions], dtype=torch.int32),
        "pos_offsets": torch.tensor(pos_off, dtype=torch.long),
        "topk_ids": torch.cat([torch.as_tensor(e.topk_ids, dtype=torch.int32) for e in examples]),
        "topk_logprobs": torch.cat([torch.as_tensor(e.topk_logprobs, dtype=torch.float32) for e in examples]),
        "tail_mass": torch.cat([torch.as_tensor(e.tail_mass, dtype=torch.float32) for e in examples]),
    }
