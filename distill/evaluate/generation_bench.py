"""`distill bench` on a generation task: each model decodes the holdout greedily (batched, then one prompt at
a time for latency) in its own process; the parent scores the outputs against the references and against
the teacher's own outputs (agreement: the share of responses identical to the teacher's)."""
from __future__ import annotations

import time

import numpy as np

from distill.evaluate.generation_eval import Decoder, load_tokenizer_for, score_outputs


def bench_figures(model_ref, recipe, examples, batch_size: int, latency_n: int, tokenizer=None) -> dict:
    """Child process side: outputs, decoded tokens/s at `batch_size`, latency per response at batch 1."""
    tok = load_tokenizer_for(model_ref, tokenizer)
    t0 = time.perf_counter()
    decoder = Decoder(model_ref, recipe, tok)
    load_s = time.perf_counter() - t0
    try:
        decoder.run(examples[:2], batch_size)  # warm-up
        outputs, decoded = decoder.run(examples, batch_size, desc=f"bench {model_ref}")
        latency = [decoder.run([ex], 1)[1].seconds for ex in examples[:latency_n]]
    finally:
        decoder.close()
    return {"outputs": outputs, "load_s": load_s, "new_tokens": decoded.new_tokens,
            "new_tokens_per_s": decoded.new_tokens / max(decoded.seconds, 1e-9),
            "throughput_batch": len(examples) / max(decoded.seconds, 1e-9),
            "throughput_1": len(latency) / max(sum(latency), 1e-9),
            "latency_p50_ms": 1000 * float(np.percentile(latency, 50)),
            "latency_p95_ms": 1000 * float(np.percentile(latency, 95)),
            "parameters": decoder.parameters, "runtime": decoder.runtime}


def quality(task, references: list[str], outputs: list[str]) -> dict:
    """The row's quality figures: exact match, and field F1 and valid JSON (json) or chrF (text)."""
    s = score_outputs(task, references, outputs)
    out = {"exact_match": s["exact_match"]}
    if task.output == "json":
        out.update(valid_json=s["valid_json"], field_f1=s["field_micro"]["f1"])
        if "class" in s:  # the class field's accuracy, and F1 over the other fields (SNIPS: the slot F1)
            out["class_accuracy"] = s["class"]["accuracy"]
            out["other_fields_f1"] = s["field_micro_without_class"]["f1"]
    else:
        out["chrf"] = s["chrf"]
    return out


def finish_rows(rows: list[dict]) -> None:
    """Agreement with the teacher's outputs (rows[0]), quality kept and speed-ups against it."""
    teacher = rows[0]
    for r in rows:
        r["agreement"] = sum(a == b for a, b in zip(r["outputs"], teacher["outputs"])) / max(len(r["outputs"]), 1)
        r["exact_match_kept"] = r["exact_match"] / teacher["exact_match"] if teacher["exact_match"] else None
        r["speedup_tokens"] = r["new_tokens_per_s"] / teacher["new_tokens_per_s"]
        r["speedup_1"] = r["throughput_1"] / teacher["throughput_1"]


def markdown_table(rows: list[dict], n: int, batch_size: int) -> str:
    extra = [k for k in ("valid_json", "field_f1", "class_accuracy", "other_fields_f1", "chrf") if k in rows[0]]
    head = ("| model | runtime | params | size MB | exact match | " + " | ".join(extra) +
            f" | agreement | new tok/s @{batch_size} | p50 ms | p95 ms | tok/s speed-up | peak RSS MB |")
    lines = [f"Holdout: {n} prompts, greedy decoding.", "", head, "|" + "---|" * (11 + len(extra))]
    for r in rows:
        params = f"{r['parameters'] / 1e6:.1f}M" if r.get("parameters") else "—"
        cells = " | ".join(f"{r[k]:.4f}" if k != "chrf" else f"{r[k]:.2f}" for k in extra)
        lines.append(f"| {r['name']} ({r['role']}) | {r['runtime']} | {params} | {r['size_mb']:.0f} | "
                     f"{r['exact_match']:.4f} | {cells} | {r['agreement']:.3f} | {r['new_tokens_per_s']:.1f} | "
                     f"{r['latency_p50_ms']:.0f} | {r['latency_p95_ms']:.0f} | {r['speedup_tokens']:.2f}× | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"
