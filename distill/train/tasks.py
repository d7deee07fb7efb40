"""Tasks: what a batch's loss terms are, and how validation is scored (the `Task` protocol).

Each task holds its encoded train and validation examples and, with a cache, the teacher's numbers
for exactly those examples.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from distill.cache import ensemble, written_pool
from distill.cache import store as cache_mod
from distill.cache.store import TopkExample
from distill.config import Recipe
from distill.data.prompts import encode_classification, encode_generation, end_of_turn_id
from distill.data.sampling import subset_indices
from distill.errors import UsageError
from distill.evaluate.metrics import classification_metrics
from distill.models.label_tokens import label_token_ids
from distill.models.loading import tokenizer_hash
from distill.models.scoring import label_logprobs, last_logits, target_logits
from distill.train.data import InMemory
from distill.train.distributed import sharded
from distill.train.losses import soft_label_kd, sparse_kd, total_loss
from distill.train.teacher_streams import topk_split


@runtime_checkable
class Task(Protocol):
    """What the training loop asks of a task. `idx` are indices into `train`; `divergence_params` the
    keyword arguments of losses.divergence for train.loss (config's jsd_beta or skew_lambda)."""

    kind: str  # the teacher cache it trains on: "soft_labels" or "topk"
    train: Sequence  # training examples: a list, or a train.data.ExampleStream (its own order)
    val: Sequence  # validation examples

    def count(self, idx: list[int], /) -> int:
        """The loss units of examples idx (examples, or target tokens): what a batch's sums are divided by."""

    def loss_sums(self, model: torch.nn.Module, idx: list[int], divergence_params: dict[str, float], /
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(KD sum, CE sum) over training examples idx, differentiable."""

    def evaluate(self, model: torch.nn.Module, rank: int, world: int, divergence_params: dict[str, float], /
                 ) -> dict[str, float]:
        """The validation figures (val_loss and val_ce, val_kd with the teacher's numbers, val_f1 for
        classification), each process scoring its share."""


def make_task(recipe: Recipe, splits, tok, model, cache_dir: Path) -> Task:
    kind = ClassificationTask if recipe.task.type == "classification" else GenerationTask
    return kind(recipe, splits, tok, model, cache_dir)


def embedding_rows(model) -> int:
    """Rows of the input embedding (its full shape even when DeepSpeed ZeRO-3 has partitioned it)."""
    w = model.get_input_embeddings().weight
    return int(getattr(w, "ds_shape", w.shape)[0])


def read_checked_cache(cache_dir: Path, kind: str, recipe: Recipe, splits, tok, model) -> cache_mod.Manifest:
    """The cache's manifest, refused when it was made for other data or label set, for the other task
    type, or (top-k caches) with another tokenizer. Several teachers (recipe `teachers:`): each teacher's
    cache so checked, and the teachers against each other (cache/ensemble.py); their joint manifest."""
    if recipe.teachers:
        teachers = ensemble.read_teachers(cache_dir, recipe)
        for name, m in teachers.items():
            _check_manifest(ensemble.teacher_dir(cache_dir, name), m, kind, recipe, splits, tok)
        manifest = ensemble.joint_manifest(teachers)
    else:
        manifest = cache_mod.read_manifest(cache_dir)
        _check_manifest(cache_dir, manifest, kind, recipe, splits, tok)
    rows = embedding_rows(model)
    if kind == "topk" and rows < len(tok):
        raise UsageError(f"{cache_dir}: the student has {rows} embedding rows, fewer than the {len(tok)} tokens "
                         "of the tokenizer")
    return manifest


def _check_manifest(cache_dir: Path, manifest: cache_mod.Manifest, kind: str, recipe: Recipe, splits, tok) -> None:
    if manifest.kind != kind:
        raise UsageError(f"{cache_dir}: a {manifest.kind} cache, but task.type {recipe.task.type!r} in "
                         f"{recipe.path} trains on a {kind} cache; run `distill generate` for this recipe")
    if manifest.data_fingerprint != splits.fingerprint:
        raise UsageError(f"{cache_dir}: made for other data (fingerprint {manifest.data_fingerprint}, "
                         f"this recipe's data is {splits.fingerprint}); run `distill generate` again")
    # soft labels are a distribution over label names, so any student can learn them; top-k rows are token ids
    if kind == "topk" and manifest.tokenizer_hash != tokenizer_hash(tok):
        raise UsageError(f"{cache_dir}: made with a different tokenizer (hash {manifest.tokenizer_hash}, the "
                         f"student's is {tokenizer_hash(tok)}); teacher and student must share a tokenizer")
    if manifest.labels != splits.labels:
        raise UsageError(f"{cache_dir}: made for another label set")


class ClassificationTask:
    """Soft labels over the label set; one loss unit per example.

    A label-token student (distill/label_tokens.py) is scored at one position: its label distribution
    is the softmax over the label tokens' logits after the prompt, and its CE is the negative
    log-likelihood of its whole answer, the gold label token then end of turn, over the vocabulary
    (so greedy decoding answers with the label). Other models score every label's full answer over a
    prefix tree, and their CE is over the label set.
    """

    kind = "soft_labels"

    def __init__(self, recipe: Recipe, splits, tok, model, cache_dir: Path):
        cfg, task = recipe.train, recipe.task
        self.cfg, self.labels, self.pad = cfg, splits.labels, tok.pad_token_id
        self.label_tokens, self.end_of_turn = label_token_ids(tok, self.labels), end_of_turn_id(tok)
        # labelled subsets are stratified samples (every class kept), the cache rows picked to match
        train_idx = (written_pool.train_rows(task, splits) if task.written_data  # every data row, written_share
                     else subset_indices(splits.train, cfg.train_examples, task.split.seed))
        labelled = written_pool.labelled_rows(task, splits)  # None: every training text has its label
        if labelled is not None and cfg.alpha == 0:
            train_idx = labelled  # supervised alone: the labelled texts are all there is to learn from
        val_idx = subset_indices(splits.validation, cfg.eval_examples, task.split.seed)
        train_ex = [splits.train[i] for i in train_idx]
        val_ex = [splits.validation[i] for i in val_idx]
        self.train, self.label_ids = encode_classification(tok, task, self.labels, train_ex, task.max_length)
        known = set(train_idx if labelled is None else labelled)
        self.has_label = torch.tensor([i in known for i in train_idx])  # CE only where the gold label may be read
        probe = [j for j, i in enumerate(train_idx) if i in known]  # train F1: as many labelled texts, stratified
        sample = subset_indices([train_ex[j] for j in probe], len(val_ex), task.split.seed)
        self.train_probe = [probe[j] for j in sample]
        self.val, _ = encode_classification(tok, task, self.labels, val_ex, task.max_length)
        self.gold = torch.tensor([0 if e.label_index is None else e.label_index for e in self.train])  # 0: never read
        self.val_gold = torch.tensor([e.label_index for e in self.val])
        self.teacher = self.teacher_val = None
        if cfg.alpha > 0:
            manifest = read_checked_cache(cache_dir, "soft_labels", recipe, splits, tok, model)
            self.teacher = self.teacher_scores(recipe, cache_dir, splits, "train")[train_idx]
            if manifest.complete.get("validation"):
                self.teacher_val = self.teacher_scores(recipe, cache_dir, splits, "validation")[val_idx]

    @staticmethod
    def teacher_scores(recipe: Recipe, cache_dir: Path, splits, split: str) -> torch.Tensor:
        """A split's soft labels [n, labels]: the cache's, or its teachers' mixed or routed (cache/ensemble.py)."""
        if recipe.teachers:
            return ensemble.soft_labels(cache_dir, recipe, split, splits.get(split))
        return cache_mod.load_split(cache_dir, split, len(splits.get(split)))["label_logprobs"]

    def count(self, idx) -> int:
        return len(idx)

    def scores_and_ce(self, model, items, gold: torch.Tensor):
        """([B, labels] label scores, [B] CE) of encoded examples with gold label indices."""
        if self.label_tokens is None:
            scores = label_logprobs(model, [e.prompt for e in items], self.label_ids, self.pad)
            return scores, F.cross_entropy(scores.float(), gold.to(scores.device), reduction="none")
        answers = [self.label_tokens[int(g)] for g in gold]
        # the last two positions of prompt + label token predict the label token, then end of turn
        logits = last_logits(model, [e.prompt + [a] for e, a in zip(items, answers)], 2, self.pad)
        logp = torch.log_softmax(logits.float(), -1)  # [B, 2, V]
        wanted = torch.tensor([[a, self.end_of_turn] for a in answers], device=logp.device)
        nll = -logp.gather(2, wanted[..., None])[..., 0].sum(1)
        return logp[:, 0, self.label_tokens], nll

    def loss_sums(self, model, idx, divergence_params):
        scores, ce = self.scores_and_ce(model, [self.train[i] for i in idx], self.gold[idx])
        ce = ce[self.has_label[idx].to(ce.device)].sum()
        if self.teacher is None:
            return torch.zeros((), device=scores.device), ce
        kd = soft_label_kd(scores, self.teacher[idx].to(scores.device), self.cfg.temperature, self.cfg.loss,
                           reduction="sum", **divergence_params)
        return kd, ce

    @torch.no_grad()
    def evaluate(self, model, rank, world, divergence_params) -> dict:
        def score(items):  # label scores and each example's CE in one tensor [B, labels + 1]
            scores, ce = self.scores_and_ce(model, items, torch.tensor([e.label_index for e in items]))
            return torch.cat([scores.float(), ce.float()[:, None]], 1).cpu()

        cfg = self.cfg
        val = sharded(score, self.val, cfg.batch_size, rank, world)
        tr_items = [self.train[i] for i in self.train_probe]
        tr = sharded(score, tr_items, cfg.batch_size, rank, world)[:, :-1]
        val, val_ce = val[:, :-1], val[:, -1]
        val_f1 = classification_metrics(self.val_gold.tolist(), val.argmax(1).tolist(), self.labels)["macro_f1"]
        tr_gold = [e.label_index for e in tr_items]
        tr_f1 = classification_metrics(tr_gold, tr.argmax(1).tolist(), self.labels)["macro_f1"]
        ev = {"val_f1": val_f1, "train_f1": tr_f1, "train_val_gap": tr_f1 - val_f1, "val_ce": val_ce.mean().item()}
        ev["val_loss"] = ev["val_ce"]
        if self.teacher_val is not None:
            ev["val_kd"] = soft_label_kd(val, self.teacher_val, cfg.temperature, cfg.loss, **divergence_params).item()
            ev["val_loss"] = total_loss(ev["val_kd"], ev["val_ce"], cfg.alpha, cfg.temperature)
        return ev


class GenerationTask:
    """Token-level: the response tokens are the targets; one loss unit per target token.

    With a top-k cache the sequences and target positions are the cache's own (so they match the
    teacher's numbers exactly); the cached entry for target t is the distribution that predicted
    token t, compared with the student's logits at t-1. Without one (alpha = 0, or a validation
    split that was not cached) an example's top-k fields are None.
    """

    kind = "topk"

    def __init__(self, recipe: Recipe, splits, tok, model, cache_dir: Path):
        cfg, task = recipe.train, recipe.task
        self.cfg, self.pad = cfg, tok.pad_token_id
        train_ex = splits.train[: cfg.train_examples] if cfg.train_examples else splits.train
        val_ex = splits.validation[: cfg.eval_examples] if cfg.eval_examples else splits.validation
        if not cfg.reads_cache and task.labelled_examples:  # supervised alone: the labelled budget's gold responses
            train_ex = [ex for ex in train_ex if ex["response"] is not None]

        def encoded(examples, shard_size=None):  # training data in the order a cache of it would stream in
            pairs = encode_generation(tok, task, examples, task.max_length)
            return InMemory((TopkExample(torch.as_tensor(s, dtype=torch.long), torch.as_tensor(p, dtype=torch.long),
                                         None, None, None) for s, p in pairs), shard_size)

        self.teacher_val_available = False
        if cfg.reads_cache:  # the training split is streamed from the cache (train/data.py), validation held
            manifest = read_checked_cache(cache_dir, "topk", recipe, splits, tok, model)
            rows = embedding_rows(model)
            self.train = topk_split(cache_dir, recipe, "train", splits.train, len(train_ex), rows)
            self.teacher_val_available = cfg.alpha > 0 and bool(manifest.complete.get("validation"))
        else:
            self.train = encoded(train_ex, recipe.generate.shard_size)
        self.val = (topk_split(cache_dir, recipe, "validation", splits.validation, len(val_ex), rows, in_memory=True)
                    if self.teacher_val_available else encoded(val_ex))

    def count(self, idx) -> int:
        return self.train.count(idx)

    def _sums(self, model, items: list[TopkExample], divergence_params, with_teacher: bool):
        """Per-target-token KD and CE over items (KD zero without the teacher)."""
        logits = target_logits(model, [e.sequence for e in items], [e.positions for e in items], self.pad)
        targets = torch.cat([e.sequence[e.positions] for e in items]).to(logits.device)
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
        if not with_teacher or items[0].topk_ids is None:
            return torch.zeros_like(ce), ce
        ids, lps, tail = (torch.cat([getattr(e, f) for e in items]).to(logits.device)
                          for f in ("topk_ids", "topk_logprobs", "tail_mass"))
        kd = sparse_kd(logits, ids, lps, tail, self.cfg.temperature, self.cfg.loss, reduction="none",
                       **divergence_params)
        return kd, ce

    def loss_sums(self, model, idx, divergence_params):
        kd, ce = self._sums(model, self.train.examples(idx), divergence_params, self.cfg.alpha > 0)
        return kd.sum(), ce.sum()

    @torch.no_grad()
    def evaluate(self, model, rank, world, divergence_params) -> dict:
        def score(items):  # per-example sums and token counts
            kd, ce = self._sums(model, items, divergence_params, self.teacher_val_available)
            ends = torch.tensor([len(e.positions) for e in items]).cumsum(0).tolist()
            return torch.tensor([[kd[a:b].sum().item(), ce[a:b].sum().item(), b - a]
                                 for a, b in zip([0] + ends[:-1], ends)], dtype=torch.float64)

        sums = sharded(score, self.val, self.cfg.batch_size, rank, world).sum(0)
        n, cfg = max(1.0, sums[2].item()), self.cfg
        ev = {"val_ce": sums[1].item() / n, "val_tokens": int(sums[2].item())}
        ev["val_loss"] = ev["val_ce"]
        if self.teacher_val_available:
            ev["val_kd"] = sums[0].item() / n
            ev["val_loss"] = total_loss(ev["val_kd"], ev["val_ce"], cfg.alpha, cfg.temperature)
        return ev
