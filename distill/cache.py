"""The teacher cache: shards of soft labels or top-k log-probabilities, and a manifest that ties them
to one teacher, tokenizer, k and data fingerprint.

Layout: `manifest.json` plus `SPLIT-NNNNN.safetensors` shards. A shard is written atomically and only
then recorded in the manifest with its SHA-256, so an interrupted run leaves a cache that the same
command resumes, and a shard whose checksum does not match is regenerated, never read.

Soft-label shards hold `label_logprobs` [n, n_labels] (the log-probability of each full label answer;
normalise over the label set at use) and `index` [n] (positions in the split file).
Top-k shards hold, for each example, its token ids and, for each target position t (a token the
student must predict), the teacher's top-k token ids and log-probabilities of the distribution that
predicted token t (computed from tokens < t) and the probability mass outside the top k.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .errors import DistillError, UsageError
from .io import atomic_write_bytes, atomic_write_text, sha256_file

FORMAT_VERSION = 1
IDENTITY_KEYS = ("kind", "teacher", "tokenizer_hash", "k", "data_fingerprint", "labels", "max_length")


@dataclass
class Manifest:
    kind: str  # soft_labels | topk
    teacher: str
    tokenizer_hash: str
    vocab_size: int
    k: int | None
    data_fingerprint: str
    labels: list[str] | None
    max_length: int
    backend: str = ""
    versions: dict = field(default_factory=dict)
    temperature: float = 1.0  # captured at T=1; the distillation temperature is applied in the loss
    shards: list[dict] = field(default_factory=list)
    complete: dict = field(default_factory=dict)  # split -> True once every shard is written
    format: int = FORMAT_VERSION

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY_KEYS}


def read_manifest(cache_dir: str | Path) -> Manifest:
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        raise UsageError(f"{cache_dir}: not a teacher cache (no manifest.json); run `distill generate` first")
    try:
        data = json.loads(path.read_text())
        return Manifest(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise DistillError(f"{path}: unreadable manifest ({e})") from None


def write_manifest(cache_dir: str | Path, m: Manifest) -> None:
    atomic_write_text(Path(cache_dir) / "manifest.json", json.dumps(m.__dict__, indent=1))


def open_for_writing(cache_dir: str | Path, wanted: Manifest) -> Manifest:
    """Start a cache, or resume one made by the same teacher/tokenizer/k/data; refuse anything else."""
    cache_dir = Path(cache_dir)
    if (cache_dir / "manifest.json").is_file():
        old = read_manifest(cache_dir)
        diffs = [f"{k}: cache has {old.identity()[k]!r}, this run has {wanted.identity()[k]!r}"
                 for k in IDENTITY_KEYS if old.identity()[k] != wanted.identity()[k]]
        if diffs:
            raise UsageError(f"{cache_dir}: made by a different teacher run, refusing to mix outputs ("
                             + "; ".join(diffs) + "). Use another --out or delete that directory.")
        old.shards = [s for s in old.shards if _shard_ok(cache_dir, s)]
        return old
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(cache_dir, wanted)
    return wanted


def _shard_ok(cache_dir: Path, s: dict) -> bool:
    p = cache_dir / s["file"]
    return p.is_file() and sha256_file(p) == s["sha256"]


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.safetensors"


def write_shard(cache_dir: str | Path, m: Manifest, split: str, number: int, start: int,
                tensors: dict[str, torch.Tensor]) -> None:
    cache_dir = Path(cache_dir)
    name = shard_name(split, number)
    atomic_write_bytes(cache_dir / name, save({k: v.contiguous() for k, v in tensors.items()}))
    m.shards = [s for s in m.shards if s["file"] != name]
    m.shards.append({"file": name, "split": split, "number": number, "start": start,
                     "count": int(tensors["index"].numel()), "sha256": sha256_file(cache_dir / name),
                     "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
    m.shards.sort(key=lambda s: (s["split"], s["number"]))
    write_manifest(cache_dir, m)


def done_shards(m: Manifest, split: str) -> set[int]:
    return {s["number"] for s in m.shards if s["split"] == split}


def load_split(cache_dir: str | Path, split: str, expect_count: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate a split's shards after checking each checksum; refuses incomplete caches."""
    cache_dir = Path(cache_dir)
    m = read_manifest(cache_dir)
    if not m.complete.get(split):
        raise UsageError(f"{cache_dir}: split '{split}' is incomplete; run the same `distill generate` again to finish it")
    parts = []
    for s in (s for s in m.shards if s["split"] == split):
        if not _shard_ok(cache_dir, s):
            raise DistillError(f"{cache_dir / s['file']}: checksum mismatch (corrupt or truncated shard); "
                               "run `distill generate` again to regenerate it")
        parts.append(load_file(cache_dir / s["file"]))
    if not parts:
        raise UsageError(f"{cache_dir}: no shards for split '{split}'")
    out = _concat(parts, m.kind)
    if expect_count is not None and out["index"].numel() != expect_count:
        raise DistillError(f"{cache_dir}: split '{split}' has {out['index'].numel()} examples, the data has {expect_count}")
    return out


def _concat(parts, kind):
    if kind == "soft_labels":
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out = {}
    for key in ("index", "topk_ids", "topk_logprobs", "tail_mass", "positions", "input_ids"):
        out[key] = torch.cat([p[key] for p in parts])
    for off_key in ("seq_offsets", "pos_offsets"):  # offsets restart in each shard: shift them
        chunks, base = [torch.zeros(1, dtype=torch.long)], 0
        for p in parts:
            chunks.append(p[off_key][1:].long() + base)
            base += int(p[off_key][-1])
        out[off_key] = torch.cat(chunks)
    return out


def example_topk(data: dict, i: int):
    """The i-th example of a loaded top-k split: (input_ids, positions, topk_ids, topk_logprobs, tail_mass)."""
    s0, s1 = int(data["seq_offsets"][i]), int(data["seq_offsets"][i + 1])
    p0, p1 = int(data["pos_offsets"][i]), int(data["pos_offsets"][i + 1])
    return (data["input_ids"][s0:s1], data["positions"][p0:p1], data["topk_ids"][p0:p1],
            data["topk_logprobs"][p0:p1], data["tail_mass"][p0:p1])


def pack_topk(rows) -> dict[str, torch.Tensor]:
    """rows: (index, input_ids, positions, topk_ids [n,k], topk_logprobs [n,k], tail_mass [n])."""
    seq_off, pos_off = [0], [0]
    for r in rows:
        seq_off.append(seq_off[-1] + len(r[1]))
        pos_off.append(pos_off[-1] + len(r[2]))
    return {
        "index": torch.tensor([r[0] for r in rows], dtype=torch.long),
        "input_ids": torch.tensor([t for r in rows for t in r[1]], dtype=torch.int32),
        "seq_offsets": torch.tensor(seq_off, dtype=torch.long),
        "positions": torch.tensor([t for r in rows for t in r[2]], dtype=torch.int32),
        "pos_offsets": torch.tensor(pos_off, dtype=torch.long),
        "topk_ids": torch.cat([torch.as_tensor(r[3], dtype=torch.int32) for r in rows]),
        "topk_logprobs": torch.cat([torch.as_tensor(r[4], dtype=torch.float32) for r in rows]),
        "tail_mass": torch.cat([torch.as_tensor(r[5], dtype=torch.float32) for r in rows]),
    }
