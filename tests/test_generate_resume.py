"""Killing `distill generate` (SIGKILL) at several points and re-running the same command gives the
same cache as an uninterrupted run, example for example, without redoing finished shards; a second
run on a cache in use is refused; a cache from another k or data is refused.

Runs are real CLI subprocesses. DISTILL_TEST_PAUSE makes a run wait at a chosen point (after a
shard is recorded, or between writing a shard and recording it) so the kill lands there.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distill.cache import store as cache_mod
from distill.cache.generate import run_generate
from distill.config import load_recipe
from distill.errors import UsageError

PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello in French.", "Give me a fruit.",
           "Count to three.", "Which animal barks?", "Opposite of hot?", "Capital of Italy?",
           "A word for happy?", "Colour of grass?", "Name a planet.", "What do bees make?",
           "A sound a cat makes?", "Name a season.", "What is ice?", "Where do fish live?",
           "Name a metal.", "What is 3 times 3?", "Name a tree.", "Colour of the sky?"]


def write_recipe(tmp: Path, teacher: str, k: int = 8) -> Path:
    # every third row has no response: the teacher writes it (sampled, seeded per batch)
    rows = [{"prompt": p} if i % 3 == 0 else {"prompt": p, "response": f"Answer {i}: {p.lower()}"}
            for i, p in enumerate(PROMPTS)]
    data = tmp / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = {"workdir": str(tmp / "work"), "teacher": teacher,
         "task": {"type": "generation", "data": str(data), "split": {"validation": 0.2, "holdout": 0.2},
                  "max_length": 64},
         "generate": {"k": k, "batch_size": 2, "shard_size": 2, "max_new_tokens": 5, "temperature": 1.0}}
    p = tmp / "gen.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def start(recipe: Path, out: Path, pause: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, DISTILL_TEST_PAUSE=pause or "")
    return subprocess.Popen([sys.executable, "-m", "distill", "generate", str(recipe), "--backend", "transformers",
                             "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def recorded(out: Path) -> list[dict]:
    try:
        return json.loads((out / "manifest.json").read_text())["shards"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"generate ended (status {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill(proc: subprocess.Popen):
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    proc.stderr.close()


def assert_same_cache(a: Path, b: Path):
    for split in ("train", "validation"):
        da, db = cache_mod.load_split(a, split), cache_mod.load_split(b, split)
        n = da["index"].numel()
        assert n == db["index"].numel() and da["index"].tolist() == list(range(n))  # none lost or duplicated
        for i in range(n):
            x, y = cache_mod.example_topk(da, i), cache_mod.example_topk(db, i)
            for f in dataclasses.fields(x):
                assert torch.equal(getattr(x, f.name), getattr(y, f.name)), (split, i, f.name)


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_equals_uninterrupted_run(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model)
    ref, out = tmp_path / "ref", tmp_path / "cache"
    p = start(recipe, ref)
    assert p.wait(600) == 0, p.stderr.read()[-3000:]
    total = len(recorded(ref))
    assert total >= 6

    # 1. killed while paused right after its first shard; meanwhile a second run is refused (lock)
    p = start(recipe, out, pause="after_shard:60")
    wait_for(p, lambda: len(recorded(out)) >= 1, "the first shard")
    other = subprocess.run([sys.executable, "-m", "distill", "generate", str(recipe), "--backend", "transformers",
                            "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "another `distill generate`" in other.stderr, other.stderr[-2000:]
    kill(p)
    kept = {s["file"]: s for s in recorded(out)}
    assert len(kept) == 1

    # 2. killed between writing a shard file and recording it in the manifest
    p = start(recipe, out, pause="before_record:60")
    files = lambda: {f.name for f in out.glob("*.safetensors")}  # noqa: E731
    wait_for(p, lambda: len(files() - set(kept)) >= 1, "an unrecorded shard file")
    kill(p)
    orphan = files() - set(kept)
    assert orphan and not (orphan & {s["file"] for s in recorded(out)})  # on disk, not in the manifest

    # 3. killed after two more shards
    p = start(recipe, out, pause="after_shard:1")
    wait_for(p, lambda: len(recorded(out)) >= 3, "three shards")
    kill(p)
    kept = {s["file"]: s for s in recorded(out)}
    mtimes = {f: (out / f).stat().st_mtime_ns for f in kept}
    (out / ".train-00099.safetensors.abc.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves

    # 4. the same command again finishes the job
    p = start(recipe, out)
    assert p.wait(600) == 0, p.stderr.read()[-3000:]
    final = {s["file"]: s for s in recorded(out)}
    assert len(final) == total
    for f, s in kept.items():  # finished shards were not redone
        assert final[f]["sha256"] == s["sha256"] and final[f]["written"] == s["written"]
        assert (out / f).stat().st_mtime_ns == mtimes[f]
    assert not list(out.glob(".*.tmp"))
    m = cache_mod.read_manifest(out)
    assert m.complete == {"train": True, "validation": True} and m.split_sizes["train"] > 0
    assert m.responses and m.responses["max_new_tokens"] == 5
    assert_same_cache(out, ref)


def test_resume_refuses_other_k_or_data_and_repairs_a_corrupt_shard(tmp_path, tiny_model):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model))
    out = run_generate(recipe, backend="transformers")
    before = cache_mod.load_split(out, "train")
    with pytest.raises(UsageError, match="k: cache has 8, this run has 4"):
        run_generate(recipe, backend="transformers", k=4)
    (tmp_path / "other").mkdir()
    other = load_recipe(write_recipe(tmp_path / "other", tiny_model))
    other.task.max_examples = 10
    with pytest.raises(UsageError, match="data_fingerprint"):
        run_generate(other, backend="transformers", out=str(out))
    # a damaged shard: refused on load, dropped (split incomplete) on resume, regenerated identically
    m = cache_mod.read_manifest(out)
    shard = out / next(s for s in m.shards if s["split"] == "train")["file"]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(Exception, match="checksum mismatch"):
        cache_mod.load_split(out, "train")
    run_generate(recipe, backend="transformers")
    after = cache_mod.load_split(out, "train")
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_load_split_refuses_a_gap_in_the_shards(tmp_path, tiny_model):
    out = run_generate(load_recipe(write_recipe(tmp_path, tiny_model)), backend="transformers")
    m = cache_mod.read_manifest(out)
    m.shards = [s for s in m.shards if not (s["split"] == "train" and s["number"] == 1)]
    cache_mod.write_manifest(out, m)
    with pytest.raises(Exception, match="starts at example 4, expected 2"):
        cache_mod.load_split(out, "train")
