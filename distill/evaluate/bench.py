"""`distill bench`: teacher and students side by side on one holdout, in one run.

Each model is measured in its own fresh process (so peak memory is that model's alone): holdout
scores at the chosen batch size (throughput), then per-example latency at batch 1 (p50, p95).
The parent computes accuracy, macro-F1 and agreement with the teacher, and writes a Markdown
table, a JSON file and a PNG chart of quality against latency.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue
import resource
import signal
import threading
import time
from pathlib import Path

import numpy as np

from distill.config import Recipe
from distill.errors import DistillError, UsageError
from distill.evaluate.evaluation import check_report_dir, eval_examples
from distill.evaluate.metrics import agreement, classification_metrics
from distill.fileio import check_output_dir, die_with_parent, pause_point, write_file_set
from distill.models.loading import size_on_disk


def _measure(model_ref, recipe, examples, batch_size, latency_n, tokenizer, q, parent_pid=None):
    """Child process: score the holdout and time it; report through the queue `q`. It dies with the
    parent, even a SIGKILLed one (nothing else would stop it: it ignores SIGINT and has no terminal)."""
    die_with_parent(parent_pid)
    import torch

    from distill.data.prompts import encode_classification
    from distill.evaluate.evaluation import make_scorer

    try:
        torch.manual_seed(0)
        if recipe.task.type == "generation":
            from distill.evaluate.generation_bench import bench_figures

            figures = bench_figures(model_ref, recipe, examples, batch_size, latency_n, tokenizer)
            q.put({**figures, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            return
        t0 = time.perf_counter()
        scorer = make_scorer(model_ref, tokenizer)
        load_s = time.perf_counter() - t0
        enc, label_ids = encode_classification(scorer.tokenizer, recipe.task, recipe.task.labels, examples,
                                               recipe.task.max_length)
        scorer.scores(enc[:2], label_ids, batch_size)  # warm-up
        t0 = time.perf_counter()
        scores = scorer.scores(enc, label_ids, batch_size, desc=f"bench {Path(str(model_ref)).name}")
        batch_s = time.perf_counter() - t0
        pause_point("bench_scored")
        lat = []
        for e in enc[:latency_n]:
            t = time.perf_counter()
            scorer.scores([e], label_ids, 1)
            lat.append(time.perf_counter() - t)
        q.put({
            "predictions": scores.argmax(1).tolist(), "load_s": load_s,
            "throughput_batch": len(enc) / batch_s, "throughput_1": len(lat) / sum(lat),
            "latency_p50_ms": 1000 * float(np.percentile(lat, 50)),
            "latency_p95_ms": 1000 * float(np.percentile(lat, 95)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "parameters": scorer.parameters, "layers": scorer.layers, "runtime": scorer.kind,
        })
    except Exception as e:  # noqa: BLE001 - reported to the parent, which names the model
        q.put({"error": f"{type(e).__name__}: {e}"})


def measure(model_ref, recipe, examples, batch_size, latency_examples, tokenizer=None) -> dict:
    """Measure one model in a fresh process. The child ignores SIGINT (a terminal's Ctrl-C reaches the
    whole process group): the parent alone handles it, and SIGTERM, and stops the child before it exits."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(model_ref, recipe, examples, batch_size, latency_examples, tokenizer, q,
                                              os.getpid()))
    with _sigint_ignored():  # inherited through exec: Python then never raises KeyboardInterrupt in the child
        proc.start()
    try:
        result = _result(q, proc, model_ref)
    except BaseException:  # an interruption (KeyboardInterrupt) or a failure: the child must not outlive it
        stop_child(proc)
        raise
    proc.join()
    if "error" in result:
        raise UsageError(f"{model_ref}: could not be benchmarked ({result['error']})")
    return result


@contextlib.contextmanager
def _sigint_ignored():
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _result(q, proc, model_ref) -> dict:
    """The child's report; DistillError if it dies without one (killed, out of memory, a crash in native code)."""
    while True:
        try:
            return q.get(timeout=0.5)
        except queue.Empty:
            if not proc.is_alive():
                try:
                    return q.get(timeout=1.0)  # written just before it exited
                except queue.Empty:
                    raise DistillError(f"{model_ref}: the benchmark process died (exit status {proc.exitcode}) "
                                       "without a result") from None


def stop_child(proc, grace: float = 10.0) -> None:
    """SIGTERM the measuring process (it dies at once: it has no handler), SIGKILL it after `grace` s."""
    if proc.is_alive():
        proc.terminate()
        proc.join(grace)
    if proc.is_alive():
        proc.kill()
    proc.join()


BENCH_FILES = ("bench.json", "bench.md", "bench.png")


def run_bench(recipe: Recipe, teacher: str, students: list[str], data: str | None = None, split: str = "holdout",
              batch_size: int = 16, latency_examples: int = 32, limit: int | None = None, out: str | None = None,
              tokenizer: str | None = None) -> dict:
    if out is not None:  # '' (an unset shell variable), '/', home, a user's directory: refused
        check_output_dir(out, "--out", "bench")
    out_dir = Path(out or recipe.workdir_path / "bench")
    check_report_dir(out_dir, BENCH_FILES)
    examples, splits = eval_examples(recipe, split, data, limit)
    if recipe.task.type == "generation":
        rows = _generation_rows(recipe, teacher, students, examples, batch_size, latency_examples, tokenizer)
        report = {"split": data or split, "n": len(examples), "batch_size": batch_size, "task": "generation",
                  "models": rows}
        from distill.evaluate.generation_bench import markdown_table as generation_table

        write_file_set(out_dir, {"bench.json": json.dumps(report, indent=1),
                                 "bench.md": generation_table(rows, len(examples), batch_size),
                                 "bench.png": chart(rows, "exact_match", "holdout exact match")})
        report["out_dir"] = str(out_dir)
        return report
    recipe.task.labels = splits.labels
    labels = splits.labels
    y_true = [labels.index(e["label"]) for e in examples]
    rows = []
    for role, ref in [("teacher", teacher)] + [("student", s) for s in students]:
        m = measure(ref, recipe, examples, batch_size, latency_examples,
                    tokenizer if str(ref).endswith(".gguf") else None)
        metrics = classification_metrics(y_true, m["predictions"], labels)
        rows.append({"role": role, "model": str(ref), "name": Path(str(ref)).name, **m,
                     "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                     "size_mb": size_on_disk(ref) / 2**20})
    teacher_pred = rows[0]["predictions"]
    for r in rows:
        r["agreement"] = agreement(r["predictions"], teacher_pred)
        r["f1_kept"] = r["macro_f1"] / rows[0]["macro_f1"] if rows[0]["macro_f1"] else None
        r["speedup_1"] = r["throughput_1"] / rows[0]["throughput_1"]
        r["speedup_batch"] = r["throughput_batch"] / rows[0]["throughput_batch"]
    report = {"split": data or split, "n": len(examples), "batch_size": batch_size, "models": rows}
    write_file_set(out_dir, {"bench.json": json.dumps(report, indent=1),  # one unit, as eval's report
                             "bench.md": markdown_table(rows, len(examples), batch_size), "bench.png": chart(rows)})
    report["out_dir"] = str(out_dir)
    return report


def _generation_rows(recipe, teacher, students, examples, batch_size, latency_examples, tokenizer) -> list[dict]:
    from distill.evaluate.generation_bench import finish_rows, quality

    references = [ex["response"] for ex in examples]
    rows = []
    for role, ref in [("teacher", teacher)] + [("student", s) for s in students]:
        m = measure(ref, recipe, examples, batch_size, latency_examples,
                    tokenizer if str(ref).endswith(".gguf") else None)
        rows.append({"role": role, "model": str(ref), "name": Path(str(ref)).name, **m,
                     **quality(recipe.task, references, m["outputs"]), "size_mb": size_on_disk(ref) / 2**20})
    finish_rows(rows)
    return rows


def markdown_table(rows, n, batch_size) -> str:
    head = ("| model | runtime | layers | params | size MB | accuracy | macro-F1 | F1 kept | agreement | "
            f"p50 ms | p95 ms | ex/s @1 | ex/s @{batch_size} | speed-up @1 | peak RSS MB |")
    lines = [f"Holdout: {n} examples.", "", head, "|" + "---|" * 15]
    for r in rows:
        params = f"{r['parameters'] / 1e6:.1f}M" if r["parameters"] else "—"
        kept = f"{100 * r['f1_kept']:.1f}%" if r["f1_kept"] is not None else "—"
        lines.append(f"| {r['name']} ({r['role']}) | {r['runtime']} | {r['layers']} | {params} | {r['size_mb']:.0f} | "
                     f"{r['accuracy']:.4f} | {r['macro_f1']:.4f} | {kept} | {r['agreement']:.3f} | "
                     f"{r['latency_p50_ms']:.1f} | {r['latency_p95_ms']:.1f} | {r['throughput_1']:.2f} | "
                     f"{r['throughput_batch']:.2f} | {r['speedup_1']:.2f}× | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def chart(rows, y: str = "macro_f1", ylabel: str = "holdout macro-F1") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["latency_p50_ms"], r[y], s=80, marker="*" if r["role"] == "teacher" else "o")
        ax.annotate(f"{r['name']} ({r['runtime']})", (r["latency_p50_ms"], r[y]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("latency per example at batch 1, p50 (ms)")
    ax.set_ylabel(ylabel)
    ax.set_title("quality vs latency")
    ax.grid(alpha=0.3)
    from distill.evaluate.confusion import png_bytes

    return png_bytes(fig)
