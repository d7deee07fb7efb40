#!/usr/bin/env python
"""What GGUF export buys on CPU: file size per quant type against the bf16 checkpoint, and llama.cpp
generation speed against transformers, measured in one run on the same prompt; with --recipe, also
each file's holdout macro-F1 against the HF model's (`distill eval` on both), and the export targets.

    python scripts/bench_export.py MODEL_DIR [--quants f16,q8_0,q4_0,q4_k_m] [--tokens 64] [--out-dir DIR]
    python scripts/bench_export.py runs/default/student --recipe recipes/default.yaml   # the targets

Each quant is exported with distill.export.pipeline.export_gguf (verification on, so the table also shows how
closely each file follows the source). Generation is greedy with a fixed number of new tokens; prefill
(prompt) and decode (per new token) speeds are reported separately. llama.cpp runs in a child process
with passive OpenMP waits, as distill.export.pipeline does, so torch's threads in this process cannot slow it.
Each runtime is timed at 1 thread and at all cores and its faster setting is kept (the table says
which): decoding one token of a small model is a chain of tiny matrix products, and on 2 cores
llama.cpp decoded the 56M default student at 205 tok/s with 1 thread and 85 tok/s with 2 (measured).
Figures on a shared machine are noisy: run twice before trusting a small difference.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, run_child, versions

PROMPT = "Write a short story about a robot who learns to paint. Give the robot a name."


def bf16_bytes(model_dir: Path) -> int:
    """Size of the checkpoint's weights stored as bf16 (2 bytes per parameter), read from safetensors headers."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += 2 * n
    return total


def prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(PROMPT)["input_ids"]


def hf_worker(model_dir: str, ids: list[int], n: int, dtype: str, threads: int) -> None:
    r = hf_speed(Path(model_dir), ids, n, dtype, threads)
    print(json.dumps(r))


def hf_speed(model_dir: Path, ids: list[int], n: int, dtype: str, threads: int) -> dict:
    """transformers greedy generation: prefill = time to the first new token, decode = the rest per token."""
    import torch

    from distill.models.loading import load_causal_lm

    torch.set_num_threads(threads)
    model = load_causal_lm(str(model_dir), dtype).eval()
    x = torch.tensor([ids])

    def run(k):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                 pad_token_id=model.config.eos_token_id)
        return time.perf_counter() - start, out[0, len(ids):].tolist()

    run(2)  # warm-up
    t1, _ = run(1)
    tn, tokens = run(n)
    return {"prefill_tok_s": len(ids) / t1, "decode_tok_s": (n - 1) / max(tn - t1, 1e-9), "tokens": tokens}


def fastest(worker: str, target: Path, ids: list[int], n: int, dtype: str = "") -> dict:
    """The run with the higher decode rate of 1 thread and all cores."""
    counts = sorted({1, os.cpu_count() or 1})
    runs = [{**in_child(worker, target, ids, n, dtype, t), "threads": t} for t in counts]
    return max(runs, key=lambda r: r["decode_tok_s"])


def in_child(worker: str, target: Path, ids: list[int], n: int, dtype: str = "", threads: int = 1) -> dict:
    """Run one timing in a fresh process. Both runtimes get passive OpenMP waits: on a machine shared
    with other work, spinning threads made both of them 10-50x slower (measured), which says more
    about the neighbours than about the runtime."""
    cmd = [sys.executable, __file__, "--worker", worker, str(target), "--tokens", str(n), "--ids", json.dumps(ids),
           "--threads", str(threads)]
    return run_child(cmd + (["--dtype", dtype] if dtype else []), env=passive_waits())


def passive_waits() -> dict:
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def llama_worker(path: str, ids: list[int], n: int, threads: int) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(path, n_ctx=len(ids) + n + 16, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(ids[:8])  # warm-up: page the weights in
    llm.reset()  # forget it, so generate() cannot reuse it as a cached prefix
    stream = llm.generate(ids, top_k=1, temp=0.0, reset=True)
    start = time.perf_counter()
    tokens = [next(stream)]
    first = time.perf_counter()
    tokens += [next(stream) for _ in range(n - 1)]
    end = time.perf_counter()
    llm.close()
    print(json.dumps({"prefill_tok_s": len(ids) / (first - start), "decode_tok_s": (n - 1) / (end - first),
                      "tokens": tokens}))


def holdout_f1(model: Path, recipe: str, out: Path) -> dict:
    """`distill eval` in a child process (as a user runs it): the report's macro-F1 and speed."""
    cmd = [sys.executable, "-m", "distill", "eval", str(model), "--recipe", recipe, "--out", str(out),
           "--name", model.name]
    proc = subprocess.run(cmd, env={**os.environ, **passive_waits()}, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"distill eval {model} failed:\n{proc.stderr[-2000:]}")
    r = json.loads((out / "report.json").read_text())
    predicted = [json.loads(line)["predicted"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    return {"macro_f1": r["macro_f1"], "accuracy": r["accuracy"], "n": r["n"], "examples_per_s": r["examples_per_s"],
            "predicted": predicted}


def targets(rows: list[dict]) -> list[str]:
    """The export targets: q4_k_m at most 1 macro-F1 point below the HF model, at most 0.35x its bf16
    size, and at least 3x the decode tokens/s of the faster transformers dtype."""
    by = {r["name"]: r for r in rows}
    q = by.get("llama.cpp q4_k_m")
    if not q:
        return []
    hf_best = max((r for r in rows if r["name"].startswith("transformers")), key=lambda r: r["decode"])
    out = [f"size: q4_k_m is {q['ratio']:.3f}x the bf16 checkpoint (target <= 0.35): "
           f"{'met' if q['ratio'] <= 0.35 else 'MISSED'}",
           f"speed: q4_k_m decodes {q['decode'] / hf_best['decode']:.2f}x the tokens/s of {hf_best['name']} "
           f"(target >= 3): {'met' if q['decode'] >= 3 * hf_best['decode'] else 'MISSED'}"]
    hf_f1 = by["transformers float32"].get("f1")
    if hf_f1 is not None and q.get("f1") is not None:
        d = 100 * (q["f1"] - hf_f1)
        out.append(f"quality: holdout macro-F1 {q['f1']:.4f} vs {hf_f1:.4f} for the HF model, {d:+.2f} points, "
                   f"same prediction on {100 * q['agree']:.1f}% of the holdout "
                   f"(target: at most 1 point below): {'met' if d >= -1 else 'MISSED'}")
    return out


def same_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def table(rows: list[dict], n: int) -> str:
    head = (f"{'runtime / format':<26}{'size MB':>9}{'x bf16':>8}{'top-1':>7}{'corr':>8}"
            f"{'threads':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'greedy = HF fp32':>18}{'holdout F1':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        size = f"{r['mb']:9.1f}{r['ratio']:8.2f}" if r.get("mb") else f"{'':9}{'':8}"
        fid = f"{r['top1']:7.3f}{r['corr']:8.4f}" if r.get("corr") is not None else f"{'':7}{'':8}"
        f1 = f"{r['f1']:12.4f}" if r.get("f1") is not None else ""
        lines.append(f"{r['name']:<26}{size}{fid}{r['threads']:8d}{r['prefill']:15.1f}{r['decode']:14.1f}"
                     f"{str(r['match']) + '/' + str(n):>18}{f1}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("--quants", default="f16,q8_0,q4_0,q4_k_m")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--out-dir", help="keep the GGUF files here (default: a temp dir, removed)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--recipe",
                    help="also score every model on this recipe's holdout (distill eval) and check the targets")
    ap.add_argument("--worker", choices=["hf", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "llama":
        return llama_worker(args.model_dir, json.loads(args.ids), args.tokens, args.threads)
    if args.worker == "hf":
        return hf_worker(args.model_dir, json.loads(args.ids), args.tokens, args.dtype, args.threads)
    if not args.model_dir:
        ap.error("MODEL_DIR is required")

    from distill.evaluate.metrics import agreement
    from distill.export.pipeline import export_gguf

    model_dir = Path(args.model_dir)
    n = args.tokens
    ids = prompt_ids(model_dir)
    base = bf16_bytes(model_dir)
    with tempfile.TemporaryDirectory(prefix="bench-export.") as tmp:
        out_dir = Path(args.out_dir or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        exports = {}
        for q in args.quants.split(","):
            start = time.perf_counter()
            exports[q] = export_gguf(model_dir, out_dir / f"{model_dir.name}.{q}.gguf", q, verify=not args.no_verify,
                                     recipe=args.recipe)
            exports[q]["export_s"] = time.perf_counter() - start
            print(f"exported {q} in {exports[q]['export_s']:.1f}s", file=sys.stderr)
        hf = {d: fastest("hf", model_dir, ids, n, d) for d in ("float32", "bfloat16")}
        cpp = {q: fastest("llama", Path(r["path"]), ids, n) for q, r in exports.items()}
        f1 = {}
        if args.recipe:
            f1["hf"] = holdout_f1(model_dir, args.recipe, out_dir / "eval-hf")
            for q, r in exports.items():
                f1[q] = holdout_f1(Path(r["path"]), args.recipe, out_dir / f"eval-{q}")
                print(f"holdout {q}: macro-F1 {f1[q]['macro_f1']:.4f}", file=sys.stderr)
        load = os.getloadavg()[0]

    ref = hf["float32"]["tokens"]
    rows = [{"name": f"transformers {d}", "mb": base / 1e6 * (2 if d == "float32" else 1),
             "ratio": 2.0 if d == "float32" else 1.0, "threads": s["threads"], "prefill": s["prefill_tok_s"],
             "decode": s["decode_tok_s"],
             "match": same_prefix(ref, s["tokens"]),
             "f1": f1["hf"]["macro_f1"] if f1 and d == "float32" else None} for d, s in hf.items()]
    for q, s in cpp.items():
        v = exports[q].get("verify") or {}
        rows.append({"name": f"llama.cpp {q}", "mb": exports[q]["bytes"] / 1e6, "ratio": exports[q]["bytes"] / base,
                     "top1": v.get("top1"), "corr": v.get("pearson"), "threads": s["threads"],
                     "prefill": s["prefill_tok_s"],
                     "decode": s["decode_tok_s"], "match": same_prefix(ref, s["tokens"]),
                     "f1": f1[q]["macro_f1"] if f1 else None,
                     "agree": agreement(f1["hf"]["predicted"], f1[q]["predicted"]) if f1 else None})
    print(f"model {model_dir} | prompt {len(ids)} tokens | {n} new tokens, greedy | {os.cpu_count()} CPU threads | "
          f"bf16 checkpoint {base / 1e6:.1f} MB | load average {load:.1f}")
    print(table(rows, n))
    print("size: bytes on disk (transformers rows: the checkpoint's weights at 2 or 4 bytes per parameter); "
          "top-1/corr: export verification against the source model (all probe positions)"
          + ("; holdout F1: distill eval, macro-F1 (the HF model scored in float32)" if f1 else ""))
    checks = targets(rows)
    for line in checks:
        print(line)
    if args.json:
        figures = {"rows": rows, "exports": exports, "eval": f1, "targets": checks,
                   "versions": versions("gguf", "llama-cpp-python")}
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
