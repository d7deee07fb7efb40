"""One recipe's training step under settings that may change its speed (all but `frozen` change no number
in the recipe's intent), measured in one run: each round starts a fresh process per variant, one after the other, on the
same recipe, student and batches; seconds per optimizer step, peak memory, and each variant's ratio to
float32 with glibc's malloc.

  fp32       the recipe as it is (train.mixed_precision: no)
  bf16       train.mixed_precision: bf16 (torch autocast on the CPU)
  jemalloc   fp32 with jemalloc preloaded (LD_PRELOAD; Debian: apt-get install libjemalloc2), which
             PyTorch's CPU performance guide suggests; skipped when the library is not found
  pair       two fp32 processes side by side, one thread each (OMP_NUM_THREADS=1), as two independent
             training stages would run on a 2-core machine; its s/step is each process's time over two,
             the cost of a step when two runs share the machine
  frozen     fp32 with train.freeze_embeddings: true, the one variant that changes what is trained (the
             token embeddings and the tied output layer stay as built), so its quality is a separate
             question, answered on validation (scripts/banking77_choices.sh)

    python scripts/bench_step_variants.py                 # a 10-of-30-layer SmolLM2 student, Banking77
    python scripts/bench_step_variants.py --recipe R --set KEY=VALUE ...
    python scripts/bench_step_variants.py --variants fp32,frozen

The default is the Banking77 control's training step (recipes/banking77-control.yaml: label-token CE over
the vocabulary, batch 32 here as the study's student) on the base SmolLM2-135M cut to its first 10 layers,
so it needs no earlier stage. Writes nothing but scratch directories under a temporary folder.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchlib import peak_rss_mib


def child(recipe_path: str, out: str, steps: int, sets: list[str]) -> None:
    """One training process: two warm-up steps, then `steps` timed optimizer steps of the trainer's own
    train_step; prints seconds per step and the peak memory as JSON."""
    from distill.config import load_recipe
    from distill.train.loop import restore_or_start, train_step
    from distill.train.setup import setup

    run = setup(load_recipe(recipe_path, sets), None, out)
    state = restore_or_start(run, False)
    for _ in range(2):  # warm-up: the first steps allocate the optimizer's state
        train_step(run, state)
    barrier = os.environ.get("BENCH_BARRIER")  # processes timed side by side start their clocks together
    if barrier:
        open(f"{barrier}/{os.getpid()}", "w").close()
        while len(os.listdir(barrier)) < int(os.environ["BENCH_BARRIER_N"]):
            time.sleep(0.05)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(run, state)
    print(json.dumps({"s_per_step": (time.perf_counter() - t0) / steps, "peak_rss_mb": peak_rss_mib()}))


DEFAULT_SETS = ["teacher=teachers/smollm2-135m-instruct.yaml", "train.student.model=null",
                "train.student.num_layers=10", "train.batch_size=32"]
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/banking77-control.yaml")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per process")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--variants", default="fp32,bf16,jemalloc,pair,frozen", help="comma-separated, fp32 first")
    ap.add_argument("--set", dest="sets", action="append", default=None, metavar="KEY=VALUE",
                    help="recipe overrides, as `distill train --set` (repeatable; default: the 10-layer student above)")
    a = ap.parse_args()
    sets = DEFAULT_SETS if a.sets is None else a.sets
    known = {"fp32": ([], {}), "bf16": (["train.mixed_precision=bf16"], {}),
             "jemalloc": ([], {"LD_PRELOAD": JEMALLOC}), "pair": ([], {"OMP_NUM_THREADS": "1"}),
             "frozen": (["train.freeze_embeddings=true"], {})}
    wanted = a.variants.split(",")
    if wanted[0] != "fp32" or set(wanted) - set(known):
        sys.exit(f"--variants {a.variants}: expected fp32 first, then any of {', '.join(known)}")
    if "jemalloc" in wanted and not os.path.exists(JEMALLOC):
        print(f"jemalloc: {JEMALLOC} not found, skipped")
        wanted.remove("jemalloc")
    variants = {k: known[k] for k in wanted}
    times = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, (extra, env) in variants.items():
                n = 2 if name == "pair" else 1
                barrier = tempfile.mkdtemp(dir=tmp)
                procs = [subprocess.Popen(
                    [sys.executable, __file__, "--child", a.recipe, f"{tmp}/{name}{i}", str(a.steps),
                     f"workdir={tmp}/work-{name}{i}", *sets, *extra],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "BENCH_BARRIER": barrier,
                         "BENCH_BARRIER_N": str(n), **env}) for i in range(n)]
                outs = [p.communicate() for p in procs]
                for p, (_, err) in zip(procs, outs):
                    if p.returncode:
                        sys.exit(f"round {r + 1}, {name}: the training process failed:\n{err[-3000:]}")
                results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
                res = {"s_per_step": sum(x["s_per_step"] for x in results) / n / n,
                       "peak_rss_mb": sum(x["peak_rss_mb"] for x in results)}
                times[name].append(res["s_per_step"])
                print(f"round {r + 1}  {name:<9} {res['s_per_step']:7.3f} s/step  peak memory "
                      f"{res['peak_rss_mb']:.0f} MB", flush=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"best of {a.rounds} round(s), seconds per step and time relative to fp32:")
    for k, v in best.items():
        print(f"  {k:<9} {v:7.3f} s/step  {v / best['fp32']:6.2f}x")


if __name__ == "__main__":
    main()
