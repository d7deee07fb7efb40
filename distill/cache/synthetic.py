"""Synthetic top-k caches of any size, written through the cache's own writer, so the reader's memory
and speed can be measured (scripts/bench_cache.py, tests) at sizes no teacher here can produce.

`write_synthetic_cache(recipe)` splits the recipe's data as `distill generate` does (so `distill
train` accepts the cache: same fingerprint, split sizes, tokenizer) and gives every example of the
wanted splits a random but valid row: a sequence of the real tokenizer's ids, its last tokens the
targets, and at each target k distinct token ids with log-probabilities in descending order and a
tail mass, together summing to one. The ids are drawn mostly from a few hundred "frequent" tokens
per position, as a teacher's top k are, so shards compress to about what a teacher's do. Each shard
is a pure function of (seed, split, shard number): an interrupted write resumes like generate.

`distinct=R` makes the top-k numbers of shard j those of shard j mod R (the example numbers stay each
shard's own), so a large cache costs R shards' encoding (the slow part)
and the rest is writing; every shard is still its own checksummed file, decoded on its own.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from distill.cache import store as cache_mod
from distill.cache import topk_codec
from distill.config import Recipe, resolve_teacher
from distill.data.splits import prepare_splits
from distill.errors import UsageError
from distill.models.loading import load_tokenizer, resolve_model_path, tokenizer_hash


def write_synthetic_data(path: str | Path, n: int) -> Path:
    """n generation rows (prompt and response text); the cache, not this text, is what training reads."""
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n"
                            for i in range(n)))
    return path


def write_synthetic_cache(recipe: Recipe, out: str | Path | None = None, targets: int = 128, prompt: int = 16,
                          k: int | None = None, seed: int = 0, splits=("train", "validation"),
                          distinct: int | None = None, preset: int = 6, codec: str = topk_codec.NAME) -> Path:
    """A complete top-k cache for the recipe's data (default WORKDIR/cache): about `targets` target
    tokens per example (uniform in [targets/2, 3*targets/2]) after `prompt` prompt tokens; k defaults
    to generate.k, the shard size to generate.shard_size; `codec` the codec's name (topk_codec.PACKERS)
    and `preset` its compressor's effort."""
    if recipe.task.type != "generation":
        raise UsageError(f"{recipe.path or 'recipe'}: task.type: a top-k cache is for generation tasks")
    k = k or recipe.generate.k
    sp = prepare_splits(recipe.task, recipe.workdir, recipe.path or "recipe")
    tok = load_tokenizer(resolve_model_path(resolve_teacher(recipe.teacher).source))
    vocab = len(tok)
    cache_dir = Path(out or recipe.workdir_path / "cache")
    wanted = cache_mod.Manifest(
        kind="topk", teacher=f"synthetic (seed {seed})", tokenizer_hash=tokenizer_hash(tok), vocab_size=vocab, k=k,
        data_fingerprint=sp.fingerprint, labels=sp.labels, max_length=prompt + targets + targets // 2,
        backend="synthetic",
        codec=dict(cache_mod.DEFAULT_CODEC, name=codec, **({"preset": preset} if preset != 6 else {})),
        shard_size=recipe.generate.shard_size)
    with cache_mod.writer_lock(cache_dir):
        m = cache_mod.open_for_writing(cache_dir, wanted)
        size = m.shard_size
        frequent = np.random.default_rng([seed, 0]).permutation(vocab)  # the "frequency order" of the vocabulary
        for split in splits:
            n, salt = len(sp.get(split)), 1 + ("train", "validation", "holdout").index(split)
            done, patterns = cache_mod.done_shards(m, split), {}
            for number in range((n + size - 1) // size):
                if number in done:
                    continue
                start = number * size
                count = min(size, n - start)
                pattern = number % distinct if distinct and count == size else number
                if pattern not in patterns:
                    rng = np.random.default_rng([seed, salt, pattern])
                    rows = synthetic_rows(rng, count, 0, vocab, frequent, targets, prompt, k)
                    patterns[pattern] = cache_mod.encode_topk(rows, m)
                tensors = dict(patterns[pattern])
                index = topk_codec.pack_ints(torch.arange(start, start + count), m.codec["name"])
                tensors["index_z"], tensors["index_zi"] = index
                cache_mod.write_shard(cache_dir, m, split, number, start, tensors, encoded=True)
            cache_mod.mark_complete(cache_dir, m, split, n)
    return cache_dir


def synthetic_rows(rng, n: int, start: int, vocab: int, frequent: np.ndarray, targets: int, prompt: int,
                   k: int) -> dict[str, torch.Tensor]:
    """The tensors of one top-k shard (cache.pack_topk's layout) of n random valid examples."""
    n_t = rng.integers(max(1, targets // 2), targets + targets // 2 + 1, size=n)
    lengths = n_t + prompt
    seq_off = np.concatenate([[0], np.cumsum(lengths)])
    pos_off = np.concatenate([[0], np.cumsum(n_t)])
    input_ids = rng.integers(0, vocab, size=int(seq_off[-1]))
    positions = np.concatenate([np.arange(prompt, prompt + t) for t in n_t])
    rows = int(pos_off[-1])
    # k distinct ids per row: increasing ranks (small steps from a mostly small offset) in the frequency order
    steps = np.minimum(rng.geometric(0.35, size=(rows, k)), 16)
    span = int(steps.sum(1).max())
    offset = np.minimum(rng.geometric(1 / 200, size=(rows, 1)) - 1, vocab - span - 1)
    ids = frequent[offset + np.cumsum(steps, 1) - 1]
    # descending log-probabilities: softmax of sorted normals, scaled by the mass the top k hold
    z = -np.sort(-rng.standard_normal((rows, k)) * 2.0, axis=1)
    top_mass = 1.0 - rng.beta(1.0, 4.0, size=(rows, 1)) * 0.9
    lp = z - np.log(np.exp(z).sum(1, keepdims=True)) + np.log(top_mass)
    return {
        "index": torch.arange(start, start + n, dtype=torch.long),
        "input_ids": torch.from_numpy(input_ids.astype(np.int32)),
        "seq_offsets": torch.from_numpy(seq_off.astype(np.int64)),
        "positions": torch.from_numpy(positions.astype(np.int32)),
        "pos_offsets": torch.from_numpy(pos_off.astype(np.int64)),
        "topk_ids": torch.from_numpy(ids.astype(np.int32)),
        "topk_logprobs": torch.from_numpy(lp.astype(np.float32)),
        "tail_mass": torch.from_numpy((1.0 - top_mass[:, 0]).astype(np.float32)),
    }
