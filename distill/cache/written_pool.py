"""Teacher-written texts in the unlabelled pool (`task.written_data`, `task.written_share`).

`join_written` appends the file's texts to the training split as unlabelled rows (`label` None, `written`
True), after the data's own rows, so every data row keeps its index, its labelled budget and its cache
row; the splits' fingerprint then covers the texts, so a cache made without them (or with others) is
refused. Each text is checked again against every split (normalised as `leakage.normalize_text`) and
against the texts before it: a file written for other splits, or edited, cannot bring a held-out text
into training.

`distill generate` scores every written text (one cache for every share); training reads a seeded,
nested sample of `written_share` of them (`train_rows`: share 0.25's texts are within 0.5's), with the
teacher's soft labels alone: they are never among the labelled rows (`labelled_rows`), so never in CE.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from distill.config import Recipe, TaskConfig
from distill.data.leakage import normalize_text
from distill.data.splits import Splits, fingerprint, labelled_indices
from distill.errors import UsageError

log = logging.getLogger(__name__)


def read_written(path: str | Path) -> list[str]:
    """The texts of a written-texts file (JSONL rows with a `text`), in order."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"task.written_data: {path}: no such file; write it with `distill write-texts RECIPE`")
    out = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"{path}:{n}: expected a JSON object with a non-empty 'text'")
        out.append(text)
    return out


def is_written(example: dict) -> bool:
    return example.get("written") is True


def join_written(recipe: Recipe, splits: Splits, split_texts: dict[str, str] | None = None) -> Splits:
    """`splits` with task.written_data's texts appended to the training split as unlabelled rows (unchanged
    without written_data). `split_texts` (normalised text -> split, as write_texts.split_texts builds, the
    official holdout file included) defaults to it."""
    task = recipe.task
    if not task.written_data:
        return splits
    if split_texts is None:
        from distill.cache.write_texts import split_texts as every_split

        split_texts = every_split(recipe, splits)
    rows, seen, dropped = [], set(), {}
    for text in read_written(task.written_data):
        key = normalize_text(text)
        reason = f"in_{split_texts[key]}" if key in split_texts else "duplicate" if key in seen else None
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        seen.add(key)
        rows.append({"text": text, "label": None, "written": True, "id": f"written-{len(rows):06d}"})
    if dropped:
        log.warning("%s: %s of its texts left out of the pool (%s)", task.written_data, sum(dropped.values()),
                    ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())))
    fp = fingerprint({"data": splits.fingerprint, "written": [r["text"] for r in rows]})
    return Splits(splits.train + rows, splits.validation, splits.holdout, splits.labels, fp)


def data_rows(splits: Splits) -> int:
    """How many of the training rows are the data's own (the written ones follow them)."""
    return sum(not is_written(ex) for ex in splits.train)


def labelled_rows(task: TaskConfig, splits: Splits) -> list[int] | None:
    """The training rows whose gold label may be read: the labelled budget (drawn from the data's rows alone,
    the same draw as without written texts), else every data row; None when every row is a labelled one."""
    n = data_rows(splits)
    data = Splits(splits.train[:n], splits.validation, splits.holdout, splits.labels, splits.fingerprint)
    budget = labelled_indices(task, data)
    if budget is None and n < len(splits.train):
        return list(range(n))
    return budget


def written_sample(n: int, share: float | None, seed: int) -> list[int]:
    """Positions (sorted) of the round(share * n) written texts used: a prefix of one seeded permutation, so a
    smaller share's texts are within a larger one's."""
    take = n if share is None else int(round(share * n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:take])


def train_rows(task: TaskConfig, splits: Splits) -> list[int]:
    """The training rows a run reads: every data row and `task.written_share` of the written ones."""
    n = data_rows(splits)
    written = written_sample(len(splits.train) - n, task.written_share, task.split.seed)
    return list(range(n)) + [n + i for i in written]
