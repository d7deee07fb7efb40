"""Seeded, stratified train / validation / holdout splits and their fingerprint: every later stage reads
the split files written here, never the user's file."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from distill.config import TaskConfig
from distill.data.read import check_task_texts, label_set, read_rows, validate_rows
from distill.data.sampling import subset_indices, take_per_class
from distill.errors import UsageError
from distill.fileio import atomic_write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "holdout")


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    holdout: list[dict]
    labels: list[str] | None
    fingerprint: str

    def get(self, name: str) -> list[dict]:
        if name not in SPLITS:
            raise UsageError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)


def labelled_indices(task: TaskConfig, splits: Splits) -> list[int] | None:
    """The training examples whose labels a run may use (`task.labelled_examples`: the seeded stratified
    sample `subset_indices` draws, the same in every stage), or None when every one is labelled.
    Classification: the splits, their fingerprint and the cache are those of all the texts, and the budget
    only decides where training reads a gold label. Generation: the stratum is `task.stratify_field` (one
    stratum without it: a seeded sample), and prepare_splits withholds every other training response."""
    return _budget(task, splits.train) if task.labelled_examples else None


def _budget(task: TaskConfig, train: list[dict]) -> list[int]:
    key = "label" if task.type == "classification" else "group"
    return subset_indices(train, task.labelled_examples, task.split.seed, key)


def _withhold_pool_responses(task: TaskConfig, train: list[dict]) -> None:
    """Generation with a labelled budget: the responses outside it are dropped before anything is written or
    fingerprinted, so no stage can read them; the teacher writes theirs (`distill generate`)."""
    keep = set(_budget(task, train))
    for i, ex in enumerate(train):
        if i not in keep:
            ex["response"] = None


def _stratified_split(examples, fraction, seed, key):
    """Deterministic stratified split: each class keeps its share; returns (rest, taken)."""

    def count(cls, size):
        n = int(round(size * fraction))
        return 1 if fraction > 0 and n == 0 and size > 1 else n

    taken = set(take_per_class(examples, key, seed, count))
    rest = [ex for i, ex in enumerate(examples) if i not in taken]
    took = [ex for i, ex in enumerate(examples) if i in taken]
    return rest, took


def prepare_splits(task: TaskConfig, workdir: str | Path | None, recipe_src: str = "recipe",
                   with_holdout: bool = False, write: bool = True) -> Splits:
    """Load, validate and split the data; unless `write` is False, write `workdir/data/*.jsonl` and
    `split.json` (read-only commands such as `distill doctor` check the data without writing).

    The split is a pure function of the data and the split settings, so every command (and every
    rank of a distributed run) sees the same examples; the fingerprint ties caches to it.
    An official test file (`task.holdout_data`) is opened only when `with_holdout` is set, which
    only evaluation does: training and generation never read it (`split_overlaps` reads its texts,
    when the file exists, only to compare them with the training split). A holdout file that is the
    training data itself is refused.
    """
    _refuse_holdout_is_data(task, recipe_src)
    check_task_texts(task, recipe_src)
    rows = read_rows(task.data)
    labels = label_set(task, recipe_src)
    examples = validate_rows(rows, task, labels, task.data)
    if task.type == "classification" and labels is None:
        labels = sorted({ex["label"] for ex in examples})
    key = "label" if task.type == "classification" else "group"  # generation rows without one: one stratum
    sp = task.split
    if task.holdout_data:
        holdout = validate_rows(read_rows(task.holdout_data), task, labels, task.holdout_data) if with_holdout else []
        rest = examples
    else:
        rest, holdout = _stratified_split(examples, sp.holdout, sp.seed, key)
    train, validation = _stratified_split(rest, sp.validation / max(1e-9, 1 - (0 if task.holdout_data else sp.holdout)),
                                          sp.seed + 1, key)
    for name, split in (("train", train), ("validation", validation), ("holdout", holdout)):
        for i, ex in enumerate(split):
            ex["id"] = f"{name}-{i:06d}"
    if task.type == "generation" and task.labelled_examples:
        _withhold_pool_responses(task, train)
    fp = fingerprint({"train": train, "validation": validation, "labels": labels, "type": task.type,
                      "holdout": task.holdout_data or holdout})
    splits = Splits(train, validation, holdout, labels, fp)
    if write:
        write_splits(task, splits, workdir)
    return splits


def write_splits(task: TaskConfig, splits: Splits, workdir: str | Path) -> None:
    """WORKDIR/data: the split files and `split.json`, unless `split.json` already names these splits'
    fingerprint (a command that must refuse before writing anything prepares with write=False first)."""
    out = Path(workdir) / "data"
    meta_path = out / "split.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if isinstance(meta, dict) and meta.get("fingerprint") == splits.fingerprint:
            return
    except (OSError, ValueError):  # missing, unreadable or not JSON: written anew below
        pass
    for name in ("train", "validation") + (("holdout",) if not task.holdout_data else ()):
        atomic_write_text(out / f"{name}.jsonl",
                          "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in splits.get(name)))
    atomic_write_text(meta_path, json.dumps({
        "fingerprint": splits.fingerprint, "source": task.data, "holdout_source": task.holdout_data or task.data,
        "labels": splits.labels,
        "sizes": {n: len(splits.get(n)) for n in SPLITS if n != "holdout" or not task.holdout_data},
    }, indent=2))


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two data references name one file: the same built-in, the same path once resolved, or
    two files with the same bytes (a copy of the training data is still the training data)."""
    a, b = str(a), str(b)
    if a.startswith("builtin:") or b.startswith("builtin:"):
        return a == b
    pa, pb = Path(a).resolve(), Path(b).resolve()
    if pa == pb:
        return True
    if not (pa.is_file() and pb.is_file()) or pa.stat().st_size != pb.stat().st_size:
        return False
    return _sha256(pa) == _sha256(pb)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _refuse_holdout_is_data(task: TaskConfig, src: str) -> None:
    if task.holdout_data and same_file(task.holdout_data, task.data):
        raise UsageError(f"{src}: task.holdout_data: {task.holdout_data} is the training data (task.data: "
                         f"{task.data}); give a separate test file, or drop holdout_data to split one off")


