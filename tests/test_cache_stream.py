"""The top-k cache at scale: training streams it shard by shard (distill/train/data.py), a synthetic
cache of any size is written through the cache's own writer (distill/synthetic_cache.py), and
several `distill generate --worker I/N` processes share one cache.

Would fail if: a streamed epoch differed from the in-memory epoch it replaces (the same examples,
each once, in the seeded order, each target's top-k the same (id, log-prob) pairs: the stream skips
the sort to rank order), a cache of the earlier codec (tkq2) streamed other numbers, a process read
more than its share, a resumed streamed run differed
from an uninterrupted one, a corrupt shard were read instead of refused, or two generate workers
wrote the same example or left one out.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_llama

from distill.cache import store as cache_mod
from distill.cache.generate import run_generate
from distill.cache.synthetic import write_synthetic_cache, write_synthetic_data
from distill.config import load_recipe
from distill.errors import DistillError, UsageError
from distill.train import run_train
from distill.train.data import SHARES_ENV, TopkStream, _widened

N_ROWS = 40  # 40 rows -> 28 training examples in shards of 3 (10 shards, the last one short)


@pytest.fixture(scope="module")
def synth(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("stream")
    model = make_tiny_llama(tmp / "model", smollm2_dir, layers=1, seed=4)
    data = write_synthetic_data(tmp / "d.jsonl", N_ROWS)
    r = {"workdir": str(tmp / "work"), "teacher": model,
         "task": {"type": "generation", "data": str(data), "split": {"validation": 0.15, "holdout": 0.15},
                  "max_length": 64},
         "generate": {"k": 8, "shard_size": 3},
         "train": {"alpha": 0.5, "temperature": 2.0, "epochs": 2, "lr": 2e-3, "batch_size": 4, "train_examples": 16,
                   "student": {"model": model}}}
    p = tmp / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    cache = write_synthetic_cache(load_recipe(p), targets=6, prompt=4, seed=1)
    return tmp, p, cache


def _same(a, b) -> bool:
    """The same example: tokens, targets, tail, and per target the same set of (id, log-prob) pairs."""
    def pairs(e):
        order = e.topk_ids.argsort(-1)
        return e.topk_ids.gather(-1, order), e.topk_logprobs.gather(-1, order)

    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("sequence", "positions", "tail_mass")) and all(
        torch.equal(x, y) for x, y in zip(pairs(a), pairs(b)))


def _epochs(streams, n, batch, epochs=2):
    """Run `epochs` epochs over the streams of one order (one per process); per epoch the examples
    each process got, checked against the whole split held in memory."""
    orders = [s.order(batch, 7, rank, len(streams)) for rank, s in enumerate(streams)]
    per_epoch = orders[0].per_epoch
    assert per_epoch == math.ceil(n / batch)
    out = []
    for e in range(epochs):
        got = [[] for _ in streams]
        for mb in range(e * per_epoch, (e + 1) * per_epoch):
            ids = [o.batch(mb) for o in orders]
            assert all(x == ids[0] for x in ids)  # every process draws the same global batch
            for rank, s in enumerate(streams):
                local = ids[0][rank::len(streams)]
                got[rank] += list(zip(local, s.examples(local)))
                # bounded: per share, windows in use and one ahead
                assert len(s._held) + len(s._pending) <= 3 * len(s.mine)
        out.append(got)
    return out, orders


def test_streamed_epoch_equals_the_in_memory_epoch(synth, monkeypatch):
    tmp, p, cache = synth
    m = cache_mod.read_manifest(cache)
    n = m.split_sizes["train"]
    data = cache_mod.load_split(cache, "train", n)  # the in-memory epoch the stream replaces
    memory = [_widened(cache_mod.example_topk(data, i)) for i in range(n)]
    shards = cache_mod.split_shards(cache, m, "train")
    assert len(shards) == 10 and shards[-1]["count"] == 1
    one = TopkStream(cache, "train", n, n, 49152)
    (epochs, _) = _epochs([one], n, 4)
    orders = []
    for got in epochs:
        ids = [i for i, _ in got[0]]
        assert sorted(ids) == list(range(n))  # each example once
        assert all(_same(e, memory[i]) for i, e in got[0])  # the very numbers load_split gives
        orders.append(ids)
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])  # shuffled, and anew each epoch
    # each shard read once an epoch; after them, perhaps the next epoch's first window, decoded ahead
    read, ahead = one.decoded[:2 * len(shards)], one.decoded[2 * len(shards):]
    assert sorted(read) == sorted(2 * [s["number"] for s in shards])
    assert set(ahead) <= {one.shards[s]["number"] for s in one.plan(2).windows[0][0].shards}
    again, _ = _epochs([TopkStream(cache, "train", n, n, 49152)], n, 4)
    assert [[i for i, _ in g[0]] for g in again] == orders  # seeded: the same order on every run

    # two processes: each reads its own share (about half the shards), together every example once
    two = [TopkStream(cache, "train", n, n, 49152) for _ in range(2)]
    epochs2, orders2 = _epochs(two, n, 4)
    for e, got in enumerate(epochs2):
        ids = [[i for i, _ in g] for g in got]
        assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(n))
        assert all(_same(x, memory[i]) for g in got for i, x in g)
    for s in two:
        assert len(s.decoded) <= 2 * (len(shards) // 2 + 2), s.decoded  # a share and the shard at its edge
    # one process drawing the order of two (the test hook the multi-process parity tests use)
    monkeypatch.setenv(SHARES_ENV, "2")
    hook, horders = _epochs([TopkStream(cache, "train", n, n, 49152)], n, 4)
    assert [b for b in (horders[0].batch(mb) for mb in range(14))] == [orders2[0].batch(mb) for mb in range(14)]
    # a capped subset (train.train_examples) streams only the shards it needs
    part = TopkStream(cache, "train", n, 10, 49152)
    (sub, _) = _epochs([part], 10, 4, epochs=1)
    assert sorted(i for i, _ in sub[0][0]) == list(range(10)) and set(part.decoded) <= {0, 1, 2, 3}


def test_a_cache_of_the_earlier_codec_streams_the_same_numbers(synth):
    """Caches written so far (codec tkq2, LZMA blocks) still stream, to the numbers the new codec
    (tkq3, zlib) gives, in the same order; load_split ranks them alike."""
    tmp, p, cache = synth
    old = write_synthetic_cache(load_recipe(p), out=tmp / "cache-tkq2", targets=6, prompt=4, seed=1, codec="tkq2")
    assert (cache_mod.read_manifest(old).codec["name"] == "tkq2"
            and cache_mod.read_manifest(cache).codec["name"] == "tkq3")
    n = cache_mod.read_manifest(cache).split_sizes["train"]
    (a, _), (b, _) = (_epochs([TopkStream(c, "train", n, n, 49152)], n, 4, epochs=1) for c in (cache, old))
    assert [i for i, _ in a[0][0]] == [i for i, _ in b[0][0]]
    assert all(all(torch.equal(getattr(x, f), getattr(y, f)) for f in x.__dataclass_fields__)
               for (_, x), (_, y) in zip(a[0][0], b[0][0]))  # the very tensors, stored order included
    ra, rb = cache_mod.load_split(cache, "train"), cache_mod.load_split(old, "train")
    assert all(torch.equal(ra[key], rb[key]) for key in ra)


def test_a_corrupt_shard_is_refused_not_read(synth, tmp_path):
    _, _, cache = synth
    bad = tmp_path / "cache"
    shutil.copytree(cache, bad)
    m = cache_mod.read_manifest(bad)
    n = m.split_sizes["train"]
    victim = cache_mod.split_shards(bad, m, "train")[4]
    raw = bytearray((bad / victim["file"]).read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit, deep in the compressed numbers
    (bad / victim["file"]).write_bytes(bytes(raw))
    inside = range(victim["start"], victim["start"] + victim["count"])
    stream, seen = TopkStream(bad, "train", n, n, 49152), []
    order = stream.order(4, 7, 0, 1)
    with pytest.raises(DistillError, match=rf"{victim['file']}: checksum mismatch"):
        for mb in range(order.per_epoch):
            ids = order.batch(mb)
            seen += [i for i, _ in zip(ids, stream.examples(ids))]
    assert seen and not set(seen) & set(inside)  # what came before: none of its examples
    with pytest.raises(DistillError, match="checksum mismatch"):
        TopkStream(bad, "train", n, n, 49152)[victim["start"]]
    with pytest.raises(DistillError, match="checksum mismatch"):
        cache_mod.load_split(bad, "train")


def _trainable_weights(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_a_resumed_streamed_run_equals_the_uninterrupted_run(synth):
    tmp, p, cache = synth
    full = run_train(load_recipe(p), out=str(tmp / "full"))
    out = tmp / "stopped"
    # 16 examples (the first 6 shards, the last one in part), 4 batches an epoch: stop inside epoch 1's
    # third window, resume, and it must go on exactly as the uninterrupted run
    run_train(load_recipe(p), out=str(out), stop_after_steps=3)
    run_train(load_recipe(p), out=str(out), resume=True)
    a, b = ([json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()] for d in (full, out))
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b] and len([r for r in a if "loss" in r]) == 8
    assert all(r["kd"] > 0 for r in a if "loss" in r)
    wa, wb = _trainable_weights(full), _trainable_weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise on CPU
    info = json.loads((full / "training.json").read_text())
    assert info["train_examples"] == 16


# -------------------------------------------------------------------------------------------------
# generate --worker I/N


def _gen_recipe(tmp: Path, teacher: str) -> Path:
    rows = [{"prompt": f"Question {i}?", "response": f"Answer number {i}."} for i in range(24)]
    data = tmp / "g.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = {"workdir": str(tmp / "work"), "teacher": teacher,
         "task": {"type": "generation", "data": str(data), "split": {"validation": 0.25, "holdout": 0.1},
                  "max_length": 48},
         "generate": {"k": 4, "batch_size": 2, "shard_size": 2}}
    p = tmp / "g.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_two_generate_workers_share_a_cache_disjointly_and_a_final_run_completes_it(tmp_path, tiny_model):
    recipe = _gen_recipe(tmp_path, tiny_model)
    shared = tmp_path / "shared"
    # both at once on one cache: worker 0 a real `distill generate --worker 0/2`, worker 1 this process
    proc = subprocess.Popen([sys.executable, "-m", "distill", "generate", str(recipe), "--backend", "transformers",
                             "--out", str(shared), "--worker", "0/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run_generate(load_recipe(recipe), backend="transformers", out=str(shared), worker=(1, 2))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "worker 0/2: its shards" in _
    m = cache_mod.read_manifest(shared)
    assert m.workers == 2 and not m.complete  # workers never complete a split
    for s in m.shards:  # each shard written once, by the worker it belongs to
        assert s["worker"] == f"{s['number'] % 2}/2"
    numbers = {split: sorted(s["number"] for s in m.shards if s["split"] == split) for split in ("train", "validation")}
    assert all(nums == list(range(len(nums))) and len(nums) > 2 for nums in numbers.values())  # none left out
    written = {s["file"]: s["sha256"] for s in m.shards}
    # another N, the same I twice, or a run without --worker beside a worker: refused
    with pytest.raises(UsageError, match="being written by 2 workers"):
        run_generate(load_recipe(recipe), backend="transformers", out=str(shared), worker=(0, 3))
    with cache_mod.writer_lock(shared, (1, 2)):
        with pytest.raises(UsageError, match="worker 1/2 is already running"):
            with cache_mod.writer_lock(shared, (1, 2)):
                pass
        with pytest.raises(UsageError, match="another `distill generate`"):
            with cache_mod.writer_lock(shared):
                pass
    # the final run checks every shard, repairs what is broken (a shard is a pure function of its
    # examples: the same bytes again), writes nothing else and completes the manifest
    (shared / m.shards[0]["file"]).write_bytes(b"torn")
    run_generate(load_recipe(recipe), backend="transformers", out=str(shared))
    done = cache_mod.read_manifest(shared)
    assert done.workers is None and done.complete == {"train": True, "validation": True}
    assert {s["file"]: s["sha256"] for s in done.shards} == written
    assert [s.get("worker") for s in done.shards][1:] == [s["worker"] for s in m.shards][1:]
    for split, size in done.split_sizes.items():  # every example exactly once, in order
        assert cache_mod.load_split(shared, split)["index"].tolist() == list(range(size))
