"""Training steps with torch's large CPU tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=1, what
every `distill` command sets: cli.py) against 4 KiB pages, measured in one run: each round starts two fresh
processes, one of each, one after the other, on the same recipe, student and batches; seconds per
optimizer step, each process's peak memory, the ratio.

    python scripts/bench_huge_pages.py                                  # the Banking77 student (stage 06)
    python scripts/bench_huge_pages.py --recipe recipes/default.yaml    # any recipe whose cache exists

Needs the recipe's cache and starting model (for banking77-healed.yaml, stages 01-05 of scripts/banking77.sh).
Writes nothing but a scratch model directory under a temporary folder.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from distill.config import load_recipe
from distill.train.loop import restore_or_start, train_step
from distill.train.setup import setup
recipe = load_recipe(sys.argv[1], sys.argv[4:])
run = setup(recipe, None, sys.argv[2])
state = restore_or_start(run, False)
for _ in range(2):  # warm-up: the first steps allocate the optimizer's state
    train_step(run, state)
t0, n = time.perf_counter(), int(sys.argv[3])
for _ in range(n):
    train_step(run, state)
print(json.dumps({"s_per_step": (time.perf_counter() - t0) / n,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/banking77-healed.yaml")
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per process")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override, as `distill train --set` (repeatable)")
    a = ap.parse_args()
    times = {"huge": [], "4k": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, flag in (("4k", "0"), ("huge", "1")):
                out = subprocess.run([sys.executable, "-c", CHILD, a.recipe, f"{tmp}/{name}", str(a.steps), *a.sets],
                                     capture_output=True, text=True, env={**os.environ, "THP_MEM_ALLOC_ENABLE": flag})
                if out.returncode:
                    sys.exit(f"round {r + 1}, {name}: the training process failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                times[name].append(res["s_per_step"])
                print(f"round {r + 1}  {name:<5} pages  {res['s_per_step']:.3f} s/step  peak memory "
                      f"{res['peak_rss_mb']:.0f} MB", flush=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"best of {a.rounds}: 4 KiB pages {best['4k']:.3f} s/step, huge pages {best['huge']:.3f} s/step: "
          f"{best['4k'] / best['huge']:.2f}x")


if __name__ == "__main__":
    main()
