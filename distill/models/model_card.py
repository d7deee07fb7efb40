"""The model card (README.md, the Hugging Face convention) of every model directory distill trains.

`distill train` writes it from the run's summary: base model, teacher, data fingerprint, recipe,
loss settings, best validation figures. `distill eval` adds a row per evaluated split or file to its
"Evaluation" table, so the card shows the holdout macro-F1 once the model has been measured.
"""
from __future__ import annotations

from pathlib import Path

from distill.errors import redact
from distill.fileio import atomic_write_text

EVAL_HEADING = "## Evaluation (`distill eval`)"
EVAL_HEADER = "| data | examples | accuracy | macro-F1 | weighted F1 |\n| --- | ---: | ---: | ---: | ---: |"


def write_model_card(model_dir: Path, summary: dict, recipe) -> None:
    """README.md for a trained model, keeping the evaluation rows of an earlier card."""
    distilled = summary["alpha"] > 0
    teacher = redact(recipe.teacher) if distilled else "none: supervised fine-tuning on gold labels (alpha = 0)"
    best = summary.get("best") or {}
    figures = ", ".join(f"{k} {best[k]:.4f}" for k in ("val_f1", "val_loss", "val_kd") if k in best)
    rows = [("base model", summary["base"]), ("teacher", teacher), ("recipe", summary["recipe"]),
            ("task", summary["task_type"]), ("data fingerprint", summary["data_fingerprint"]),
            ("teacher cache", summary["cache"] or "none"),
            ("loss", f"alpha {summary['alpha']} * T^2 * {summary['loss']} {summary['loss_params'] or ''}".rstrip()
             + f" + (1 - alpha) * CE, T = {summary['temperature']}"),
            ("answers", "one label token per label, read at one position" if summary.get("label_tokens")
             else "the model's own text"),
            ("layers / parameters", f"{summary['layers']} / {summary['parameters']:,}"),
            ("training", f"{summary['steps']} optimizer steps on {summary['train_examples']} examples, "
                         f"{summary['seconds']} s, {summary['world_size']} process(es)"),
            ("best validation", f"{figures} (chosen by {summary['best_metric']})")]
    meta = ["---", f"base_model: {summary['base']}", "library_name: transformers",
            "tags:", "- distill", "- knowledge-distillation", "---"]
    body = [f"# {Path(model_dir).name}", "", "Trained by distill with `distill train"
            f" {summary['recipe']}`.", "", "| | |", "| --- | --- |"]
    body += [f"| {k} | {v} |" for k, v in rows]
    card = "\n".join(meta + body) + "\n\n" + EVAL_HEADING + "\n\n" + EVAL_HEADER + "\n"
    card += "".join(row + "\n" for row in _eval_rows(model_dir))
    atomic_write_text(Path(model_dir) / "README.md", card)


def add_evaluation(model_dir: Path, data_name: str, report: dict) -> None:
    """Add (or replace) the row for data_name in the card's evaluation table; no card, nothing written."""
    card_path = Path(model_dir) / "README.md"
    if not card_path.is_file() or EVAL_HEADING not in card_path.read_text():
        return
    row = (f"| {data_name} | {report['n']} | {report['accuracy']:.4f} | {report['macro_f1']:.4f} | "
           f"{report['weighted_f1']:.4f} |")
    rows = [r for r in _eval_rows(model_dir) if r.split("|")[1].strip() != data_name] + [row]
    head = card_path.read_text().split(EVAL_HEADING)[0]
    atomic_write_text(card_path, head + EVAL_HEADING + "\n\n" + EVAL_HEADER + "\n" + "".join(r + "\n" for r in rows))


def _eval_rows(model_dir: Path) -> list[str]:
    card_path = Path(model_dir) / "README.md"
    if not card_path.is_file() or EVAL_HEADING not in card_path.read_text():
        return []
    table = card_path.read_text().split(EVAL_HEADING)[1]
    return [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| data ")]
