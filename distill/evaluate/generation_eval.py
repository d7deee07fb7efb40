"""Evaluating a generation model on a holdout: greedy responses to every prompt, scored against the gold
responses (exact match; for JSON outputs valid-JSON rate, field-level F1 and the class field's report;
for free text chrF). The report has the layout of a classification report (report.json, predictions.jsonl
with prompt, reference and output, a confusion matrix where a class field is named)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.config import Recipe, TeacherSpec
from distill.data.prompts import generation_prompt, stop_ids
from distill.evaluate.decode import Decoded, greedy_backend, greedy_gguf
from distill.evaluate.generation_metrics import json_metrics, text_metrics


@dataclass
class GenerationRun:
    """What decoding a holdout produced: the outputs as text, and the figures of the runtime."""

    outputs: list[str]
    decoded: Decoded
    runtime: str
    parameters: int | None


def _room(prompt: list[int], max_length: int, max_new_tokens: int) -> int:
    return max(1, min(max_new_tokens, max_length - len(prompt)))


def decode_holdout(model_ref: str, recipe: Recipe, examples: list[dict], tok, backend: str = "auto",
                   batch_size: int = 16, desc: str | None = None) -> GenerationRun:
    """Greedy outputs of `model_ref` (a model directory, hub id or .gguf file) for the examples' prompts."""
    task, max_new = recipe.task, recipe.generate.max_new_tokens
    prompts = [generation_prompt(tok, task, ex, task.max_length) for ex in examples]
    max_new = max(_room(p, task.max_length, max_new) for p in prompts)
    stops = stop_ids(tok)
    if str(model_ref).endswith(".gguf"):
        decoded = greedy_gguf(model_ref, prompts, max_new, stops, n_ctx=task.max_length + max_new, desc=desc)
        return GenerationRun(_texts(tok, decoded), decoded, "llama.cpp", None)
    from distill.models.loading import resolve_model_path
    from distill.teacher.backend import make_backend

    path = resolve_model_path(model_ref)
    name = "transformers" if backend == "auto" else backend
    spec = TeacherSpec(name=Path(path).name, source=path, dtype="float32", max_model_len=task.max_length + max_new)
    engine = make_backend(name, spec, path, 1, tok)
    try:
        decoded = greedy_backend(engine, prompts, max_new, stops, batch_size, desc)
        params = sum(p.numel() for p in engine.model.parameters()) if hasattr(engine, "model") else None
    finally:
        close = getattr(engine, "close", None)
        if close:
            close()
    return GenerationRun(_texts(tok, decoded), decoded, name, params)


def _texts(tok, decoded: Decoded) -> list[str]:
    return [tok.decode(r, skip_special_tokens=True) for r in decoded.responses]


def score_outputs(task, references: list[str], outputs: list[str]) -> dict:
    """The figures the task's output format asks for (`task.output`: json or text)."""
    if task.output == "json":
        return json_metrics(references, outputs, task.class_field)
    return text_metrics(references, outputs)


def prediction_rows(examples: list[dict], outputs: list[str]) -> list[dict]:
    return [{"id": ex.get("id"), "prompt": ex["prompt"], "reference": ex.get("response"), "output": out}
            for ex, out in zip(examples, outputs)]
