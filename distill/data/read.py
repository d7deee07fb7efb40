"""Reading and validating a user's data file (JSONL or CSV) or the built-in task: one row at a time, each
error naming the file, line and key."""
from __future__ import annotations

import csv
import json
import logging
import unicodedata
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


def _utf8_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    text = _utf8_text(path, "utf-8-sig")
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
    """The label set named by the recipe (`task.labels`), its labels file, or the built-in task; None when the
    data rows name the classes. Every label is checked as a class name (`check_label_names`)."""
    if task.labels:  # exact repeats: checked with the recipe (config.validate_recipe)
        labels = list(task.labels)
        return check_label_names([(lab, f"task.labels[{i}]") for i, lab in enumerate(labels)], f"{src}: task.labels")
    if task.labels_file:
        p = Path(task.labels_file)
        if not p.is_file():
            raise UsageError(f"{src}: task.labels_file: no such file {p}")
        return check_label_names(_read_labels_file(p), str(p))
    if task.data == "builtin:default":
        return list(builtin_task.LABELS)
    return None


def _read_labels_file(p: Path) -> list[tuple[str, str]]:
    """A JSON list of names (`.json`) or one name a line, each with where it is (`line 3`, `item 3`)."""
    text = _utf8_text(p)
    if not text.strip():
        what = "a JSON list of label names" if p.suffix == ".json" else "one label name a line"
        raise UsageError(f"{p}: the labels file is empty; expected {what}")
    if p.suffix != ".json":  # a line's surrounding spaces are the file's layout, not the name
        return [(x.strip(), f"line {n}") for n, x in enumerate(text.split("\n"), start=1) if x.strip()]
    try:
        labels = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{p}:{e.lineno}: not valid JSON ({e.msg}); expected a JSON list of label names") from None
    if not isinstance(labels, list) or not labels:
        raise UsageError(f"{p}: expected a JSON list of label names")
    return [(x, f"item {i}") for i, x in enumerate(labels, start=1)]


def label_key(label: str) -> str:
    """The form in which labels are compared for collisions: NFKC, casefolded, each run of whitespace one
    space, stripped. Two labels with one key would be one class to a reader but two to the model."""
    return " ".join(unicodedata.normalize("NFKC", label).casefold().split())


def label_problem(label) -> str | None:
    """Why `label` cannot name a class (it is written into prompts, split files and model cards, and
    may become a token of the student), or None when it can."""
    if isinstance(label, bool) or not isinstance(label, str):
        return f"is {type(label).__name__} {label!r}, not text; write label names as strings"
    if not label.strip():
        return "is empty; expected a name"
    bad = next((c for c in label if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")), None)
    if bad is not None:
        what = "a lone surrogate (not Unicode text)" if unicodedata.category(bad) == "Cs" else (
            "a line break" if bad in "\n\r\u2028\u2029\x85" else "a control character")
        return f"holds {what} (U+{ord(bad):04X}); a label is one line of text"
    if label != label.strip():
        return "has spaces at its start or end; expected the name alone"
    return None


def check_label_names(labels: list[tuple[str, str]], where: str) -> list[str]:
    """The label names of (name, its place) pairs, refused when one is not a usable name or two are one
    name after `label_key` (a repeat would collapse its classes' rows and skew macro-F1; a case or
    spacing variant splits one class in two without a word)."""
    seen: dict[str, tuple[str, str]] = {}
    for lab, place in labels:
        problem = label_problem(lab)
        if problem:
            raise UsageError(f"{where}: label {lab!r} ({place}) {problem}")
        key = label_key(lab)
        if key in seen:
            first, first_place = seen[key]
            if first == lab:
                raise UsageError(f"{where}: label {lab!r} appears more than once ({first_place} and {place}); "
                                 "expected distinct label names")
            raise UsageError(f"{where}: labels {first!r} ({first_place}) and {lab!r} ({place}) differ only in "
                             "case or spacing; expected distinct names (rename or merge one)")
        seen[key] = (lab, place)
    return [lab for lab, _ in labels]


def validate_rows(rows, task: TaskConfig, labels: list[str] | None, src) -> list[dict]:
    """Check fields and labels; drop exact duplicates (with a warning) so no text lands in two splits."""
    if task.type == "generation" and task.prompt is not None:
        return _fixed_prompt_rows(rows, task, src)
    if task.type not in ("classification", "generation"):
        raise UsageError(f"task.type: expected 'classification' or 'generation', got {task.type!r}")
    out, seen, dupes = [], set(), 0
    allowed = set(labels) if labels else None
    first_seen: dict[str, tuple[str, int]] = {}  # label_key -> (label, line): a class's first row
    for line, row in rows:
        if task.type == "classification":
            _require(row, (task.text_field, task.label_field), src, line)
            a = _field_text(row, task.text_field, src, line)
            ex = {"text": a, "label": _row_label(row, task.label_field, src, line, allowed, first_seen)}
        else:
            has_response = row.get(task.response_field) not in (None, "")
            _require(row, (task.prompt_field,) + ((task.response_field,) if has_response else ()), src, line)
            a = _field_text(row, task.prompt_field, src, line)  # no response: the teacher writes one
            ex = {"prompt": a, "response": _field_text(row, task.response_field, src, line) if has_response else None}
            if task.stratify_field is not None:
                _require(row, (task.stratify_field,), src, line)
                ex["group"] = _field_text(row, task.stratify_field, src, line)
        if a in seen:
            dupes += 1
            continue
        seen.add(a)
        out.append(ex)
    if dupes:
        log.warning("%s: dropped %d duplicate examples (same text)", src, dupes)
    if task.max_examples:
        key = "label" if task.type == "classification" else "group" if task.stratify_field else None
        out = [out[i] for i in subset_indices(out, task.max_examples, task.split.seed, key)]
    return out


def check_task_texts(task: TaskConfig, src) -> None:
    """The recipe's own texts that enter every prompt (`task.instruction`, `task.prompt`) as Unicode text: a
    YAML `"\\ud800"` escape gives a lone surrogate, which no tokenizer or file takes."""
    for key in ("instruction", "prompt"):
        text = getattr(task, key)
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as e:
            raise UsageError(f"{src}: task.{key}: holds a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                             f"{e.start + 1}: not Unicode text; fix the \\u escapes") from None


def _require(row: dict, fields, src, line) -> None:
    for f in fields:
        if f not in row or row[f] is None:
            raise UsageError(f"{src}:{line}: missing field '{f}' (fields present: {', '.join(map(str, row))})")


def _field_text(row: dict, f: str, src, line) -> str:
    """Field `f` of a row as text: a string or a number (written as its digits), non-empty, valid Unicode."""
    value = row[f]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UsageError(f"{src}:{line}: field '{f}' must be text, got {type(value).__name__} {_short(value)}")
    text = str(value)
    if not text.strip():
        raise UsageError(f"{src}:{line}: field '{f}' is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON lets `\ud800` stand alone; no tokenizer or file can hold it
        raise UsageError(f"{src}:{line}: field '{f}' holds a lone surrogate (U+{ord(text[e.start]):04X}) at "
                         f"character {e.start + 1}: not Unicode text; fix the \\u escapes") from None
    return text


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _row_label(row: dict, f: str, src, line, allowed: set[str] | None, first_seen: dict) -> str:
    """A row's label: one of `allowed` when the label set is given, else a usable name (`label_problem`)
    that no earlier row wrote differently in case or spacing."""
    lab = _field_text(row, f, src, line)
    if allowed is not None:
        if lab not in allowed:
            hint = _near_label_hint(lab, allowed)
            raise UsageError(f"{src}:{line}: label {lab!r} is not in the label set ({len(allowed)} labels, "
                             f"e.g. {', '.join(sorted(allowed)[:5])}){hint}")
        return lab
    problem = label_problem(lab)
    if problem:
        raise UsageError(f"{src}:{line}: label {lab!r} {problem}")
    first, first_line = first_seen.setdefault(label_key(lab), (lab, line))
    if first != lab:
        raise UsageError(f"{src}:{line}: label {lab!r} and label {first!r} (line {first_line}) differ only in case "
                         "or spacing; expected one name per class (fix the data, or give task.labels)")
    return lab


def _near_label_hint(lab: str, allowed: set[str]) -> str:
    """Why a label missing from the set may have been meant as one of it: a case or spacing variant (a
    recipe's unquoted YAML numbers, `[01, 02]`, are refused by config before data is read)."""
    near = [x for x in allowed if label_key(x) == label_key(lab)]
    if near:
        return f"; did you mean {near[0]!r} (it differs only in case or spacing)?"
    return ""


def _fixed_prompt_rows(rows, task: TaskConfig, src) -> list[dict]:
    """Generation rows under one fixed prompt (`task.prompt`): each row's `response_field` is its response,
    so any text pool (a classification file's texts, unlabelled texts) is learnt as language. Duplicate
    texts are dropped like duplicate prompts elsewhere; `task.max_examples` takes a seeded sample."""
    out, seen, f = [], set(), task.response_field
    for line, row in rows:
        _require(row, (f,), src, line)
        text = _field_text(row, f, src, line)
        if text not in seen:
            seen.add(text)
            out.append({"prompt": task.prompt, "response": text})
    if len(out) < len(rows):
        log.warning("%s: dropped %d duplicate examples (same text)", src, len(rows) - len(out))
    if task.max_examples and task.max_examples < len(out):  # a seeded sample: such files are often sorted by label
        import random

        out = [out[i] for i in sorted(random.Random(task.split.seed).sample(range(len(out)), task.max_examples))]
    return out


