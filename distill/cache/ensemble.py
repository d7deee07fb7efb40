"""Caches from several teachers (recipe `teachers:`), and the mixture or routing the student learns.

Layout: CACHE/teachers/NAME/ is each teacher's own cache (manifest and shards, cache/store.py), so a teacher
is generated, resumed or brought from another machine alone, and adding one never rescores the others.
CACHE/manifest.json records the teachers (its `teachers`; no shards and no complete split of its own, so a
reader of one teacher's cache refuses it), rewritten after each teacher. The teachers of one cache must
agree on the cache kind, the data fingerprint and the label set, and top-k teachers on the tokenizer and
max_length (their token ids and sequences are compared position by position): otherwise refused, naming
the two teachers. Soft labels are over label names, so soft-label teachers may differ in tokenizer.

What the student learns (train.teacher_mix):
- mixture: per row the weighted average of the teachers' probabilities (probability space, at temperature
  1; the loss tempers the mixture as it tempers one teacher's numbers). Soft labels: each teacher's scores
  normalised over the label set first. Top-k: over the union of the teachers' top-k ids, each teacher's
  tail mass kept whole in the tail bucket, as the single-teacher path treats a tail (losses.sparse_kd: one
  "everything else" bucket whose split the cache does not know), so a union id outside a teacher's top k
  gets nothing from that teacher. Each row still sums to 1, and where every teacher's top k holds its whole
  support (k = the vocabulary) it is the exact mixture.
- route: each row the numbers of the teacher its data field task.teacher_field names (TRL's teacher_id),
  and no other teacher's.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.cache import store as cache_mod
from distill.cache.generate import run_generate
from distill.config import Recipe, TaskConfig, show, validate_recipe
from distill.data.read import read_rows
from distill.errors import DistillError, UsageError, redact
from distill.versions import versions

log = logging.getLogger(__name__)

TEACHERS_DIR = "teachers"  # CACHE/teachers/NAME: one teacher's cache
_WHAT = {"kind": "the cache kind", "data_fingerprint": "the data fingerprint (other data or splits)",
         "labels": "the label set", "tokenizer_hash": "the tokenizer (top-k ids are token ids)",
         "max_length": "task.max_length (the scored sequences)"}


def teacher_dir(cache_dir: str | Path, name: str) -> Path:
    return Path(cache_dir) / TEACHERS_DIR / name


def normalised_weights(recipe: Recipe) -> list[float]:
    total = sum(t.weight for t in recipe.teachers)
    return [t.weight / total for t in recipe.teachers]


# -- the numbers: mixture and routing ---------------------------------------------------------------------


def mix_soft_labels(scores: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """log sum_t w_t p_t per row, p_t teacher t's distribution over the label set (its scores softmaxed, as
    the loss reads one teacher's); scores: one [n, labels] tensor per teacher, weights summing to 1."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    logp = torch.stack([F.log_softmax(s.double(), -1) for s in scores])  # [teachers, n, labels]
    return torch.logsumexp(logp + w.log()[:, None, None], 0).float()


def route_rows(per_teacher: Sequence, teacher_of_row: Sequence[int]):
    """Row i of teacher teacher_of_row[i], for every row: one tensor [n, ...] (soft labels), or a list of
    rows (e.g. top-k examples) when the teachers' rows are lists."""
    if all(isinstance(t, torch.Tensor) for t in per_teacher):
        idx = torch.as_tensor(list(teacher_of_row), dtype=torch.long)
        return torch.stack(list(per_teacher))[idx, torch.arange(len(idx))]
    return [per_teacher[t][i] for i, t in enumerate(teacher_of_row)]


def mix_topk(ids: Sequence[torch.Tensor], logprobs: Sequence[torch.Tensor], tails: Sequence[torch.Tensor],
             weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mixture of several teachers' top-k rows: per teacher [N, k_t] ids and log-probs and [N] tail
    mass -> [N, U] ids (rank order), log-probs ([N, U]; slots past a row's union are filler at -inf, id 0,
    as a backend's missing entries) and [N] tail mass. Each union id gets sum_t w_t p_t(id) over the
    teachers that ranked it, the tail sum_t w_t tail_t (see the module's docstring)."""
    n = ids[0].shape[0]
    all_ids = torch.cat([i.long() for i in ids], 1)
    live = torch.cat([~torch.isneginf(lp) for lp in logprobs], 1)
    probs = torch.cat([lp.double().exp() * w for lp, w in zip(logprobs, weights)], 1).masked_fill(~live, 0.0)
    none = torch.iinfo(torch.long).max  # filler sorts last and is one group, dropped below
    keyed = all_ids.masked_fill(~live, none)
    order = keyed.argsort(dim=1, stable=True)
    sorted_ids, sorted_p = keyed.gather(1, order), probs.gather(1, order)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = new.long().cumsum(1) - 1  # each distinct id's slot
    mixed = torch.zeros_like(sorted_p).scatter_add_(1, group, sorted_p)
    uid = torch.full_like(sorted_ids, none).scatter_(1, group, sorted_ids)
    valid = (uid != none) & (mixed > 0)
    width = max(1, int(valid.sum(1).max())) if n else 1
    lp = torch.where(valid, mixed.log(), torch.full_like(mixed, float("-inf")))
    rank = lp.argsort(dim=1, descending=True, stable=True)[:, :width]  # rank order, filler last
    out_ids = uid.masked_fill(~valid, 0).gather(1, rank)
    tail = sum(t.double() * w for t, w in zip(tails, weights))
    return out_ids.int(), lp.gather(1, rank).float(), torch.as_tensor(tail).float()


def mix_topk_examples(examples: Sequence[cache_mod.TopkExample], weights: Sequence[float]) -> cache_mod.TopkExample:
    """One example's mixture over its teachers' cached rows, which must score the same sequence at the same
    positions (responses from the data: teacher-written ones differ per teacher, so they can be routed only).

    train/teacher_streams.py reads each teacher's split in one order and calls this example by example."""
    first = examples[0]
    for e in examples[1:]:
        if not (torch.equal(torch.as_tensor(e.sequence), torch.as_tensor(first.sequence))
                and torch.equal(torch.as_tensor(e.positions), torch.as_tensor(first.positions))):
            raise DistillError("the teachers scored different sequences (teacher-written responses?); a mixture "
                               "needs generate.responses: data, or use train.teacher_mix: route")
    ids, lps, tail = mix_topk([e.topk_ids for e in examples], [e.topk_logprobs for e in examples],
                              [e.tail_mass for e in examples], weights)
    return cache_mod.TopkExample(first.sequence, first.positions, ids, lps, tail)


def row_teachers(task: TaskConfig, examples: Sequence[dict], names: Sequence[str]) -> list[int]:
    """Each example's teacher (an index into `names`), from the data's task.teacher_field. The split files keep
    only the task's fields, so the data file is read again and each example found by its text or prompt
    (unique: data/read.py keeps the first of repeated texts, as here)."""
    field = task.text_field if task.type == "classification" else task.prompt_field
    key = "text" if task.type == "classification" else "prompt"
    by_text: dict[str, tuple[int, object]] = {}
    for line, row in read_rows(task.data):
        if isinstance(row, dict) and row.get(field) is not None:
            by_text.setdefault(str(row[field]), (line, row.get(task.teacher_field)))
    out = []
    for ex in examples:
        line, value = by_text.get(ex[key], ("?", None))
        if value is None or str(value) not in names:
            got = "no value" if value is None else f"{show(value)}, no teacher of the recipe"
            raise UsageError(f"{task.data}:{line}: task.teacher_field '{task.teacher_field}': {got}; routing "
                             f"(train.teacher_mix: route) needs every row to name one of: {', '.join(names)}")
        out.append(list(names).index(str(value)))
    return out


# -- the caches: reading, agreeing, recording ---------------------------------------------------------------


def teacher_manifests(cache_dir: str | Path, names: Sequence[str] | None = None) -> dict[str, cache_mod.Manifest]:
    """The teachers' own manifests: `names` (each required), or every teacher cache present (None)."""
    root = Path(cache_dir) / TEACHERS_DIR
    if names is None:
        names = sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []
    out = {}
    for name in names:
        if not (teacher_dir(cache_dir, name) / "manifest.json").is_file():
            raise UsageError(f"{cache_dir}: no cache of teacher {name!r} ({teacher_dir(cache_dir, name)}); run "
                             f"`distill generate` (--teacher-name {name} runs it alone)")
        out[name] = cache_mod.read_manifest(teacher_dir(cache_dir, name))
    return out


def check_agreement(cache_dir: str | Path, manifests: dict[str, cache_mod.Manifest]) -> None:
    """Refuse teachers of one cache that were not run on the same examples and label set (or, top-k, the
    same tokenizer and sequence length), naming the first two that differ and how."""
    if not manifests:
        return
    (first, m0), *rest = manifests.items()
    keys = ["kind", "data_fingerprint", "labels"] + (["tokenizer_hash", "max_length"] if m0.kind == "topk" else [])
    for name, m in rest:
        for key in keys:
            if getattr(m, key) != getattr(m0, key):
                raise UsageError(
                    f"{cache_dir}: teachers {first!r} and {name!r} disagree on {_WHAT[key]} ({first}: "
                    f"{show(getattr(m0, key))}, {name}: {show(getattr(m, key))}); the teachers of one cache must "
                    f"score the same examples. Regenerate the wrong one for this recipe (remove "
                    f"{teacher_dir(cache_dir, name)} or {teacher_dir(cache_dir, first)} and run `distill generate`)")


def _refuse_single_teacher_cache(cache_dir: Path, recipe: Recipe) -> None:
    if (cache_dir / "manifest.json").is_file() and cache_mod.read_manifest(cache_dir).teachers is None:
        raise UsageError(f"{cache_dir}: holds one teacher's cache, but {recipe} names several (`teachers:`); "
                         "generate them into another --out")


def write_record(cache_dir: str | Path) -> cache_mod.Manifest:
    """CACHE/manifest.json from the teacher caches on disk (read under its lock, so runs of other teachers
    sharing the cache keep each other's entries)."""
    with cache_mod.manifest_lock(cache_dir):
        ms = teacher_manifests(cache_dir)
        check_agreement(cache_dir, ms)
        m0 = next(iter(ms.values()))
        hashes = {m.tokenizer_hash for m in ms.values()}
        top = cache_mod.Manifest(
            kind=m0.kind, teacher="teachers: " + ", ".join(ms), tokenizer_hash=hashes.pop() if len(hashes) == 1 else "",
            vocab_size=max(m.vocab_size for m in ms.values()),
            k=max(m.k for m in ms.values()) if m0.kind == "topk" else None, data_fingerprint=m0.data_fingerprint,
            labels=m0.labels, max_length=m0.max_length, versions=versions(),
            teachers={n: {"dir": f"{TEACHERS_DIR}/{n}", "teacher": redact(m.teacher), "backend": m.backend,
                          "tokenizer_hash": m.tokenizer_hash, "k": m.k, "responses": m.responses,
                          "complete": m.complete, "split_sizes": m.split_sizes} for n, m in ms.items()})
        cache_mod.write_manifest(cache_dir, top)
    return top


def run_generate_teachers(recipe: Recipe, only: str | None = None, backend: str | None = None,
                          out: str | None = None, k: int | None = None, urls: list[str] | None = None,
                          worker: tuple[int, int] | None = None) -> Path:
    """`distill generate` for a recipe of several teachers: each (or `only` that one) into its own cache,
    resumed like a single teacher's (a complete teacher loads nothing and writes no shard), then recorded.
    The teachers already present are checked to agree before any work, and again with each new one."""
    validate_recipe(recipe)
    if not recipe.teachers:
        raise UsageError(f"{recipe}: names no `teachers:`; run cache.generate.run_generate")
    names = [t.key for t in recipe.teachers]
    if only is not None and only not in names:
        raise UsageError(f"--teacher-name {only}: not a teacher of {recipe} (its teachers: {', '.join(names)})")
    todo = [t for t in recipe.teachers if only in (None, t.key)]
    if urls and len(todo) > 1:
        raise UsageError("--teacher-url: servers of one teacher; say which with --teacher-name "
                         f"(one of {', '.join(names)})")
    cache_dir = Path(out or recipe.workdir_path / "cache")
    _refuse_single_teacher_cache(cache_dir, recipe)
    check_agreement(cache_dir, teacher_manifests(cache_dir))
    for t in todo:
        log.info("teacher %s (%s) -> %s", t.key, redact(t.spec), teacher_dir(cache_dir, t.key))
        run_generate(recipe, teacher=t.spec, backend=backend, out=str(teacher_dir(cache_dir, t.key)), k=k, urls=urls,
                     worker=worker)
        write_record(cache_dir)
    return cache_dir


def read_teachers(cache_dir: str | Path, recipe: Recipe) -> dict[str, cache_mod.Manifest]:
    """The recipe's teachers' caches for training, checked to agree (a teacher the recipe names and the
    cache lacks is refused; teachers the recipe leaves out are not read)."""
    top = cache_mod.read_manifest(cache_dir)
    if top.teachers is None:
        raise UsageError(f"{cache_dir}: one teacher's cache, but {recipe} names several (`teachers:`); run "
                         "`distill generate` for this recipe into another directory")
    ms = teacher_manifests(cache_dir, [t.key for t in recipe.teachers])
    check_agreement(cache_dir, ms)
    return ms


def joint_manifest(ms: dict[str, cache_mod.Manifest]) -> cache_mod.Manifest:
    """One manifest standing for the teachers: the first's identity, a split complete where every one is."""
    splits = {s for m in ms.values() for s in m.complete}
    m0 = next(iter(ms.values()))
    return dataclasses.replace(m0, complete={s: all(m.complete.get(s) for m in ms.values()) for s in splits})


def soft_labels(cache_dir: str | Path, recipe: Recipe, split: str, examples: Sequence[dict]) -> torch.Tensor:
    """A split's soft labels [n, labels] from the recipe's teachers: mixed, or routed row by row."""
    names = [t.key for t in recipe.teachers]
    scores = [cache_mod.load_split(teacher_dir(cache_dir, n), split, len(examples))["label_logprobs"] for n in names]
    if recipe.train.teacher_mix == "route":
        return route_rows(scores, row_teachers(recipe.task, examples, names))
    return mix_soft_labels(scores, normalised_weights(recipe))
