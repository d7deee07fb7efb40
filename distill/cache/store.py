"""The teacher cache: shards of soft labels or top-k log-probabilities, and a manifest that ties them
to one teacher, tokenizer, k and data fingerprint.

Layout: `manifest.json` plus `SPLIT-NNNNN.safetensors` shards. A shard is written atomically and only
then recorded in the manifest with its SHA-256, so an interrupted run leaves a cache that the same
command resumes, and a shard whose checksum does not match is regenerated, never read.

Soft-label shards hold `label_logprobs` [n, n_labels] (each full label answer's log-probability;
normalised over the label set at use) and `index` [n] (positions in the split file). Top-k shards
hold each example's token ids and, for each target position t (a token the student must predict), the
teacher's top-k ids and log-probabilities of the distribution that predicted token t (from tokens < t)
and the mass outside them; with teacher-written responses the ids are prompt + response.

Top-k numbers are stored compactly (`cache/topk_codec.py`, the manifest's `codec`); `load_split` and
`example_topk` return the decoded tensors (int32 ids, float32 log-probabilities and tail mass), whatever
the shard's encoding, so the trainer never sees the format. Format-1 shards (plain tensors) still load.

Trust: a manifest is checked on read (its fields, each shard entry's checksum and plain name, k against
the first shard), and a shard's numbers before it is written (teacher/common.py's shard_problem).

Resuming: a shard is recorded only after its file is complete; on start-up, shards whose checksum
fails are dropped (their split marked incomplete), leftover temporary files removed, and the cache
keeps its shard size, so a re-run regenerates exactly the missing shards. A lock file stops two runs
writing one cache at once. `load_split` checks a split's shards cover its examples once each, in order.

Several writers (`distill generate --worker I/N`, on machines sharing the cache's filesystem): each
holds `.lock` shared and `.worker-I.lock` exclusive, writes only the shards numbered I mod N, and
records each in manifest.json by a read-modify-write under `.manifest.lock` (so no worker's record
is lost); the manifest names N, and a worker of another N is refused. Only a run without --worker
(it takes `.lock` exclusively, so after every worker) checks the shards, writes any still missing
and marks the splits complete.

Reading at scale: `read_verified_shard` hashes the bytes it then decodes (nothing used before its
checksum matched); `split_shards` is the coverage check; train/data.py streams a split through them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save

from distill.cache import topk_codec
from distill.cache.topk_codec import _AUX, TopkExample, decode_topk, example_topk, pack_topk  # noqa: F401
from distill.errors import DistillError, UsageError, redact
from distill.fileio import atomic_write_bytes, atomic_write_text, directory_lock, open_lock_file, sha256_file
from distill.teacher.common import shard_problem

FORMAT_VERSION = 2
IDENTITY_KEYS = ("kind", "teacher", "tokenizer_hash", "k", "data_fingerprint", "labels", "max_length", "responses")
DEFAULT_CODEC = {"name": topk_codec.NAME, "bits": topk_codec.DEFAULT_BITS}


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
    # teacher-written responses: their sampling settings (part of the identity), or None
    responses: dict | None = None
    codec: dict = field(default_factory=dict)  # how top-k shards are encoded; {} = plain tensors
    shard_size: int | None = None  # examples per shard, fixed when the cache is started
    split_sizes: dict = field(default_factory=dict)  # split -> number of examples
    workers: int | None = None  # N while `generate --worker I/N` runs share the cache, until a final run completes it
    teachers: dict | None = None  # several teachers: name -> its sub-cache's record (cache/ensemble.py); no shards here

    def identity(self) -> dict:
        """What must match to resume; the teacher compared as stored (without URL credentials)."""
        return {k: redact(self.teacher) if k == "teacher" else getattr(self, k) for k in IDENTITY_KEYS}


def read_manifest(cache_dir: str | Path) -> Manifest:
    """The manifest, checked before anything trusts it: a JSON object of the known keys, shard entries
    with their checksums and plain file names inside the cache, and a `k` (label count) that the first
    shard on disk agrees with. A manifest edited by hand is refused in one line."""
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        raise UsageError(f"{cache_dir}: not a teacher cache (no manifest.json); run `distill generate` first")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict):
        raise DistillError(f"{path}: expected a JSON object, got a {type(data).__name__}; the manifest is damaged")
    data.pop("max_token_id", None)  # written by earlier versions, never read
    try:
        m = Manifest(**data)
    except TypeError as e:
        raise DistillError(f"{path}: unreadable manifest ({e})") from None
    _check_fields(path, m)
    for i, entry in enumerate(m.shards):
        _check_entry(path, i, entry)
    _check_first_shard(path, m)
    return m


_FIELD_TYPES = {"kind": str, "teacher": str, "tokenizer_hash": str, "vocab_size": int, "data_fingerprint": str,
                "max_length": int, "shards": list, "complete": dict, "split_sizes": dict, "codec": dict}
_ENTRY_TYPES = {"file": str, "split": str, "number": int, "start": int, "count": int, "sha256": str}
_SHARD_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors")


_KIND_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _check_fields(path: Path, m: Manifest) -> None:
    for key, kind in _FIELD_TYPES.items():
        if not _is(getattr(m, key), kind):
            raise DistillError(f"{path}: {key}: expected {_KIND_NAMES[kind]}, got {getattr(m, key)!r:.60}")
    if m.kind not in ("soft_labels", "topk"):
        raise DistillError(f"{path}: kind: expected soft_labels or topk, got {m.kind!r:.60}")
    if m.kind == "topk" and not (_is(m.k, int) and m.k >= 1):
        raise DistillError(f"{path}: k: expected a whole number >= 1 for a top-k cache, got {m.k!r:.60}")
    if m.labels is not None and not (isinstance(m.labels, list) and all(isinstance(x, str) for x in m.labels)):
        raise DistillError(f"{path}: labels: expected a list of label names, got {m.labels!r:.60}")


def _check_entry(path: Path, i: int, s) -> None:
    """One shard entry: every key of its type, a SHA-256, and a file name that cannot leave the cache."""
    where = f"{path}: shards[{i}]"
    if not isinstance(s, dict):
        raise DistillError(f"{where}: expected an object, got {s!r:.60}")
    for key, kind in _ENTRY_TYPES.items():
        if not _is(s.get(key), kind):
            what = "missing" if key not in s else f"expected {_KIND_NAMES[kind]}, got {s[key]!r:.60}"
            raise DistillError(f"{where}.{key}: {what}; the manifest was edited or damaged")
    if not _SHARD_FILE.fullmatch(s["file"]) or ".." in s["file"]:
        raise DistillError(f"{where}.file {s['file']!r:.80}: expected a shard file name inside the cache "
                           "(SPLIT-NNNNN.safetensors), not a path")
    if not re.fullmatch(r"[0-9a-f]{64}", s["sha256"]):
        raise DistillError(f"{where}.sha256: expected a SHA-256 (64 hex digits), got {s['sha256']!r:.80}")
    if min(s["number"], s["start"], s["count"]) < 0:
        raise DistillError(f"{where}: number, start and count must be >= 0")


def _check_first_shard(path: Path, m: Manifest) -> None:
    """The first shard on disk holds the manifest's k (top-k), or one column per label: only its header is
    read; an unreadable shard is left to the checksum checks."""
    from safetensors import safe_open

    for s in m.shards:
        shard = path.parent / s["file"]
        if not shard.is_file():
            continue
        try:
            with safe_open(str(shard), "pt") as h:
                keys = set(h.keys())
                if m.kind == "topk" and "tk_shape" in keys:
                    have, what = int(h.get_tensor("tk_shape")[1]), ("k", m.k)
                elif m.kind == "topk" and "topk_ids" in keys:
                    have, what = h.get_slice("topk_ids").get_shape()[1], ("k", m.k)
                elif m.kind == "soft_labels" and "label_logprobs" in keys and m.labels is not None:
                    have, what = h.get_slice("label_logprobs").get_shape()[1], ("the label count", len(m.labels))
                else:
                    return
        except (SafetensorError, OSError, IndexError):
            return
        if have != what[1]:
            raise DistillError(f"{path}: {what[0]} is {what[1]}, but shard {s['file']} holds {have}; the manifest "
                               "was edited: restore it, or generate into a new directory")
        return


def write_manifest(cache_dir: str | Path, m: Manifest) -> None:
    """Write the manifest atomically; the teacher is stored without URL credentials (errors.redact)."""
    atomic_write_text(Path(cache_dir) / "manifest.json", json.dumps({**m.__dict__, "teacher": redact(m.teacher)},
                                                                     indent=1))


def open_for_writing(cache_dir: str | Path, wanted: Manifest, worker: tuple[int, int] | None = None) -> Manifest:
    """Start a cache, or resume one made by the same teacher/tokenizer/k/data; refuse anything else.

    worker (I, N): one of N writers sharing the cache; only its own leftover temporary files are removed."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UsageError(f"{cache_dir}: exists and is not a directory")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with manifest_lock(cache_dir):
        for tmp in cache_dir.glob(".*.tmp"):  # left by a run killed mid-write (other workers' are theirs)
            if worker is None or _owns(tmp.name, worker) or tmp.name.startswith(".manifest.json."):
                tmp.unlink(missing_ok=True)
        if not (cache_dir / "manifest.json").is_file():
            wanted.workers = worker[1] if worker else None
            write_manifest(cache_dir, wanted)
            return wanted
        old = read_manifest(cache_dir)
        _check_resumable(cache_dir, old, wanted, worker)
        bad = [s for s in old.shards if (worker is None or _owns(s["file"], worker)) and not _shard_ok(cache_dir, s)]
        for s in bad:  # regenerated by this run; until then the split is not complete
            old.complete.pop(s["split"], None)
        old.shards = [s for s in old.shards if s not in bad]
        old.shard_size = old.shard_size or wanted.shard_size
        old.backend, old.versions = wanted.backend, wanted.versions
        if worker is not None:
            old.workers = worker[1]
        if not old.codec and not old.shards:
            old.codec = wanted.codec
        write_manifest(cache_dir, old)
        return old


def _check_resumable(cache_dir: Path, old: Manifest, wanted: Manifest, worker) -> None:
    if old.format > FORMAT_VERSION:
        raise UsageError(f"{cache_dir}: written by a newer distill (cache format {old.format}); upgrade distill")
    diffs = [f"{k}: cache has {old.identity()[k]!r}, this run has {wanted.identity()[k]!r}"
             for k in IDENTITY_KEYS if old.identity()[k] != wanted.identity()[k]]
    if diffs:
        raise UsageError(f"{cache_dir}: made by a different teacher run, refusing to mix outputs ("
                         + "; ".join(diffs) + "). Use another --out or delete that directory.")
    if worker is not None and old.workers not in (None, worker[1]):
        raise UsageError(f"{cache_dir}: being written by {old.workers} workers (--worker I/{old.workers}); "
                         f"--worker {worker[0]}/{worker[1]} would write shards of theirs. Use I/{old.workers}, "
                         "or finish with a run without --worker first")


def _owns(file_name: str, worker: tuple[int, int]) -> bool:
    """Whether a shard file (or its temporary file) is one worker (I, N) writes: shard numbers I mod N."""
    stem = file_name.lstrip(".").split(".safetensors")[0]
    number = stem.rsplit("-", 1)[-1]
    return number.isdigit() and int(number) % worker[1] == worker[0]


@contextlib.contextmanager
def manifest_lock(cache_dir: str | Path):
    """Held (blocking, briefly) around every read-modify-write of manifest.json, so writers sharing a
    cache never lose each other's records."""
    import fcntl

    with open_lock_file(Path(cache_dir) / ".manifest.lock") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def writer_lock(cache_dir: str | Path, worker: tuple[int, int] | None = None):
    """Hold `cache_dir/.lock` while writing; a second writer is refused (the OS frees it on any exit).

    A worker (I, N) holds `.lock` shared (other workers may write beside it; a run without --worker,
    which holds it exclusively, may not) and `.worker-I.lock` exclusively (one process per I)."""
    if worker is None:
        return directory_lock(cache_dir, "another `distill generate` ({holder}) is writing this cache; wait for it "
                              "or stop it")
    return _worker_locks(Path(cache_dir), worker)


@contextlib.contextmanager
def _worker_locks(cache_dir: Path, worker: tuple[int, int]):
    import fcntl

    cache_dir.mkdir(parents=True, exist_ok=True)
    with open_lock_file(cache_dir / ".lock") as shared:
        try:
            fcntl.flock(shared.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            shared.seek(0)
            holder = shared.read().strip() or "another process"
            raise UsageError(f"{cache_dir}: a `distill generate` without --worker ({holder}) is writing this cache; "
                             "wait for it or stop it") from None
        with directory_lock(cache_dir / f".worker-{worker[0]}", f"worker {worker[0]}/{worker[1]} is already "
                            "running ({holder}); give each worker its own I"):
            yield


def _shard_ok(cache_dir: Path, s: dict) -> bool:
    p = cache_dir / s["file"]
    return p.is_file() and sha256_file(p) == s["sha256"]


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.safetensors"


def write_shard(cache_dir: str | Path, m: Manifest, split: str, number: int, start: int,
                tensors: dict[str, torch.Tensor], on_written=None, worker: tuple[int, int] | None = None,
                encoded: bool = False) -> None:
    """Write one shard atomically, then record it (with its checksum) in the manifest: the manifest on
    disk is re-read under its lock and this shard's entry merged in, and `m` follows it.

    Top-k shards are encoded with the manifest's codec (`encoded`: `tensors` already are, by
    `encode_topk`). `on_written` runs between the two steps (tests use it to stop a run exactly there)."""
    cache_dir = Path(cache_dir)
    name = shard_name(split, number)
    count = int(tensors["index_zi"][0]) if encoded else int(tensors["index"].numel())
    if not encoded:
        _check_numbers(m, split, number, tensors)
    if m.kind == "topk" and m.codec and not encoded:
        tensors = encode_topk(tensors, m)
    atomic_write_bytes(cache_dir / name, save({k: v.contiguous() for k, v in tensors.items()}))
    if on_written is not None:
        on_written(name)
    entry = {"file": name, "split": split, "number": number, "start": start, "count": count,
             "sha256": sha256_file(cache_dir / name), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if worker is not None:
        entry["worker"] = f"{worker[0]}/{worker[1]}"
    with manifest_lock(cache_dir):
        disk = read_manifest(cache_dir)
        m.shards = [s for s in disk.shards if s["file"] != name] + [entry]
        m.shards.sort(key=lambda s: (s["split"], s["number"]))
        m.complete, m.split_sizes = disk.complete, disk.split_sizes
        write_manifest(cache_dir, m)


def _check_numbers(m: Manifest, split: str, number: int, tensors: dict[str, torch.Tensor]) -> None:
    problem = shard_problem(m.kind, tensors, m.vocab_size)
    if problem:
        raise DistillError(f"teacher backend {m.backend or '?'} ({redact(m.teacher)}): {split} shard {number}: "
                           f"{problem}; nothing of this shard was cached")


def encode_topk(tensors: dict[str, torch.Tensor], m: Manifest) -> dict[str, torch.Tensor]:
    name = m.codec.get("name")
    if name not in topk_codec.PACKERS:  # a cache keeps the codec it was started with
        raise DistillError(f"cache codec {name!r} is unknown to this distill (known: {', '.join(topk_codec.PACKERS)})")
    vocab = max(m.vocab_size or 0, int(tensors["topk_ids"].max()) + 1 if tensors["topk_ids"].numel() else 1)
    out = topk_codec.encode(tensors["topk_ids"], tensors["topk_logprobs"], tensors["tail_mass"], vocab,
                            bits=int(m.codec.get("bits", topk_codec.DEFAULT_BITS)),
                            preset=int(m.codec.get("preset", 6)), name=name)
    for key in _AUX:
        out[key + "_z"], out[key + "_zi"] = topk_codec.pack_ints(tensors[key], name)
    return out


def done_shards(m: Manifest, split: str) -> set[int]:
    return {s["number"] for s in m.shards if s["split"] == split}


def mark_complete(cache_dir: str | Path, m: Manifest, split: str, size: int) -> None:
    with manifest_lock(cache_dir):
        m.complete[split] = True
        m.split_sizes[split] = size
        write_manifest(cache_dir, m)


def workers_done(cache_dir: str | Path, m: Manifest) -> None:
    """After a final run completed a cache that workers shared: no workers any more."""
    with manifest_lock(cache_dir):
        m.workers = None
        write_manifest(cache_dir, m)


def read_shard(cache_dir: str | Path, s: dict, kind: str) -> dict[str, torch.Tensor]:
    path = Path(cache_dir) / s["file"]
    try:
        data = load_file(path)
    except (SafetensorError, OSError) as e:
        raise DistillError(f"{path}: unreadable shard ({e}); run `distill generate` again to regenerate it") from None
    return _decoded(path, s, kind, data)


def read_verified_shard(cache_dir: str | Path, s: dict, kind: str, ranked: bool = True) -> dict[str, torch.Tensor]:
    """One shard, decoded, from bytes whose SHA-256 matched the manifest's (read once: what is
    decoded is what was checked). A mismatch is refused, naming the file. `ranked`: see decode_topk."""
    path = Path(cache_dir) / s["file"]
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DistillError(f"{path}: unreadable shard ({e}); run `distill generate` again to regenerate it") from None
    if hashlib.sha256(raw).hexdigest() != s["sha256"]:
        raise DistillError(f"{path}: checksum mismatch (corrupt or truncated shard); "
                           "run `distill generate` again to regenerate it")
    try:
        data = load_bytes(raw)
    except SafetensorError as e:
        raise DistillError(f"{path}: unreadable shard ({e}); run `distill generate` again to regenerate it") from None
    return _decoded(path, s, kind, data, ranked)


def _decoded(path: Path, s: dict, kind: str, data: dict, ranked: bool = True) -> dict[str, torch.Tensor]:
    if kind == "topk":
        try:
            data = decode_topk(data, ranked)
        except (ValueError, KeyError) as e:
            raise DistillError(f"{path}: corrupt top-k shard ({e})") from None
    if int(data["index"].numel()) != s["count"]:
        raise DistillError(f"{path}: holds {int(data['index'].numel())} examples, the manifest says {s['count']}")
    return data


def split_shards(cache_dir: str | Path, m: Manifest, split: str) -> list[dict]:
    """A complete split's shard entries in order, checked to cover its examples once each (no gap, no
    overlap, the split's recorded size); files are not read."""
    if not m.complete.get(split):
        raise UsageError(f"{cache_dir}: split '{split}' is incomplete; run the same `distill generate` again to "
                         "finish it")
    shards = sorted((s for s in m.shards if s["split"] == split), key=lambda s: s["number"])
    if not shards:
        raise UsageError(f"{cache_dir}: no shards for split '{split}'")
    covered = 0
    for s in shards:  # each example once, in order: no gap, no overlap
        if s["start"] != covered:
            raise DistillError(f"{cache_dir}: split '{split}': shard {s['file']} starts at example {s['start']}, "
                               f"expected {covered} (missing or overlapping shards); run `distill generate` again")
        covered += s["count"]
    if split in m.split_sizes and covered != m.split_sizes[split]:
        raise DistillError(f"{cache_dir}: split '{split}': shards hold {covered} examples, the split has "
                           f"{m.split_sizes[split]}; run `distill generate` again")
    return shards


def load_split(cache_dir: str | Path, split: str, expect_count: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate a split's shards after checking each checksum; refuses incomplete caches.

    Top-k splits come back decoded: index, input_ids (int32), seq_offsets, positions (int32),
    pos_offsets, topk_ids (int32) [N, k], topk_logprobs (float32) [N, k], tail_mass (float32) [N].
    Training streams top-k splits instead (distill/train/data.py); this holds all of one in memory."""
    cache_dir = Path(cache_dir)
    m = read_manifest(cache_dir)
    parts = [read_verified_shard(cache_dir, s, m.kind) for s in split_shards(cache_dir, m, split)]
    out = _concat(parts, m.kind)
    if expect_count is not None and out["index"].numel() != expect_count:
        raise DistillError(f"{cache_dir}: split '{split}' has {out['index'].numel()} examples, the data has "
                           f"{expect_count}")
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
