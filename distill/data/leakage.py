"""Leakage checks: texts of the holdout (or of an evaluated file) that the training split also has."""
from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import TaskConfig
from distill.data.read import read_rows
from distill.data.splits import Splits
from distill.errors import UsageError

log = logging.getLogger(__name__)


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
