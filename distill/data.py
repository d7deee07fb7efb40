"""Reading, validating and splitting data: every later stage reads the split files written here."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from . import default_task
from .config import TaskConfig
from .errors import UsageError
from .fileio import atomic_write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "holdout")


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """Rows of a JSONL, JSON, CSV or `datasets`-loadable file, each with its 1-based line number."""
    path_str = str(path)
    if path_str.startswith("builtin:"):
        name = path_str.split(":", 1)[1]
        if name != "default":
            raise UsageError(f"{path_str}: unknown built-in dataset; known: builtin:default")
        return [(i + 1, r) for i, r in enumerate(default_task.make_examples())]
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
        return list(default_task.LABELS)
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
    sample `subset_indices` draws, the same in every stage), or None when every one is labelled. The
    splits, their fingerprint and the cache are those of all the texts: the budget only decides where
    training reads a gold label."""
    if task.type != "classification" or not task.labelled_examples:
        return None
    return subset_indices(splits.train, task.labelled_examples, task.split.seed)


def _take_per_class(examples: list[dict], key: str | None, seed: int, count) -> list[int]:
    """Sorted indices of `count(cls, size)` examples of each class: every class shuffled, in sorted
    class order, by one generator seeded with `seed` (the same draw for the same data and seed)."""
    import random

    by_class: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_class.setdefault(str(ex.get(key, "")), []).append(i)
    rng = random.Random(seed)
    taken = []
    for cls in sorted(by_class):
        idx = by_class[cls][:]
        rng.shuffle(idx)
        taken += idx[: count(cls, len(idx))]
    return sorted(taken)


def subset_indices(examples: list[dict], n: int | None, seed: int, key: str | None = "label") -> list[int]:
    """Indices (in order) of an n-example subset: for labelled examples a seeded stratified sample, each
    class keeping its share (largest remainders first), so a subset of a file sorted by label (as
    Banking77 is) still covers every class; without `key`, the first n."""
    from collections import Counter

    if not n or n >= len(examples):
        return list(range(len(examples)))
    if key is None:
        return list(range(n))
    sizes = Counter(str(ex.get(key, "")) for ex in examples)
    exact = {c: n * size / len(examples) for c, size in sizes.items()}
    quota = {c: int(x) for c, x in exact.items()}
    for c in sorted(sizes, key=lambda c: (-(exact[c] - quota[c]), c))[: n - sum(quota.values())]:
        quota[c] += 1
    return _take_per_class(examples, key, seed, lambda cls, size: quota[cls])


def _stratified_split(examples, fraction, seed, key):
    """Deterministic stratified split: each class keeps its share; returns (rest, taken)."""

    def count(cls, size):
        n = int(round(size * fraction))
        return 1 if fraction > 0 and n == 0 and size > 1 else n

    taken = set(_take_per_class(examples, key, seed, count))
    rest = [ex for i, ex in enumerate(examples) if i not in taken]
    took = [ex for i, ex in enumerate(examples) if i in taken]
    return rest, took


def prepare_splits(task: TaskConfig, workdir: str | Path, recipe_src: str = "recipe",
                   with_holdout: bool = False) -> Splits:
    """Load, validate and split the data; write `workdir/data/*.jsonl` and `split.json`.

    The split is a pure function of the data and the split settings, so every command (and every
    rank of a distributed run) sees the same examples; the fingerprint ties caches to it.
    An official test file (`task.holdout_data`) is opened only when `with_holdout` is set, which
    only evaluation does: training and generation never read it (`split_overlaps` reads its texts,
    when the file exists, only to compare them with the training split). A holdout file that is the
    training data itself is refused.
    """
    _refuse_holdout_is_data(task, recipe_src)
    rows = read_rows(task.data)
    labels = label_set(task, recipe_src)
    examples = validate_rows(rows, task, labels, task.data)
    if task.type == "classification" and labels is None:
        labels = sorted({ex["label"] for ex in examples})
    key = "label" if task.type == "classification" else "__none__"
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
    fp = fingerprint({"train": train, "validation": validation, "labels": labels, "type": task.type,
                      "holdout": task.holdout_data or holdout})
    splits = Splits(train, validation, holdout, labels, fp)
    out = Path(workdir) / "data"
    meta_path = out / "split.json"
    if meta_path.exists():
        try:
            if json.loads(meta_path.read_text()).get("fingerprint") == fp:
                return splits
        except json.JSONDecodeError:
            pass
    for name in ("train", "validation") + (("holdout",) if not task.holdout_data else ()):
        atomic_write_text(out / f"{name}.jsonl",
                          "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in splits.get(name)))
    atomic_write_text(meta_path, json.dumps({
        "fingerprint": fp, "source": task.data, "holdout_source": task.holdout_data or task.data,
        "labels": labels, "sizes": {n: len(splits.get(n)) for n in SPLITS if n != "holdout" or not task.holdout_data},
    }, indent=2))
    return splits


# ---------------------------------------------------------------------------------------------
# leakage: texts of the holdout (or of an evaluated file) that the training split also has


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


def normalize_text(text: str) -> str:
    """The form in which texts are compared for leakage: NFKC, casefolded, each run of whitespace one
    space, stripped ("Where is my PARCEL  " and "where is my parcel" are the same text)."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())


@dataclass
class OverlapReport:
    """The texts of `other` (a holdout, validation split or evaluated file) that `train` also has."""

    train_name: str
    other_name: str
    total: int  # texts in `other`
    exact: int  # of them found in `train` character for character
    normalized: int  # of them found in `train` after normalize_text (the exact ones included)
    examples: list[str] = field(default_factory=list)  # a few of them, as `other` writes them

    def __bool__(self) -> bool:
        return self.normalized > 0

    def message(self) -> str:
        return (f"{self.other_name}: {self.normalized} of {self.total} texts also occur in {self.train_name} "
                f"({self.exact} exact, {self.normalized - self.exact} more after normalising case and whitespace), "
                f"e.g. {'; '.join(map(repr, self.examples))}; scores on them measure memory, not generalisation")


def _texts(examples, text_field: str) -> list[str]:
    """The texts of examples given as dicts (their `text_field`) or as plain strings."""
    out = []
    for ex in examples:
        t = ex if isinstance(ex, str) else ex.get(text_field)
        if isinstance(t, (str, int)) and not isinstance(t, bool):
            out.append(str(t))
    return out


def overlap(train_examples, other_examples, text_field: str = "text", train_name: str = "the training split",
            other_name: str = "the holdout", max_examples: int = 3) -> OverlapReport:
    """Count the texts of `other_examples` that occur in `train_examples`, exactly and after
    `normalize_text`. Examples are dicts (read at `text_field`: "text" for the classification
    examples of `prepare_splits`, "prompt" for generation; see `text_field_of`) or strings."""
    train = _texts(train_examples, text_field)
    exact_set, norm_set = set(train), {normalize_text(t) for t in train}
    other = _texts(other_examples, text_field)
    exact = normalized = 0
    examples = []
    for t in other:
        if t in exact_set:
            exact += 1
        elif normalize_text(t) not in norm_set:
            continue
        normalized += 1
        if len(examples) < max_examples:
            examples.append(t)
    return OverlapReport(train_name, other_name, len(other), exact, normalized, examples)


def text_field_of(task: TaskConfig) -> str:
    """The field of `prepare_splits`' examples that holds the input text (under a fixed prompt, the response)."""
    if task.type == "classification":
        return "text"
    return "response" if task.prompt is not None else "prompt"


def split_overlaps(task: TaskConfig, splits: Splits) -> list[OverlapReport]:
    """Validation vs train, holdout vs train and holdout vs validation, one report each. The holdout is
    `splits.holdout`, or, when that was not read, the texts of `task.holdout_data` if the file exists
    (training and generation run without it, so a missing or unreadable one is skipped here)."""
    where, f = f" of {task.data}", text_field_of(task)
    holdout, holdout_name = splits.holdout, f"the holdout split{where}"
    if task.holdout_data:
        holdout_name = f"task.holdout_data {task.holdout_data}"
        if not holdout:
            holdout = _holdout_texts(task.holdout_data, task)
    train_name, val_name = f"the training split{where}", f"the validation split{where}"
    return [overlap(splits.train, splits.validation, f, train_name, val_name),
            overlap(splits.train, holdout, f, train_name, holdout_name),
            overlap(splits.validation, holdout, f, val_name, holdout_name)]


def _holdout_texts(path: str, task: TaskConfig) -> list[str]:
    if not path.startswith("builtin:") and not Path(path).exists():
        return []
    field_name = task.text_field if task.type == "classification" else (
        task.response_field if task.prompt is not None else task.prompt_field)
    try:
        return _texts((row for _, row in read_rows(path)), field_name)
    except UsageError as e:  # eval, which reads it, will refuse it with this message
        log.warning("could not compare task.holdout_data with the training split: %s", e)
        return []


def warn_overlaps(reports: list[OverlapReport]) -> list[OverlapReport]:
    """Log a warning for each report that found shared texts; return those reports."""
    found = [r for r in reports if r]
    for r in found:
        log.warning("%s", r.message())
    return found
