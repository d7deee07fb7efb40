"""`distill generate`: run the teacher over the training and validation splits into a cache.

Classification: soft labels. Generation: the teacher's top k (and tail mass) at every response token.
A generation row without a response (or every row, with `generate.responses: teacher`) gets one
written by the teacher, sampled with the recipe's `generate` settings, and the teacher's top k at each
response token is captured in the same pass (sequence-level distillation).

Interrupting (even SIGKILL) and re-running the same command finishes the job: finished shards are
kept (checked by SHA-256), the missing ones are made again, and since each shard is a pure function of
its examples (teacher-written responses use per-example seeds, or one seed per batch for transformers)
the finished cache equals an uninterrupted one.

`worker=(I, N)` (`--worker I/N`): one of N generate processes, on machines sharing the cache's
filesystem, each writing only the shards numbered I mod N of every split (disjoint, and together all
of them); a worker never marks a split complete. A final run without a worker (it waits for none: it
is refused while any worker holds the cache) checks every shard, writes any still missing and
completes the manifest. Since a shard is a pure function of its examples, the result equals one
run's cache.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from distill.cache import store as cache_mod
from distill.cache.written_pool import join_written
from distill.config import GenerateConfig, Recipe, TeacherSpec, resolve_teacher, validate_recipe
from distill.data.leakage import split_overlaps, warn_overlaps
from distill.data.prompts import encode_classification, encode_generation, generation_prompt, stop_ids
from distill.data.splits import prepare_splits, write_splits
from distill.errors import UsageError, redact
from distill.fileio import pause_point
from distill.models.label_tokens import check_label_collisions
from distill.models.loading import load_tokenizer, resolve_model_path, tokenizer_hash, vocab_rows_or_tokenizer
from distill.teacher.backend import make_backend, pick_backend
from distill.teacher.common import Sampling
from distill.versions import versions

log = logging.getLogger(__name__)


def example_seed(base: int, split: str, index: int) -> int:
    """A seed per example, the same on every run and with any batching."""
    salt = {"train": 0, "validation": 1, "holdout": 2}.get(split, 3)
    return (int(base) * 1_000_003 + salt * 100_000_007 + index) % (2 ** 31 - 1)


def sampling_settings(gen: GenerateConfig) -> Sampling:
    """Teacher-written responses' sampling (ranges checked by config.validate_recipe)."""
    return Sampling(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, seed=gen.seed)


def _teacher_for_run(spec: TeacherSpec, backend: str | None, urls) -> tuple[TeacherSpec, str | None]:
    if urls:
        if backend not in (None, "auto", "server"):
            raise UsageError("--teacher-url sends the work to a server; it cannot be combined with "
                             f"--backend {backend}")
        from distill.teacher.remote import normalize_url

        spec.url, spec.urls, spec.backend = None, [normalize_url(u) for u in urls], "server"
        backend = "server"
    return spec, backend


def _teacher_writes(task, gen: GenerateConfig, kind: str, todo_splits: dict) -> dict[str, list[bool]]:
    """For each split, which examples get a teacher-written response (generation rows without one,
    or every row with generate.responses: teacher)."""
    out = {}
    for name, examples in todo_splits.items():
        if kind != "topk":
            out[name] = [False] * len(examples)
            continue
        flags = [gen.responses == "teacher" or ex.get("response") is None for ex in examples]
        if gen.responses == "data" and any(flags):
            i = flags.index(True)
            raise UsageError(f"{task.data}: example {examples[i]['id']} has no '{task.response_field}' and "
                             "generate.responses is 'data'; give every row a response or set responses: auto")
        out[name] = flags
    return out


def run_generate(recipe: Recipe, teacher: str | None = None, backend: str | None = None,
                 out: str | None = None, k: int | None = None, urls: list[str] | None = None,
                 worker: tuple[int, int] | None = None) -> Path:
    """Fill the cache (default WORKDIR/cache) for the splits in generate.splits; resumes a partial one.
    `k` replaces generate.k; the recipe is validated first (it may come from code). `worker` (I, N):
    write only shards I mod N and leave completing the manifest to a final run without it."""
    if worker is not None and not (worker[1] >= 1 and 0 <= worker[0] < worker[1]):
        raise UsageError(f"--worker {worker[0]}/{worker[1]}: expected I/N with 0 <= I < N")
    if k is not None:
        recipe = dataclasses.replace(recipe, generate=dataclasses.replace(recipe.generate, k=k))
    validate_recipe(recipe)
    task, gen, src = recipe.task, recipe.generate, recipe.path or "recipe"
    if recipe.teachers and teacher is None:  # each teacher into its own cache: cache/ensemble.py
        raise UsageError(f"{src}: names several teachers; run them with cache.ensemble.run_generate_teachers "
                         "(as `distill generate` does), or give one teacher")
    spec, backend = _teacher_for_run(resolve_teacher(teacher or recipe.teacher), backend, urls)
    splits = prepare_splits(task, recipe.workdir, src, write=False)  # written once the labels pass the tokenizer
    warn_overlaps(split_overlaps(task, splits))
    backend_name = pick_backend(backend or gen.backend, spec)
    tok_source = spec.tokenizer or spec.source
    if not tok_source:
        raise UsageError(f"teacher {spec.name}: a served teacher needs a local tokenizer; give the teacher spec a "
                         "`source` (or `tokenizer`) naming the same model the server runs")
    model_path = resolve_model_path(tok_source)
    tok = load_tokenizer(model_path)
    if splits.labels:
        check_label_collisions(tok, splits.labels)
    write_splits(task, splits, recipe.workdir)
    splits = join_written(recipe, splits)  # task.written_data: unlabelled training rows, scored too
    vocab_rows = vocab_rows_or_tokenizer(model_path, tok)
    kind = "soft_labels" if task.type == "classification" else "topk"
    if kind == "topk" and gen.k > spec.max_logprobs and backend_name != "server":
        raise UsageError(f"k={gen.k} is above the teacher's max_logprobs={spec.max_logprobs}; "
                         "raise max_logprobs in the teacher spec")
    sampling = sampling_settings(gen) if kind == "topk" else None
    if sampling is not None:
        sampling.stop_ids = stop_ids(tok)
    todo_splits = {name: splits.get(name) for name in gen.splits}
    teacher_writes = _teacher_writes(task, gen, kind, todo_splits)
    responses = None
    if any(any(f) for f in teacher_writes.values()):
        responses = {"mode": gen.responses, "max_new_tokens": sampling.max_new_tokens,
                     "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed}

    cache_dir = Path(out or recipe.workdir_path / "cache")
    wanted = cache_mod.Manifest(
        kind=kind, teacher=redact(spec.source or spec.url or ",".join(spec.urls or [])),
        tokenizer_hash=tokenizer_hash(tok), vocab_size=vocab_rows, k=gen.k if kind == "topk" else None,
        data_fingerprint=splits.fingerprint, labels=splits.labels, max_length=task.max_length,
        backend=backend_name, versions=versions(), responses=responses,
        codec=dict(cache_mod.DEFAULT_CODEC) if kind == "topk" and gen.compact else {},
        shard_size=gen.shard_size)
    with cache_mod.writer_lock(cache_dir, worker):
        manifest = cache_mod.open_for_writing(cache_dir, wanted, worker)
        size = manifest.shard_size or gen.shard_size
        if size != gen.shard_size:
            log.info("%s: keeping the cache's shard size %d (the recipe says %d)", cache_dir, size, gen.shard_size)
        job = _Job(recipe, spec, backend_name, model_path, tok, vocab_rows, gen.k, kind, splits.labels, sampling,
                   cache_dir, manifest, size, worker)
        try:
            for split, examples in todo_splits.items():
                _generate_split(job, split, examples, teacher_writes[split])
                if worker is None:
                    cache_mod.mark_complete(cache_dir, manifest, split, len(examples))
            if worker is None and manifest.workers:
                cache_mod.workers_done(cache_dir, manifest)
            elif worker is not None:
                log.info("worker %d/%d: its shards are written; once every worker is done, run `distill generate` "
                         "without --worker to check the cache and complete its manifest", *worker)
        finally:
            if job.engine is not None:
                job.engine.close()
    return cache_dir


@dataclass(frozen=True)
class ScoreResponse:
    """A generation example with its response: the teacher's top k at each response token."""

    sequence: list[int]  # prompt + response ids, cut at max_length
    positions: list[int]  # the response's positions in `sequence`


@dataclass(frozen=True)
class WriteResponse:
    """A generation example whose response the teacher writes after `prompt`, sampled with `seed`."""

    prompt: list[int]
    seed: int
    example_id: object


@dataclass
class _Job:
    """What every split of one generate run shares; the teacher is loaded when a split first needs it."""

    recipe: Recipe
    spec: TeacherSpec
    backend: str
    model_path: str
    tok: object
    vocab_rows: int
    k: int
    kind: str  # soft_labels | topk
    labels: list[str] | None
    sampling: Sampling | None
    cache_dir: Path
    manifest: cache_mod.Manifest
    shard_size: int
    worker: tuple[int, int] | None = None  # (I, N): this process writes the shards numbered I mod N
    engine: object = None

    def teacher(self):
        if self.engine is None:
            log.info("loading teacher %s with the %s backend", redact(self.spec.name), self.backend)
            self.engine = make_backend(self.backend, self.spec, self.model_path, self.k, tok=self.tok,
                                       vocab_rows=self.vocab_rows)
            self.manifest.backend = self.backend
        return self.engine


def _work_items(job: _Job, split: str, examples, writes):
    """What the teacher does for each example: score the labels after a prompt (classification; the
    label answers' ids come with them), or a ScoreResponse / WriteResponse (generation)."""
    task, max_length = job.recipe.task, job.recipe.task.max_length
    if job.kind == "soft_labels":
        enc, label_ids = encode_classification(job.tok, task, job.labels, examples, max_length)
        return [e.prompt for e in enc], label_ids
    items = []
    for i, (ex, w) in enumerate(zip(examples, writes)):
        if w:
            seed = example_seed(job.sampling.seed, split, i)
            items.append(WriteResponse(generation_prompt(job.tok, task, ex, max_length), seed, ex["id"]))
        else:
            items.append(ScoreResponse(*encode_generation(job.tok, task, [ex], max_length)[0]))
    return items, None


def _scored(engine, items: list[ScoreResponse], k: int) -> list[cache_mod.TopkExample]:
    res = engine.topk([it.sequence for it in items], [it.positions for it in items], k)
    return [cache_mod.TopkExample(it.sequence, it.positions, ids, vals, tail)
            for it, (ids, vals, tail) in zip(items, res)]


def _written(engine, items: list[WriteResponse], k: int, sampling: Sampling,
             max_length: int) -> list[cache_mod.TopkExample]:
    """Teacher-written responses: as many new tokens as the shortest prompt leaves room for; each
    response is then cut to its own room (prompt + response <= max_length, as for data responses)."""
    room = max_length - min(len(it.prompt) for it in items)
    s = Sampling(**{**sampling.__dict__, "max_new_tokens": min(sampling.max_new_tokens, room)})
    out = []
    for it, g in zip(items, engine.generate_topk([it.prompt for it in items], k, s, [it.seed for it in items])):
        n_resp = min(len(g.response), max_length - len(it.prompt))
        if n_resp < 1:
            raise UsageError(f"example {it.example_id}: the teacher wrote an empty response")
        seq = list(it.prompt) + list(g.response[:n_resp])
        out.append(cache_mod.TopkExample(seq, list(range(len(it.prompt), len(seq))), g.ids[:n_resp],
                                         g.logprobs[:n_resp], g.tail[:n_resp]))
    return out


def _topk_batch(job: _Job, batch) -> list[cache_mod.TopkExample]:
    """The cache rows of a batch of generation items, in batch order."""
    score = [j for j, it in enumerate(batch) if isinstance(it, ScoreResponse)]
    write = [j for j, it in enumerate(batch) if isinstance(it, WriteResponse)]
    got = {}
    if score:
        got.update(zip(score, _scored(job.engine, [batch[j] for j in score], job.k)))
    if write:
        got.update(zip(write, _written(job.engine, [batch[j] for j in write], job.k, job.sampling,
                                       job.recipe.task.max_length)))
    return [got[j] for j in range(len(batch))]


def _generate_split(job: _Job, split: str, examples, writes) -> None:
    """Write the split's missing shards. A shard is written only once all of its examples are scored
    (and store.write_shard has checked the numbers), so a failure caches nothing of the shard it hit."""
    items, label_ids = _work_items(job, split, examples, writes)
    size = job.shard_size
    n_shards = (len(items) + size - 1) // size
    mine = range(n_shards) if job.worker is None else range(job.worker[0], n_shards, job.worker[1])
    todo = [n for n in mine if n not in cache_mod.done_shards(job.manifest, split)]
    if len(mine) - len(todo):
        log.info("%s: %d of %d shards already done", split, len(mine) - len(todo), len(mine))
    if todo:
        job.teacher()
    # a context manager: closed on an error too, so the error line starts a line of its own
    with tqdm(total=sum(min(size, len(items) - n * size) for n in todo), desc=f"teacher {split}", unit="ex") as bar:
        speed = {"tokens": 0, "t0": time.time()}
        for n in todo:
            start = n * size
            tensors = _shard_tensors(job, items[start:start + size], start, label_ids, bar, speed)
            cache_mod.write_shard(job.cache_dir, job.manifest, split, n, start, tensors,
                                  on_written=lambda name: pause_point("before_record"), worker=job.worker)
            pause_point("after_shard")


def _shard_tensors(job: _Job, chunk, start: int, label_ids, bar, speed: dict) -> dict[str, torch.Tensor]:
    """The teacher's numbers for one shard's items, batch by batch, as the shard's tensors."""
    batch_size = job.recipe.generate.batch_size
    rows = []
    # soft labels: a shard's prompts are scored longest first (a batch of about one length is little
    # padding) and their rows put back in order
    order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i])) if job.kind == "soft_labels" else None
    for b in range(0, len(chunk), batch_size):
        batch = chunk[b:b + batch_size]
        if job.kind == "soft_labels":
            batch = [chunk[i] for i in order[b:b + batch_size]]
            rows.append(job.engine.label_logprobs(batch, label_ids))
            speed["tokens"] += sum(len(p) for p in batch) + len(batch) * sum(map(len, label_ids))
        else:
            got = _topk_batch(job, batch)
            rows += got
            speed["tokens"] += sum(len(e.sequence) for e in got)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{speed['tokens'] / max(1e-9, time.time() - speed['t0']):.0f}")
    if job.kind == "soft_labels":
        scored = torch.cat(rows)
        return {"index": torch.arange(start, start + len(chunk)),
                "label_logprobs": torch.empty_like(scored).index_copy_(0, torch.tensor(order), scored)}
    return cache_mod.pack_topk(rows, start)
