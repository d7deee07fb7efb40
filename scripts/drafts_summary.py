#!/usr/bin/env python
"""The draft study's table (scripts/snips-drafts.sh): every draft's bench on the test queries side by side,
and the issue's two targets: the draft trained for acceptance against the same-size draft trained on the
teacher's responses as text (mean accepted length at every gamma, the headline at the gamma the acceptance
draft runs fastest at in transformers), and the best end-to-end speed-up over the teacher alone.

    python scripts/drafts_summary.py runs/snips/drafts     # writes summary.md and summary.json there
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = (("cut-10", "untrained cut"), ("seqkd-10", "responses as text (seqkd)"),
        ("student-10", "SNIPS student (KD + CE)"), ("draft-10", "trained for acceptance"),
        ("cut-4", "untrained cut"), ("seqkd-4", "responses as text (seqkd)"), ("draft-4", "trained for acceptance"))


def by_gamma(report: dict) -> dict[int, dict]:
    """Acceptance at every gamma counted (timed or not), the timed rows' figures over it."""
    counted = {int(g): a for g, a in report.get("acceptance", {}).items()}
    return {**counted, **{r["gamma"]: r for r in report["gammas"]}}


RUNTIMES = (("bench", "transformers, fp32"), ("bench-gguf", "llama.cpp, teacher f16, draft q8_0"))


def read(work: Path, folder: str) -> dict[str, dict]:
    return {name: json.loads((work / folder / name / "bench.json").read_text())
            for name, _ in ROWS if (work / folder / name / "bench.json").is_file()}


def main(work: Path) -> None:
    by_runtime = {folder: read(work, folder) for folder, _ in RUNTIMES}
    reports = by_runtime["bench"]
    if not reports:
        sys.exit(f"error: no bench.json under {work}/bench: run scripts/snips-drafts.sh first")
    lines = ["| runtime | draft | how it was made | layers | parameters | acceptance of proposal 1 | "
             "mean accepted at γ 4 | best γ | tokens/forward at best γ | tok/s alone → with draft | speed-up |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    every = [(runtime, name, how, by_runtime[folder][name]) for folder, runtime in RUNTIMES for name, how in ROWS
             if name in by_runtime[folder]]
    for runtime, name, how, r in every:
        g, best = by_gamma(r), by_gamma(r)[r["best_gamma"]]
        first = g[min(g)]["acceptance_per_position"][0]
        at4 = f"{g[4]['mean_accepted']:.2f}" if 4 in g else "—"
        size = r["draft_size"]
        lines.append(f"| {runtime} | {name} | {how} | {size['layers']} | {size['parameters'] / 1e6:.1f}M | "
                     f"{first:.3f} | {at4} | {r['best_gamma']} | {best['tokens_per_forward']:.2f} | "
                     f"{r['alone']['tokens_per_s']:.1f} → {best['tokens_per_s']:.1f} | {r['best_speedup']:.2f}× |")
    targets = {}
    for size in (10, 4):
        d, s = reports.get(f"draft-{size}"), reports.get(f"seqkd-{size}")
        if d and s:
            gd, gs = by_gamma(d), by_gamma(s)
            ratios = {g: gd[g]["mean_accepted"] / max(gs[g]["mean_accepted"], 1e-9) for g in gd if g in gs}
            g = d["best_gamma"]  # both drafts at the same gamma: the one the acceptance draft runs fastest at
            targets[f"{size} layers"] = {"mean_accepted_ratio_by_gamma": ratios, "gamma": g,
                                         "ratio_at_the_drafts_best_gamma": ratios[g], "met_1.2x": ratios[g] >= 1.2}
    speedups = {f"{name} ({runtime})": r["best_speedup"] for runtime, name, _, r in every}
    top = max(speedups, key=speedups.get)
    lines += ["", "Draft trained for acceptance ÷ same-size seqkd draft, mean accepted length (target ≥ 1.2×):"]
    for size, t in targets.items():
        per = ", ".join(f"γ {g}: {v:.2f}×" for g, v in sorted(t["mean_accepted_ratio_by_gamma"].items()))
        lines.append(f"- {size}: {t['ratio_at_the_drafts_best_gamma']:.2f}× at γ {t['gamma']}, the acceptance "
                     f"draft's fastest ({per})")
    lines.append(f"\nBest end-to-end speed-up (target ≥ 1.5×): {top}, {speedups[top]:.2f}×")
    choice = work / "choice.json"
    if choice.is_file():
        c = json.loads(choice.read_text())
        lines.append(f"\nDivergence chosen on validation (mean accepted at γ 4, 4 layers): {c['chosen']} "
                     f"({', '.join(f'{k} {v:.3f}' for k, v in c['mean_accepted_at_gamma_4'].items())})")
    text = "\n".join(lines) + "\n"
    (work / "summary.md").write_text(text)
    (work / "summary.json").write_text(json.dumps({"targets": targets, "speedups": speedups}, indent=1))
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/snips/drafts"))
