"""`distill eval`: holdout metrics for any model. Classification scores every label (no free-text parsing);
generation decodes every prompt greedily and scores the responses (generation_eval.py)."""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from distill.config import Recipe
from distill.data.leakage import overlap, text_field_of, warn_overlaps
from distill.data.prompts import encode_classification
from distill.data.read import read_rows, validate_rows
from distill.data.sampling import subset_indices
from distill.data.splits import prepare_splits, same_file
from distill.errors import UsageError
from distill.evaluate.confusion import confusion_csv, confusion_png
from distill.evaluate.metrics import classification_metrics
from distill.fileio import check_output_dir, write_file_set
from distill.models.scoring import label_logprobs

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_scores(model, encoded, label_ids, pad_id: int, batch_size: int = 16, desc: str | None = None):
    """[N, n_labels] label log-probabilities for encoded examples, batched, with a progress bar.

    Batches hold prompts of about one length (scored longest first, rows put back in order), so little
    of each forward pass is padding."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].prompt))
    out = torch.zeros((len(encoded), len(label_ids)))
    bar = tqdm(total=len(encoded), desc=desc, unit="ex", disable=desc is None)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        out[idx] = label_logprobs(model, [encoded[i].prompt for i in idx], label_ids, pad_id).float().cpu()
        bar.update(len(idx))
    bar.close()
    return out


def few_shot_examples(train: list[dict], labels: list[str] | None, shots: int) -> list[dict]:
    """Up to `shots` training examples, one per label in label order, for few-shot prompts. Generation: one
    per stratum (`task.stratify_field`) in sorted order, then the next rows, among rows with a gold response
    (the labelled budget's: a withheld response is never shown)."""
    if labels is None:
        rows = [ex for ex in train if ex.get("response") is not None]
        firsts = {}
        for ex in rows:
            firsts.setdefault(ex.get("group", ""), ex)
        picked = [firsts[g] for g in sorted(firsts)]
        return (picked + [ex for ex in rows if all(ex is not p for p in picked)])[:shots]
    picked, seen = [], set()
    for ex in train:
        if ex["label"] not in seen:
            seen.add(ex["label"])
            picked.append(ex)
    order = {lab: i for i, lab in enumerate(labels)}
    return sorted(picked, key=lambda e: order[e["label"]])[:shots]


def load_for_eval(model_ref: str):
    """A model directory (full weights, or a LoRA adapter merged into its base), a hub id, or a teacher spec."""
    from distill.config import resolve_teacher
    from distill.models.loading import load_model, load_tokenizer

    ref = resolve_teacher(model_ref).source if Path(model_ref).suffix in (".yaml", ".yml") else model_ref
    model, tokenizer_dir = load_model(ref, "float32")
    return model, load_tokenizer(tokenizer_dir)


class HFScorer:
    """Scores labels with a transformers model (packed: one forward pass per batch)."""

    kind = "transformers"

    def __init__(self, model_ref: str):
        self.model, self.tokenizer = load_for_eval(model_ref)
        self.model.eval()
        self.layers = self.model.config.num_hidden_layers
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def scores(self, encoded, label_ids, batch_size=16, desc=None):
        return predict_scores(self.model, encoded, label_ids, self.tokenizer.pad_token_id, batch_size, desc)


class EnsembleScorer:
    """Several classifiers scored as one: per example the mean of their label probabilities, the mixture
    `train.teacher_mix: mixture` teaches at equal weights (cache/ensemble.mix_soft_labels). Each model runs
    alone in turn, so the ensemble costs the sum of its members."""

    kind = "ensemble"

    def __init__(self, model_refs, tokenizer_dir: str | None = None):
        self.refs, self.tokenizer_dir = list(model_refs), tokenizer_dir
        first = make_scorer(self.refs[0], tokenizer_dir)
        self.tokenizer, self._first = first.tokenizer, first
        self.layers, self.parameters = first.layers, first.parameters

    def scores(self, encoded, label_ids, batch_size=16, desc=None):
        from distill.cache.ensemble import mix_soft_labels

        out = []
        for i, ref in enumerate(self.refs):
            scorer, self._first = self._first or make_scorer(ref, self.tokenizer_dir), None
            if i and scorer.tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise UsageError(f"{ref}: its tokenizer differs from {self.refs[0]}'s; an ensemble scored from one "
                                 "encoding needs one tokenizer")
            out.append(scorer.scores(encoded, label_ids, batch_size, f"{desc} [{i + 1}/{len(self.refs)}]"))
            self.parameters += scorer.parameters if i else 0
            del scorer  # one member in memory at a time
        return mix_soft_labels(out, [1 / len(out)] * len(out))


def make_scorer(model_ref, tokenizer_dir: str | None = None):
    """llama.cpp for a .gguf file, transformers for anything else; several models (a list): their ensemble."""
    if isinstance(model_ref, (list, tuple)):
        return EnsembleScorer(model_ref, tokenizer_dir) if len(model_ref) > 1 else make_scorer(model_ref[0],
                                                                                               tokenizer_dir)
    if str(model_ref).endswith(".gguf"):
        from distill.models.llamacpp import GGUFScorer

        return GGUFScorer(model_ref, tokenizer_dir)
    return HFScorer(model_ref)


def overfit_note(model_ref: str) -> str | None:
    """The train/validation gap recorded by `distill train`, if the model came from it."""
    p = Path(model_ref) / "training.json"
    if not p.is_file():
        return None
    info = json.loads(p.read_text())
    gap = info.get("best", {}).get("train_val_gap")
    if gap is None:
        return None
    thr = info.get("overfit_gap", 0.1)
    verdict = "WARNING: the train-validation gap suggests overfitting" if gap > thr else "no sign of overfitting"
    return f"train-validation macro-F1 gap at the saved epoch: {gap:+.3f} ({verdict}; threshold {thr})"


def eval_examples(recipe: Recipe, split: str = "holdout", data: str | None = None, limit: int | None = None):
    """The examples to score, the label set and the splits (for few-shot examples). The training data
    itself is refused as --data; texts the training split also has are reported with a warning."""
    task, src = recipe.task, recipe.path or "recipe"
    if data:
        _refuse_training_file(data, recipe)
    splits = prepare_splits(task, recipe.workdir, src, with_holdout=split == "holdout" and not data)
    if data:
        examples = validate_rows(read_rows(data), task, splits.labels, data)
    else:
        examples = splits.get(split)
    if not examples:
        raise UsageError(f"{src}: the {split} split is empty: set {_SPLIT_KEYS.get(split, 'task.split')}")
    if task.type == "classification":
        examples = [examples[i] for i in subset_indices(examples, limit, task.split.seed)]
    elif limit and limit < len(examples):  # a seeded sample: a file's rows are often grouped by topic
        examples = [examples[i] for i in sorted(random.Random(task.split.seed).sample(range(len(examples)), limit))]
    if data or split != "train":
        name = f"--data {data}" if data else (f"task.holdout_data {task.holdout_data}"
                                              if split == "holdout" and task.holdout_data else f"the {split} split")
        warn_overlaps([overlap(splits.train, examples, text_field_of(task),
                               train_name=f"the training split of {task.data}", other_name=name)])
    return examples, splits


def _refuse_training_file(data: str, recipe: Recipe) -> None:
    """Scores on the texts a model was trained on measure memory: refuse the training file as --data."""
    split_file = recipe.workdir_path / "data" / "train.jsonl"
    for f, what in ((recipe.task.data, f"task.data in {recipe.path or 'recipe'}"),
                    (split_file, f"the training split written to {split_file}")):
        if same_file(data, f):
            raise UsageError(f"--data {data}: this is the recipe's training data ({what}); "
                             "evaluate on the holdout split or on a file the model was not trained on")


_SPLIT_KEYS = {"holdout": "task.split.holdout or task.holdout_data", "validation": "task.split.validation"}


def report_dir_name(name: str, split: str = "holdout", data: str | None = None, shots: int = 0,
                    limit: int | None = None) -> str:
    """WORKDIR/eval/<this>: NAME for the full holdout, zero-shot; another split, --data file, few-shot
    prompt or sample adds its own suffix (NAME-train, NAME-test, NAME-3shot, NAME-limit100), so no
    run replaces the holdout report of the same model."""
    parts = [name] + ([Path(data).stem] if data else [split] if split != "holdout" else [])
    return "-".join(parts + ([f"{shots}shot"] if shots else []) + ([f"limit{limit}"] if limit else []))


REPORT_FILES = ("report.json", "confusion.csv", "confusion.png", "predictions.jsonl")


def check_report_dir(out_dir: Path, names, option: str = "--out") -> None:
    """A report set is replaced as a whole directory, so its directory must hold nothing else (a model
    directory or a user's files given as --out would be swapped away with it)."""
    if out_dir.is_dir():
        other = sorted(n for n in os.listdir(out_dir)
                       if n not in names and not (n.startswith(".") and n.endswith(".tmp")))  # older runs' temps
        if other:
            raise UsageError(f"{option} {out_dir}: holds {other[0]!r}, not only a report distill wrote "
                             f"({', '.join(names)}); name a new directory for the report")


def run_eval(model_ref: str, recipe: Recipe, split: str = "holdout", data: str | None = None,
             shots: int = 0, out: str | None = None, name: str | None = None, batch_size: int = 16,
             limit: int | None = None, tokenizer: str | None = None, backend: str = "auto") -> dict:
    """Score `model_ref` on a split (or a --data file) and write its report set into OUT (default
    WORKDIR/eval/NAME...) as one unit; returns the report. `backend` picks the decoding runtime of a
    generation model (a .gguf always decodes through llama.cpp). Several classifiers (a list) are scored as
    their ensemble (EnsembleScorer)."""
    if isinstance(model_ref, (list, tuple)) and len(model_ref) == 1:
        model_ref = model_ref[0]
    several = isinstance(model_ref, (list, tuple))
    if several and recipe.task.type == "generation":
        raise UsageError("distill eval: several MODELs (an ensemble) are scored for classification tasks only")
    name = name or ("ensemble" if several else Path(model_ref).resolve().name)
    if out is not None:  # '' (an unset shell variable), '/', home, a user's directory: refused
        check_output_dir(out, "--out", "eval")
    out_dir = Path(out or recipe.workdir_path / "eval" / report_dir_name(name, split, data, shots, limit))
    check_report_dir(out_dir, REPORT_FILES)
    examples, splits = eval_examples(recipe, split, data, limit)
    title = f"{name} on {Path(str(data or split)).name}"
    if recipe.task.type == "generation":
        from distill.evaluate.generation_eval import generation_report

        shot_examples = few_shot_examples(splits.train, None, shots) if shots else []
        report, files = generation_report(model_ref, recipe, examples, title, batch_size, tokenizer, backend,
                                          shot_examples)
    else:
        report, files = _classification_report(model_ref, recipe, examples, splits, shots, title, batch_size,
                                                tokenizer)
    report.update({"model": list(model_ref) if several else model_ref, "name": name, "split": data or split,
                   "shots": shots})
    note = None if several else overfit_note(model_ref)
    if note:
        report["overfitting"] = note
    files["report.json"] = json.dumps(report, indent=1)
    write_file_set(out_dir, files)  # one unit: a killed run or a full disk leaves the previous set whole
    report["out_dir"] = str(out_dir)
    # a classifier's card shows its measured figures
    if not several and Path(model_ref).is_dir() and "accuracy" in report:
        from distill.models.model_card import add_evaluation

        add_evaluation(Path(model_ref), _data_name(split, data, shots, limit), report)
    return report


def _classification_report(model_ref, recipe, examples, splits, shots, title, batch_size, tokenizer):
    """Every label scored for every example: the report's figures and its other files."""
    labels = splits.labels
    shot_examples = few_shot_examples(splits.train, labels, shots) if shots else []
    scorer = make_scorer(model_ref, tokenizer)
    enc, label_ids = encode_classification(scorer.tokenizer, recipe.task, labels, examples, recipe.task.max_length,
                                           shots=shot_examples)
    t0 = time.time()
    scores = scorer.scores(enc, label_ids, batch_size, desc=f"eval {title}")
    elapsed = time.time() - t0
    y_pred = scores.argmax(1).tolist()
    report = classification_metrics([e.label_index for e in enc], y_pred, labels)
    report.update({"examples_per_s": len(enc) / max(elapsed, 1e-9), "layers": scorer.layers,
                   "parameters": scorer.parameters, "runtime": scorer.kind})
    return report, {
        "confusion.csv": confusion_csv(report["confusion"], labels),
        "confusion.png": confusion_png(report["confusion"], labels, title),
        "predictions.jsonl": "".join(
            json.dumps({"id": ex.get("id"), "label": ex["label"], "predicted": labels[p],
                        "probs": torch.softmax(s, -1).round(decimals=4).tolist()}) + "\n"
            for ex, p, s in zip(examples, y_pred, scores))}


def _data_name(split: str, data: str | None, shots: int, limit: int | None) -> str:
    name = Path(data).name if data else split
    return name + (f", {shots}-shot" if shots else "") + (f", sample of {limit}" if limit else "")


def format_report(report: dict, labels: list[str]) -> str:
    if report.get("task") == "generation":
        from distill.evaluate.generation_eval import format_generation_report

        return format_generation_report(report)
    lines = [f"{report['name']}: {report['n']} examples of {report['split']}"
             + (f" ({report['shots']}-shot)" if report.get("shots") else ""),
             f"  accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}   "
             f"weighted-F1 {report['weighted_f1']:.4f}",
             f"  {'class':<28}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for lab in labels:
        c = report["per_class"][lab]
        lines.append(f"  {lab[:28]:<28}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}{c['support']:>9}")
    if report.get("overfitting"):
        lines.append("  " + report["overfitting"])
    lines.append(f"  written to {report['out_dir']} (report.json, confusion.png, confusion.csv, predictions.jsonl)")
    return "\n".join(lines)
