"""A full disk during `distill generate`: a clear message, exit status 1, every finished shard kept
with a valid checksum, and the same command finishing the job once space is freed.

The small disk is a real tmpfs mounted for the test (needs root, as on this project's machines and
CI; skipped elsewhere)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill.cache import store as cache_mod

PROMPTS = [f"Tell me fact number {i} about the sea." for i in range(24)]


def recipe(tmp: Path, teacher: str, out_name: str) -> Path:
    data = tmp / "gen.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": f"Fact {i}: the sea is large and salty, "
                                        "and many fish live in it."}) + "\n" for i, p in enumerate(PROMPTS)))
    r = {"workdir": str(tmp / f"work-{out_name}"), "teacher": teacher,
         "task": {"type": "generation", "data": str(data), "split": {"validation": 0.2, "holdout": 0.1},
                  "max_length": 96},
         "generate": {"k": 20, "batch_size": 2, "shard_size": 2}}
    p = tmp / f"{out_name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def generate(recipe_path, out):
    return subprocess.run([sys.executable, "-m", "distill", "generate", str(recipe_path), "--backend", "transformers",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_generate_on_a_full_disk_stops_cleanly_and_resumes(tmp_path, tiny_model, small_disk):
    full = tmp_path / "reference-cache"
    p = generate(recipe(tmp_path, tiny_model, "ref"), full)
    assert p.returncode == 0, p.stderr[-2000:]
    total = du(full)
    size_kb = max(8, (total // 2) // 1024)  # room for about half the cache
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(small_disk)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.strip()}")
    out = small_disk / "cache"
    p = generate(recipe(tmp_path, tiny_model, "small"), out)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert "no space left" in p.stderr and "Traceback" not in p.stderr
    m = cache_mod.read_manifest(out)
    assert m.shards, "some shards should have fitted"
    for s in m.shards:  # everything recorded is complete and intact
        assert cache_mod._shard_ok(out, s)
    assert not list(out.glob(".*.tmp")), "no half-written temporary files left behind"
    kept = {s["file"]: s["sha256"] for s in m.shards}
    subprocess.run(["mount", "-o", f"remount,size={4 * total // 1024 + 256}k", str(small_disk)], check=True)
    p = generate(recipe(tmp_path, tiny_model, "small"), out)
    assert p.returncode == 0, p.stderr[-2000:]
    m2 = cache_mod.read_manifest(out)
    assert all(next(s for s in m2.shards if s["file"] == f)["sha256"] == h for f, h in kept.items())
    for split in ("train", "validation"):
        a, b = cache_mod.load_split(full, split), cache_mod.load_split(out, split)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0.0, rtol=0.0)
