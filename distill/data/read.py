"""Reading and validating a user's data file (JSONL or CSV) or the built-in task: one row at a time, each
error naming the file, line and key."""
from __future__ import annotations


import csv
import hashlib
import json
import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import TaskConfig
from distill.data import builtin_task
from distill.data.sampling import subset_indices
from distill.errors import UsageError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "holdout")


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """Rows of a JSONL, JSON, CSV or `datasets`-loadable file, each with its 1-based line number."""
    path_str = str(path)
    if path_str.startswith("builtin:"):
        name = path_str.split(":", 1)[1]
        if name != "default":
            raise UsageError(f"{path_str}: unknown built-in dataset; known: builtin:default")
        return [(i + 1, r) for i, r in enumerate(builtin_task.make_examples())]
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_file() and path.stat().st_size == 0:
        raise UsageError(f"{path}: the file is empty; expected one example per line")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: not valid UTF-8 JSON ({e})") from None
        if not isinstance(data, list):
            raise UsageError(f"{path}: expected a JSON list of objects")
        return [(i + 1, r) for i, r in enumerate(data)]
    try:  # parquet, arrow, or a dataset directory
        import datasets

        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(suffix.lstrip("."), data_files=str(path), split="train")
        return [(i + 1, dict(r)) for i, r in enumerate(ds)]
    except Exception as e:  # noqa: BLE001 - we only want to name the file and the cause
        raise UsageError(f"{path}: could not read it as a dataset ({type(e).__name__}: {e})") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"{path}:{n}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: not valid JSON ({e.msg}); expected one JSON object a line") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    if not rows:
        raise UsageError(f"{path}: no examples in the file")
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    reader = csv.DictReader(text.splitlines())
    rows = []
    for r in reader:
        if None in r:
            raise UsageError(f"{path}:{reader.line_num}: more fields than the header has")
        rows.append((reader.line_num, r))
    if not rows:
        raise UsageError(f"{path}: no examples in the file")
    return rows


def label_set(task: TaskConfig, src: str) -> list[str] | None:
    if task.labels:  # distinct: checked with the recipe (config.validate_recipe)
        return list(task.labels)
    if task.labels_file:
        p = Path(task.labels_file)
        if not p.is_file():
            raise UsageError(f"{src}: task.labels_file: no such file {p}")
        return _distinct_labels(_read_labels_file(p), str(p))
    if task.data == "builtin:default":
        return list(builtin_task.LABELS)
    return None


def _read_labels_file(p: Path) -> list[str]:
    """A JSON list of names (`.json`) or one name a line."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{p}: not UTF-8 text") from None
    if not text.strip():
        what = "a JSON list of label names" if p.suffix == ".json" else "one label name a line"
        raise UsageError(f"{p}: the labels file is empty; expected {what}")
    if p.suffix != ".json":
        return [x.strip() for x in text.splitlines() if x.strip()]
    try:
        labels = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{p}:{e.lineno}: not valid JSON ({e.msg}); expected a JSON list of label names") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise UsageError(f"{p}: expected a JSON list of label names")
    return labels


def _distinct_labels(labels: list[str], path: str) -> list[str]:
    """Duplicate names would collapse their classes' rows (and skew macro-F1): refuse them."""
    for i, x in enumerate(labels):
        if x in labels[:i]:
            raise UsageError(f"{path}: label {x!r} appears more than once; expected distinct label names")
    return labels


def validate_rows(rows, task: TaskConfig, labels: list[str] | None, src) -> list[dict]:
    """Check fields and labels; drop exact duplicates (with a warning) so no text lands in two splits."""
    out, seen, dupes = [], set(), 0
    if task.type == "classification":
        fields = (task.text_field, task.label_field)
    elif task.type == "generation" and task.prompt is not None:
        return _fixed_prompt_rows(rows, task, src)
    elif task.type == "generation":
        fields = (task.prompt_field, task.response_field)
    else:
        raise UsageError(f"task.type: expected 'classification' or 'generation', got {task.type!r}")
    allowed = set(labels) if labels else None
    for line, row in rows:
        for f in fields:
            if task.type == "generation" and f == task.response_field and row.get(f) in (None, ""):
                continue  # no response: the teacher writes one (`distill generate`, generate.responses)
            if f not in row or row[f] is None:
                raise UsageError(f"{src}:{line}: missing field '{f}' (fields present: {', '.join(map(str, row))})")
            if not isinstance(row[f], (str, int)) or isinstance(row[f], bool):
                raise UsageError(f"{src}:{line}: field '{f}' must be text, got {type(row[f]).__name__}")
        a, b = str(row[fields[0]]), row.get(fields[1])
        b = None if b in (None, "") else str(b)
        if not a.strip():
            raise UsageError(f"{src}:{line}: field '{fields[0]}' is empty")
        if task.type == "classification":
            if allowed is not None and b not in allowed:
                raise UsageError(f"{src}:{line}: label {b!r} is not in the label set ({len(allowed)} labels, "
                                 f"e.g. {', '.join(sorted(allowed)[:5])})")
            ex = {"text": a, "label": b}
        else:
            ex = {"prompt": a, "response": b}  # response None: the teacher writes it
        key = a
        if key in seen:
            dupes += 1
            continue
        seen.add(key)
        out.append(ex)
    if dupes:
        log.warning("%s: dropped %d duplicate examples (same text)", src, dupes)
    if task.max_examples:
        key = "label" if task.type == "classification" else None
        out = [out[i] for i in subset_indices(out, task.max_examples, task.split.seed, key)]
    return out


def _fixed_prompt_rows(rows, task: TaskConfig, src) -> list[dict]:
    """Generation rows under one fixed prompt (`task.prompt`): each row's `response_field` is its response,
    so any text pool (a classification file's texts, unlabelled texts) is learnt as language. Duplicate
    texts are dropped like duplicate prompts elsewhere; `task.max_examples` takes a seeded sample."""
    out, seen, f = [], set(), task.response_field
    for line, row in rows:
        text = row.get(f)
        if text is None or isinstance(text, bool) or not isinstance(text, (str, int)):
            raise UsageError(f"{src}:{line}: field '{f}' (task.response_field, the text under task.prompt) must be "
                             f"text, got {'nothing' if text is None else type(text).__name__}")
        if not str(text).strip():
            raise UsageError(f"{src}:{line}: field '{f}' is empty")
        if str(text) not in seen:
            seen.add(str(text))
            out.append({"prompt": task.prompt, "response": str(text)})
    if len(out) < len(rows):
        log.warning("%s: dropped %d duplicate examples (same text)", src, len(rows) - len(out))
    if task.max_examples and task.max_examples < len(out):  # a seeded sample: such files are often sorted by label
        import random

        out = [out[i] for i in sorted(random.Random(task.split.seed).sample(range(len(out)), task.max_examples))]
    return out


