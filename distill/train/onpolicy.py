"""On-policy and mixed distillation: `train.on_policy.fraction` (GKD's lambda).

Every micro-batch is a round. A generator seeded from train.seed and the round number picks which of
the batch's sequences the student writes itself (each with probability `fraction`); the student
samples their responses after the prompts (transformers `generate`, seeded from the same two numbers
inside a forked RNG, so the training RNG stream is the one an off-policy run has); the teacher scores
every sampled token through any backend (transformers, the vLLM engine, vLLM servers on any machine)
at the cache's k; and the round is written as OUT/onpolicy/round-NNNNN.safetensors through cache.py's
writer, recorded with its checksum in that directory's manifest. Training reads the round back from
its file. A resumed run's weights at every round equal the uninterrupted run's (exact resume), so the
rounds a killed run had already scored are read instead of sampled and scored again, and both runs
train on the same numbers.

The student's own tokens carry only the distillation term (`train.on_policy.loss`, default
`train.loss`): cross-entropy on them would teach the student its own samples. The other sequences of
a batch keep the cache's numbers and both terms. On-policy training runs in one process.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.cache import store as cache_mod
from distill.cache.store import TopkExample
from distill.config import Recipe, resolve_teacher
from distill.errors import DistillError, UsageError, redact
from distill.fileio import pause_point, sha256_file
from distill.models.loading import resolve_model_path, tokenizer_hash
from distill.models.scoring import target_logits
from distill.train.losses import SAMPLED, loss_kwargs, sampled_reverse_kl, sparse_kd

log = logging.getLogger(__name__)

SPLIT = "round"  # shard names: round-NNNNN.safetensors, NNNNN the micro-batch number


def round_seed(seed: int, micro_batch: int) -> int:
    """The seed of one round: which sequences the student writes, and its sampling."""
    return (int(seed) * 1_000_003 + int(micro_batch) * 7_919 + 104_729) % (2 ** 31 - 1)


def chosen(fraction: float, seed: int, micro_batch: int, batch: list[int]) -> list[int]:
    """The examples of `batch` whose responses the student writes in this round (each with probability
    `fraction`; all of them at 1)."""
    draws = torch.rand(len(batch), generator=torch.Generator().manual_seed(round_seed(seed, micro_batch)))
    return [i for i, u in zip(batch, draws.tolist()) if u < fraction]


@torch.no_grad()
def sample_responses(model, prompts: list[list[int]], rooms: list[int], op, stop_ids: list[int], pad_id: int,
                     vocab_limit: int, seed: int) -> list[list[int]]:
    """The student's responses to `prompts` (left-padded batch), each cut after its first stop token and
    to its room (prompt + response <= max_length). The global RNG is forked: sampling leaves it as it was."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        att[i, width - len(p):] = 1
    rows = model.get_output_embeddings().weight.shape[0]
    kwargs = {"suppress_tokens": list(range(vocab_limit, rows))} if vocab_limit < rows else {}
    greedy = op.temperature <= 0
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=min(op.max_new_tokens, max(rooms)),
            do_sample=not greedy, temperature=None if greedy else op.temperature, top_p=None if greedy else op.top_p,
            top_k=0, min_p=None, repetition_penalty=None, eos_token_id=list(stop_ids) or None, pad_token_id=pad_id,
            use_cache=True, **kwargs)
    model.train(was_training)
    stops, res = set(stop_ids), []
    for row, room in zip(out[:, width:].tolist(), rooms):
        n = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        res.append(row[: min(n, room)])
    return res


def examples(train, idx) -> list[TopkExample]:
    """A batch's examples from the task's training data (a list, or a reader with `examples`)."""
    return train.examples(idx) if hasattr(train, "examples") else [train[i] for i in idx]


def topk_rows(items: list[TopkExample], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The items' top-k rows stacked: ids, log-probs and tail mass. The round's rows may be wider than the
    cache's (train.on_policy.k): narrower ones are padded with filler, id 0 at -inf, which the losses drop
    as a backend's missing entries."""
    width = max(e.topk_ids.shape[-1] for e in items)
    ids = torch.cat([F.pad(e.topk_ids, (0, width - e.topk_ids.shape[-1]), value=0) for e in items])
    lps = torch.cat([F.pad(e.topk_logprobs, (0, width - e.topk_logprobs.shape[-1]), value=float("-inf"))
                     for e in items])
    return ids.to(device), lps.to(device), torch.cat([e.tail_mass for e in items]).to(device)


class Round:
    """One micro-batch's view of the task: the student-written examples replace the cached ones."""

    def __init__(self, task, written: dict[int, TopkExample], cfg):
        self.task, self.written, self.cfg = task, written, cfg
        self.on_loss = cfg.on_policy.loss or cfg.loss
        self.on_kw = {} if self.on_loss == SAMPLED else loss_kwargs(self.on_loss, cfg.jsd_beta, cfg.skew_lambda)

    def items(self, idx) -> list[TopkExample]:
        rest = [i for i in idx if i not in self.written]
        cached = dict(zip(rest, examples(self.task.train, rest)))
        return [self.written[i] if i in self.written else cached[i] for i in idx]

    def count(self, idx) -> int:
        return sum(len(e.positions) for e in self.items(idx))

    def loss_sums(self, model, idx, kw):
        """(KD sum, CE sum) over the examples idx in one forward pass; no CE on student-written tokens."""
        items = self.items(idx)
        logits = target_logits(model, [e.sequence for e in items], [e.positions for e in items], self.task.pad)
        dev = logits.device
        targets = torch.cat([e.sequence[e.positions] for e in items]).to(dev)
        on = torch.cat([torch.full((len(e.positions),), i in self.written, dtype=torch.bool)
                        for i, e in zip(idx, items)]).to(dev)
        ids, lps, tail = topk_rows(items, dev)
        ce = F.cross_entropy(logits[~on].float(), targets[~on], reduction="sum")
        T = self.cfg.temperature
        kd = sparse_kd(logits[~on], ids[~on], lps[~on], tail[~on], T, self.cfg.loss, reduction="sum", **kw)
        if self.on_loss == SAMPLED:
            kd = kd + sampled_reverse_kl(logits[on], targets[on], ids[on], lps[on], tail[on], reduction="sum")
        else:
            kd = kd + sparse_kd(logits[on], ids[on], lps[on], tail[on], T, self.on_loss, reduction="sum", **self.on_kw)
        return kd, ce


@dataclasses.dataclass
class Counts:
    rounds_scored: int = 0  # rounds sampled by the student and scored by the teacher in this process
    rounds_read: int = 0  # rounds read back from OUT/onpolicy, scored before an interruption
    sequences: int = 0  # student-written sequences trained on
    tokens: int = 0  # their response tokens
    sample_s: float = 0.0  # time in the student's generate
    score_s: float = 0.0  # time waiting for the teacher


class OnPolicy:
    """The rounds of one run: their selection, the student's samples, the teacher, the rounds' cache."""

    def __init__(self, recipe: Recipe, tok, out_dir: Path, cache_dir: Path, fingerprint: str,
                 teacher_urls: list[str] | None = None):
        from distill.data.prompts import stop_ids
        from distill.models.loading import vocab_rows_or_tokenizer
        from distill.teacher.backend import pick_backend
        from distill.versions import versions

        self.recipe, self.cfg, self.tok = recipe, recipe.train, tok
        self.dir = out_dir / "onpolicy"
        self.k = self.cfg.on_policy.k or cache_mod.read_manifest(cache_dir).k or recipe.generate.k
        self.spec = resolve_teacher(recipe.teacher)
        if teacher_urls:
            from distill.teacher.remote import normalize_url

            self.spec.url, self.spec.urls, self.spec.backend = None, [normalize_url(u) for u in teacher_urls], "server"
        self.backend = pick_backend(None if teacher_urls else recipe.generate.backend, self.spec)
        if self.backend != "server" and self.k > self.spec.max_logprobs:
            raise UsageError(f"train.on_policy: k={self.k} (train.on_policy.k, else the cache's) is above the "
                             f"teacher's max_logprobs={self.spec.max_logprobs}; raise max_logprobs in the teacher spec")
        source = self.spec.tokenizer or self.spec.source
        if not source:
            raise UsageError(f"teacher {self.spec.name}: a served teacher needs a local tokenizer; give the teacher "
                             "spec a `source` (or `tokenizer`) naming the model the server runs")
        self.model_path = resolve_model_path(source)
        self.vocab_rows = vocab_rows_or_tokenizer(self.model_path, tok)
        self.stop_ids, self.engine, self.counts = stop_ids(tok), None, Counts()
        op = self.cfg.on_policy
        self.wanted = cache_mod.Manifest(
            kind="topk", teacher=redact(str(self.spec.source or self.spec.served_model_name or self.spec.name)),
            tokenizer_hash=tokenizer_hash(tok), vocab_size=self.vocab_rows, k=self.k, data_fingerprint=fingerprint,
            labels=None, max_length=recipe.task.max_length, backend=self.backend, versions=versions(),
            responses={"mode": "student", **dataclasses.asdict(op), "seed": self.cfg.seed},
            codec=dict(cache_mod.DEFAULT_CODEC) if recipe.generate.compact else {}, shard_size=1)
        self.manifest = None

    def open(self, resumed: bool) -> None:
        """A fresh run starts an empty OUT/onpolicy; a resumed one keeps the rounds scored so far
        (open_for_writing drops any whose checksum fails: they are scored again)."""
        if not resumed:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.manifest = cache_mod.open_for_writing(self.dir, self.wanted)
        if resumed:
            log.info("on-policy: %d round(s) scored before the interruption in %s", len(self.manifest.shards), self.dir)

    def round(self, task, micro_batch: int, batch: list[int], model) -> Round:
        """This micro-batch's view of the task, the student-written sequences read from their round file
        (sampled, scored and written first when the round is new)."""
        picked = chosen(self.cfg.on_policy.fraction, self.cfg.seed, micro_batch, batch)
        written = {}
        if picked:
            rows = self._read(micro_batch, picked)
            if rows is None:
                self._score(task, micro_batch, picked, model)
                rows = self._read(micro_batch, picked)
            else:
                self.counts.rounds_read += 1
            written = dict(zip(picked, rows))
            self.counts.sequences += len(rows)
            self.counts.tokens += sum(len(e.positions) for e in rows)
        return Round(task, written, self.cfg)

    def _teacher(self):
        if self.engine is None:
            from distill.teacher.backend import make_backend

            log.info("on-policy: loading teacher %s with the %s backend", redact(self.spec.name), self.backend)
            self.engine = make_backend(self.backend, self.spec, self.model_path, self.k, tok=self.tok,
                                       vocab_rows=self.vocab_rows)
        return self.engine

    def _score(self, task, micro_batch: int, picked: list[int], model) -> None:
        """The student writes the picked examples' responses, the teacher scores them, the round is written."""
        max_length = self.recipe.task.max_length
        prompts = [e.sequence[: int(e.positions[0])].tolist() for e in examples(task.train, picked)]
        t0 = time.time()
        responses = sample_responses(model, prompts, [max_length - len(p) for p in prompts], self.cfg.on_policy,
                                     self.stop_ids, self.tok.pad_token_id if self.tok.pad_token_id is not None
                                     else self.stop_ids[0], len(self.tok), round_seed(self.cfg.seed, micro_batch))
        seqs = [p + r for p, r in zip(prompts, responses)]
        positions = [list(range(len(p), len(s))) for p, s in zip(prompts, seqs)]
        t1 = time.time()
        scores = self._teacher().topk(seqs, positions, self.k)
        self.counts.sample_s += t1 - t0
        self.counts.score_s += time.time() - t1
        rows = [TopkExample(s, pos, ids, vals, tail) for s, pos, (ids, vals, tail) in zip(seqs, positions, scores)]
        tensors = cache_mod.pack_topk(rows, 0)
        tensors["index"] = torch.tensor(picked, dtype=torch.long)  # which training examples the round rewrote
        cache_mod.write_shard(self.dir, self.manifest, SPLIT, micro_batch, 0, tensors)
        self.counts.rounds_scored += 1
        pause_point("round_written")

    def _read(self, micro_batch: int, picked: list[int]) -> list[TopkExample] | None:
        """A round's examples from its file (None when it was not scored yet), checksum checked."""
        entry = next((s for s in self.manifest.shards if s["split"] == SPLIT and s["number"] == micro_batch), None)
        if entry is None:
            return None
        path = self.dir / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise DistillError(f"{path}: checksum mismatch (changed while the run was reading it); start afresh")
        data = cache_mod.read_shard(self.dir, entry, "topk")
        if data["index"].tolist() != picked:
            raise DistillError(f"{path}: holds examples {data['index'].tolist()}, this round writes {picked}; "
                               "made by another run: start afresh without --resume")
        out = []
        for j in range(len(picked)):
            e = cache_mod.example_topk(data, j)
            out.append(TopkExample(e.sequence.long(), e.positions.long(), e.topk_ids.long(), e.topk_logprobs.float(),
                                   e.tail_mass.float()))
        return out

    def summary(self) -> dict:
        return {**dataclasses.asdict(self.cfg.on_policy), "k": self.k, "backend": self.backend,
                "rounds_dir": str(self.dir), **{k: round(v, 2) if isinstance(v, float) else v
                                                for k, v in dataclasses.asdict(self.counts).items()}}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def make_onpolicy(run, teacher_urls: list[str] | None = None) -> OnPolicy | None:
    """The run's on-policy rounds, or None at fraction 0: off-policy, the loop runs as it did before
    on-policy training existed, and the on_policy keys are left out of what a checkpoint must match (so
    the checkpoints of those runs resume)."""
    recipe, src = run.recipe, run.recipe.path or "recipe"
    if not recipe.train.on_policy.fraction:
        if teacher_urls:
            raise UsageError(f"--teacher-url: the teacher is asked during training only with "
                             f"train.on_policy.fraction > 0 (in {src} it is 0)")
        run.settings["train"].pop("on_policy", None)
        return None
    if run.world > 1:
        raise UsageError(f"{src}: train.on_policy.fraction > 0 runs in one process; this run has {run.world}")
    return OnPolicy(recipe, run.tok, run.out_dir, run.cache_dir, run.settings["identity"]["data_fingerprint"],
                    teacher_urls)
