"""`distill train`: an Accelerate loop minimising alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE.

D is a divergence from distill/losses.py (forward KL by default; `train.loss`). The teacher is never
in memory: its distributions come from the cache written by `distill generate` (soft labels over the
label set for classification, top-k log-probabilities + tail mass per response token for
generation). alpha = 0 with no cache is plain supervised fine-tuning.

Multi-process (`accelerate launch`, DDP or DeepSpeed ZeRO-2/3): `train.batch_size` is the global
batch. Every process draws the same shuffled order and takes its share of each batch
(`order[:batch][rank::world]`); the loss of a share is its sum divided by the size of the whole
batch (examples, or target tokens for generation) times the world size, so the averaged gradient,
and the logged loss, are those of the whole batch at any world size. Ranks come from
torch.distributed when it is initialised (on CPU, accelerate may report one process per rank).
Only rank 0 logs, writes files and saves the model; collective steps (DeepSpeed checkpoints, ZeRO-3
weight gathering, sharded evaluation) run on every rank.

Resumable: checkpoints (every `train.checkpoint_every` optimizer steps and at epoch ends) go to
OUT/checkpoints/step-NNNNNNNN, written to a temporary directory and renamed when complete; the
newest `train.keep_checkpoints` are kept. Each holds the trainable weights, optimizer and scheduler
state, every rank's RNG states and the data position (epoch order, offset), so `--resume` continues
to the same result as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import cache as cache_mod
from .config import Recipe, TrainConfig, resolve_teacher
from .data import prepare_splits, subset_indices
from .errors import DistillError, UsageError
from .evaluation import classification_metrics
from .io import atomic_write_bytes, atomic_write_text, fsync_file, fsync_tree, pause_point, ran_out_of_space
from .losses import DIVERGENCES, loss_kwargs, soft_label_kd, sparse_kd
from .models import load_tokenizer, resolve_model_path, tokenizer_hash
from .prompts import encode_classification
from .student import add_lora, build_student, check_quantization, count_parameters, dense_lora_copy, save_model

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear", "constant")
# TrainConfig keys that may change between an interrupted run and its --resume
RESUME_FREE_KEYS = {"checkpoint_every", "keep_checkpoints", "overfit_gap", "swamp_fraction", "swamp_steps",
                    "early_stopping_patience"}


def check_cache(manifest: cache_mod.Manifest, cache_dir, tok, model, splits) -> None:
    """Refuse a cache made for other data, another tokenizer, or token ids the student cannot emit."""
    if manifest.data_fingerprint != splits.fingerprint:
        raise UsageError(f"{cache_dir}: made for other data (fingerprint {manifest.data_fingerprint}, "
                         f"this recipe's data is {splits.fingerprint}); run `distill generate` again")
    if manifest.tokenizer_hash != tokenizer_hash(tok):
        raise UsageError(f"{cache_dir}: made with a different tokenizer (hash {manifest.tokenizer_hash}, the "
                         f"student's is {tokenizer_hash(tok)}); teacher and student must share a tokenizer")
    if manifest.labels != splits.labels:
        raise UsageError(f"{cache_dir}: made for another label set")
    rows = embedding_rows(model)
    if manifest.kind == "topk" and rows < len(tok):
        raise UsageError(f"{cache_dir}: the student has {rows} embedding rows, fewer than the {len(tok)} tokens of the tokenizer")


def embedding_rows(model) -> int:
    """Rows of the input embedding (its full shape even when DeepSpeed ZeRO-3 has partitioned it)."""
    w = model.get_input_embeddings().weight
    return int(getattr(w, "ds_shape", w.shape)[0])


def check_train_config(cfg: TrainConfig, task_type: str, src: str) -> str:
    """Validate the training keys; returns the resolved early-stopping / best-model metric."""
    if not 0.0 <= cfg.alpha <= 1.0:
        raise UsageError(f"{src}: train.alpha: expected a number in [0, 1], got {cfg.alpha}")
    if task_type not in ("classification", "generation"):
        raise UsageError(f"{src}: task.type: expected classification or generation, got {task_type!r}")
    if cfg.loss not in DIVERGENCES:
        raise UsageError(f"{src}: train.loss: expected one of {', '.join(DIVERGENCES)}, got {cfg.loss!r}")
    try:
        loss_kwargs(cfg.loss, cfg.jsd_beta, cfg.skew_lambda)
    except ValueError as e:
        raise UsageError(f"{src}: train.{e}") from None
    if cfg.temperature <= 0:
        raise UsageError(f"{src}: train.temperature: expected a positive number, got {cfg.temperature}")
    if cfg.schedule not in SCHEDULES:
        raise UsageError(f"{src}: train.schedule: expected one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise UsageError(f"{src}: train.mixed_precision: expected no, bf16 or fp16, got {cfg.mixed_precision!r}")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError(f"{src}: train.mixed_precision: fp16 needs a CUDA GPU; on CPU use bf16")
    for key in ("batch_size", "grad_accum"):
        if getattr(cfg, key) < 1:
            raise UsageError(f"{src}: train.{key}: expected a positive integer, got {getattr(cfg, key)}")
    if cfg.epochs <= 0:
        raise UsageError(f"{src}: train.epochs: expected a positive number, got {cfg.epochs}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UsageError(f"{src}: train.max_steps: expected a positive integer, got {cfg.max_steps}")
    if cfg.checkpoint_every < 0 or cfg.keep_checkpoints < 0:
        raise UsageError(f"{src}: train.checkpoint_every and train.keep_checkpoints: expected integers >= 0")
    if cfg.early_stopping_patience is not None and cfg.early_stopping_patience < 1:
        raise UsageError(f"{src}: train.early_stopping_patience: expected a positive integer, got {cfg.early_stopping_patience}")
    metric = cfg.early_stopping_metric
    if metric == "auto":
        metric = "val_f1" if task_type == "classification" else "val_loss"
    if metric not in ("val_loss", "val_f1"):
        raise UsageError(f"{src}: train.early_stopping_metric: expected auto, val_loss or val_f1, got {metric!r}")
    if metric == "val_f1" and task_type != "classification":
        raise UsageError(f"{src}: train.early_stopping_metric: val_f1 exists for classification only; "
                         "generation tasks are selected by val_loss")
    return metric


# ---------------------------------------------------------------------------------------------
# processes


def dist_info(acc=None) -> tuple[int, int]:
    """(rank, world size): torch.distributed's when initialised, else accelerate's, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if acc is not None:
        return acc.process_index, acc.num_processes
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _all_gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def single_process_cpu_launch_note(env=os.environ) -> str | None:
    """`accelerate launch --cpu --num_processes N` (N > 1) starts ONE process with accelerate 1.x (its
    simple launcher sets MASTER_PORT but spawns nothing without MPI): say so instead of letting the
    user believe N processes are training."""
    cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu and "MASTER_PORT" in env and "LOCAL_RANK" not in env and "WORLD_SIZE" not in env:
        return ("`accelerate launch --cpu` started a single process (accelerate's CPU launcher needs MPI for "
                "more); for N data-parallel CPU processes use `accelerate launch --config_file "
                "recipes/accelerate/ddp.yaml --num_processes N` (without --cpu: on a machine without CUDA "
                "the trainer runs the processes on gloo)")
    return None


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # Without CUDA, accelerate only treats torchrun workers as a distributed (gloo) group when told
    # cpu=True; otherwise it reports one process and does not wrap the model in DDP. DeepSpeed picks
    # its own CPU accelerator and gloo.
    cpu = not torch.cuda.is_available() and not use_ds
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) and "LOCAL_RANK" not in os.environ:
        # one process, not launched: forget an earlier run's settings (run_train called twice in one program)
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)


def _is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def _zero_stage(acc) -> int:
    if not _is_deepspeed(acc):
        return 0
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def _configure_deepspeed(acc, cfg: TrainConfig, world: int) -> None:
    """DeepSpeed wants its batch arithmetic in its config (no prepared DataLoader here): the recipe's values win."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": cfg.batch_size // world, "gradient_accumulation_steps": cfg.grad_accum,
              "train_batch_size": cfg.batch_size * cfg.grad_accum, "gradient_clipping": cfg.max_grad_norm}
    for key, value in wanted.items():
        old = ds.get(key, "auto")
        if old not in ("auto", value):
            log.warning("DeepSpeed config %s=%s replaced by %s from the recipe (train.batch_size is global)", key, old, value)
        ds[key] = value
    acc.state.deepspeed_plugin.gradient_accumulation_steps = cfg.grad_accum


# ---------------------------------------------------------------------------------------------
# tasks: what a batch's loss terms are, and how validation is scored


class ClassificationTask:
    """Soft labels over the label set; one loss unit per example."""

    kind = "soft_labels"

    def __init__(self, recipe: Recipe, splits, tok, model, cache_dir: Path):
        cfg, task = recipe.train, recipe.task
        self.cfg, self.labels, self.pad = cfg, splits.labels, tok.pad_token_id
        # labelled subsets are stratified samples (every class kept), the cache rows picked to match
        train_idx = subset_indices(splits.train, cfg.train_examples, task.split.seed)
        val_idx = subset_indices(splits.validation, cfg.eval_examples, task.split.seed)
        train_ex = [splits.train[i] for i in train_idx]
        val_ex = [splits.validation[i] for i in val_idx]
        self.train, self.label_ids = encode_classification(tok, task, self.labels, train_ex, cfg.max_length)
        self.train_probe = subset_indices(train_ex, len(val_ex), task.split.seed)  # train F1: as many, stratified
        self.val, _ = encode_classification(tok, task, self.labels, val_ex, cfg.max_length)
        self.gold = torch.tensor([e.label_index for e in self.train])
        self.val_gold = torch.tensor([e.label_index for e in self.val])
        self.teacher = self.teacher_val = None
        if cfg.alpha > 0:
            manifest = _read_cache(cache_dir, "soft_labels", recipe)
            check_cache(manifest, cache_dir, tok, model, splits)
            self.teacher = cache_mod.load_split(cache_dir, "train", len(splits.train))["label_logprobs"][train_idx]
            if manifest.complete.get("validation"):
                self.teacher_val = cache_mod.load_split(cache_dir, "validation", len(splits.validation))["label_logprobs"][val_idx]

    def count(self, idx) -> int:
        return len(idx)

    def loss_sums(self, model, idx, kw):
        """(KD sum, CE sum) over the examples idx, differentiable."""
        from .scoring import label_logprobs

        scores = label_logprobs(model, [self.train[i].prompt for i in idx], self.label_ids, self.pad)
        ce = F.cross_entropy(scores.float(), self.gold[idx].to(scores.device), reduction="sum")
        if self.teacher is None:
            return torch.zeros((), device=scores.device), ce
        kd = soft_label_kd(scores, self.teacher[idx].to(scores.device), self.cfg.temperature, self.cfg.loss,
                           reduction="sum", **kw)
        return kd, ce

    @torch.no_grad()
    def evaluate(self, model, rank, world, kw) -> dict:
        from .scoring import label_logprobs

        def score(items):
            return label_logprobs(model, [e.prompt for e in items], self.label_ids, self.pad).float().cpu()

        cfg = self.cfg
        val = _sharded(score, self.val, cfg.batch_size, rank, world)
        tr_items = [self.train[i] for i in self.train_probe]
        tr = _sharded(score, tr_items, cfg.batch_size, rank, world)
        val_f1 = classification_metrics(self.val_gold.tolist(), val.argmax(1).tolist(), self.labels)["macro_f1"]
        tr_f1 = classification_metrics([e.label_index for e in tr_items], tr.argmax(1).tolist(), self.labels)["macro_f1"]
        ev = {"val_f1": val_f1, "train_f1": tr_f1, "train_val_gap": tr_f1 - val_f1,
              "val_ce": F.cross_entropy(val, self.val_gold).item()}
        ev["val_loss"] = ev["val_ce"]
        if self.teacher_val is not None:
            ev["val_kd"] = soft_label_kd(val, self.teacher_val, cfg.temperature, cfg.loss, **kw).item()
            ev["val_loss"] = cfg.alpha * cfg.temperature ** 2 * ev["val_kd"] + (1 - cfg.alpha) * ev["val_ce"]
        return ev


class GenerationTask:
    """Token-level: the response tokens are the targets; one loss unit per target token.

    With a top-k cache the sequences and target positions are the cache's own (so they match the
    teacher's numbers exactly); the cached entry for target t is the distribution that predicted
    token t, compared with the student's logits at t-1.
    """

    kind = "topk"

    def __init__(self, recipe: Recipe, splits, tok, model, cache_dir: Path):
        from .generate import encode_generation

        cfg, task = recipe.train, recipe.task
        self.cfg, self.pad = cfg, tok.pad_token_id
        train_ex = splits.train[: cfg.train_examples] if cfg.train_examples else splits.train
        val_ex = splits.validation[: cfg.eval_examples] if cfg.eval_examples else splits.validation
        self.teacher_val_available = False
        if cfg.alpha > 0:
            manifest = _read_cache(cache_dir, "topk", recipe)
            check_cache(manifest, cache_dir, tok, model, splits)
            rows = embedding_rows(model)
            self.train = _topk_items(cache_dir, "train", len(splits.train), len(train_ex), rows)
            if manifest.complete.get("validation"):
                self.val = _topk_items(cache_dir, "validation", len(splits.validation), len(val_ex), rows)
                self.teacher_val_available = True
            else:
                self.val = [(s, p, None) for s, p in encode_generation(tok, task, val_ex, cfg.max_length)]
        else:
            self.train = [(s, p, None) for s, p in encode_generation(tok, task, train_ex, cfg.max_length)]
            self.val = [(s, p, None) for s, p in encode_generation(tok, task, val_ex, cfg.max_length)]

    def count(self, idx) -> int:
        return sum(len(self.train[i][1]) for i in idx)

    def _sums(self, model, items, kw, with_teacher: bool):
        from .scoring import target_logits

        logits = target_logits(model, [s for s, _, _ in items], [p for _, p, _ in items], self.pad)
        targets = torch.cat([torch.as_tensor(s, dtype=torch.long)[torch.as_tensor(p, dtype=torch.long)]
                             for s, p, _ in items]).to(logits.device)
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
        if not with_teacher or items[0][2] is None:
            return torch.zeros_like(ce), ce
        ids = torch.cat([t[0] for _, _, t in items]).to(logits.device)
        lps = torch.cat([t[1] for _, _, t in items]).to(logits.device)
        tail = torch.cat([t[2] for _, _, t in items]).to(logits.device)
        kd = sparse_kd(logits, ids, lps, tail, self.cfg.temperature, self.cfg.loss, reduction="none", **kw)
        return kd, ce

    def loss_sums(self, model, idx, kw):
        kd, ce = self._sums(model, [self.train[i] for i in idx], kw, self.cfg.alpha > 0)
        return kd.sum(), ce.sum()

    @torch.no_grad()
    def evaluate(self, model, rank, world, kw) -> dict:
        def score(items):
            kd, ce = self._sums(model, items, kw, self.teacher_val_available)
            out, start = [], 0
            for _, p, _ in items:  # per-example sums and token counts
                n = len(p)
                out.append([kd[start:start + n].sum().item(), ce[start:start + n].sum().item(), n])
                start += n
            return torch.tensor(out, dtype=torch.float64)

        sums = _sharded(score, self.val, self.cfg.batch_size, rank, world).sum(0)
        n = max(1.0, sums[2].item())
        cfg = self.cfg
        ev = {"val_ce": sums[1].item() / n, "val_tokens": int(sums[2].item())}
        ev["val_loss"] = ev["val_ce"]
        if self.teacher_val_available:
            ev["val_kd"] = sums[0].item() / n
            ev["val_loss"] = cfg.alpha * cfg.temperature ** 2 * ev["val_kd"] + (1 - cfg.alpha) * ev["val_ce"]
        return ev


def _read_cache(cache_dir: Path, kind: str, recipe: Recipe):
    manifest = cache_mod.read_manifest(cache_dir)
    if manifest.kind != kind:
        raise UsageError(f"{cache_dir}: a {manifest.kind} cache, but task.type {recipe.task.type!r} in "
                         f"{recipe.path} trains on a {kind} cache; run `distill generate` for this recipe")
    return manifest


def _topk_items(cache_dir, split, split_len, n, vocab_rows):
    data = cache_mod.load_split(cache_dir, split, split_len)
    bad = int(data["topk_ids"].max()) if data["topk_ids"].numel() else -1
    if bad >= vocab_rows:
        raise UsageError(f"{cache_dir}: the teacher's top-k holds token id {bad}, beyond the student's "
                         f"{vocab_rows} output rows; the student cannot be trained on this cache")
    where = {int(ix): r for r, ix in enumerate(data["index"].tolist())}
    items = []
    for i in range(n):
        if i not in where:
            raise DistillError(f"{cache_dir}: split '{split}' has no entry for example {i}")
        seq, pos, ids, lps, tail = cache_mod.example_topk(data, where[i])
        items.append((seq.long(), pos.long(), (ids.long(), lps.float(), tail.float())))
    return items


def _sharded(score, items, batch_size, rank, world):
    """score(list) -> tensor [len, ...] over `items`, each rank taking an equal contiguous share (the
    last padded, so every rank runs the same number of forward passes: ZeRO-3 needs that), gathered."""
    n = len(items)
    if n == 0:
        return torch.zeros((0,))
    per = math.ceil(n / world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    mine += [n - 1] * (per - len(mine))
    parts = [score([items[i] for i in mine[b:b + batch_size]]) for b in range(0, per, batch_size)]
    local = torch.cat(parts)
    return torch.cat(_all_gather(local, world))[:n]


# ---------------------------------------------------------------------------------------------
# schedule, checkpoints


def make_optimizer(params, cfg: TrainConfig):
    """AdamW, fused (one kernel over all parameters: on 2 CPU cores a 57M-parameter step takes 45 ms
    instead of 180 ms) where torch supports it for these parameters, the plain one otherwise."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _schedule(optimizer, warmup: int, total: int, kind: str = "cosine"):
    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> dict:
    import numpy as np

    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory is complete once renamed from its temporary name)."""
    if not root.is_dir():
        return []
    done = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / "state.pt").is_file()]
    return sorted(done, key=lambda d: int(d.name.split("-")[1]))


def _config_for_resume(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: v for k, v in d.items() if k not in RESUME_FREE_KEYS}


class Checkpointer:
    def __init__(self, root: Path, acc, model, optimizer, scheduler, rank: int, world: int, keep: int):
        self.root, self.acc, self.model, self.optimizer, self.scheduler = root, acc, model, optimizer, scheduler
        self.rank, self.world, self.keep = rank, world, keep
        self.ds = _is_deepspeed(acc)

    def save(self, step: int, state: dict) -> Path | None:
        if self.keep == 0:
            return None
        name = f"step-{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        try:
            return self._save(tmp, final, state)
        except BaseException as e:
            full = ran_out_of_space(self.root, e)
            if self.rank == 0:  # a full disk or an interruption: drop the partial copy, keep the older ones
                shutil.rmtree(tmp, ignore_errors=True)
            if full:
                kept = [c.name for c in list_checkpoints(self.root)]
                raise DistillError(f"{tmp}: no space left on the device while writing a checkpoint; removed the "
                                   f"partial copy, kept {', '.join(kept) or 'no earlier checkpoint'}. Free some "
                                   f"space and run the same command with --resume.") from None
            raise

    def _save(self, tmp: Path, final: Path, state: dict) -> Path:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(self.world)
        if self.ds:  # every rank writes its partition of the weights and optimizer state
            self.model.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
        elif self.rank == 0:
            from safetensors.torch import save_file

            m = self.acc.unwrap_model(self.model)
            save_file({n: p.detach().cpu().clone().contiguous() for n, p in m.named_parameters() if p.requires_grad},
                      str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / f"rng-rank{self.rank}.pt")
        _barrier(self.world)
        if self.rank == 0:
            torch.save({**state, "scheduler": self.scheduler.state_dict(), "world_size": self.world,
                        "deepspeed": self.ds}, tmp / "state.pt")
            atomic_write_text(tmp / "trainer_state.json", json.dumps(
                {k: state[k] for k in ("step", "micro_batch", "epoch_index", "offset", "elapsed_s")}
                | {"world_size": self.world, "deepspeed": self.ds}, indent=1))
            fsync_tree(tmp)
            pause_point("checkpoint_written")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_file(self.root)
            for old in list_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.world)
        return final

    def load(self, ck: Path, cfg: TrainConfig, identity: dict) -> dict:
        state = torch.load(ck / "state.pt", weights_only=False)
        old, new = state["config"], _config_for_resume(cfg)
        diffs = [f"train.{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        diffs += [f"{k}: checkpoint {state['identity'].get(k)!r}, now {v!r}" for k, v in identity.items()
                  if state["identity"].get(k) != v]
        if diffs:
            raise UsageError(f"{ck}: made by a run with other settings, cannot resume it ({'; '.join(diffs)}); "
                             "start afresh without --resume")
        if state["deepspeed"] != self.ds:
            raise UsageError(f"{ck}: saved {'with' if state['deepspeed'] else 'without'} DeepSpeed; resume it the same way")
        if self.ds:
            if state["world_size"] != self.world:
                raise UsageError(f"{ck}: a DeepSpeed checkpoint of {state['world_size']} processes; resume it with "
                                 f"--num_processes {state['world_size']} (ZeRO partitions are per process)")
            self.model.load_checkpoint(str(ck), tag="deepspeed", load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        else:
            from safetensors.torch import load_file

            saved = load_file(str(ck / "trainable.safetensors"))
            m = self.acc.unwrap_model(self.model)
            params = {n: p for n, p in m.named_parameters() if p.requires_grad}
            if set(params) != set(saved):
                raise UsageError(f"{ck}: its trainable weights do not match this model's "
                                 f"({len(saved)} saved, {len(params)} here); start afresh without --resume")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n].to(p.device, p.dtype))
            self.optimizer.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        rng = ck / f"rng-rank{self.rank}.pt"
        if rng.is_file():
            state["rng"] = torch.load(rng, weights_only=False)
        else:
            log.warning("%s: no RNG state for rank %d (saved by %d processes); its RNG starts from the seed",
                        ck, self.rank, state["world_size"])
        if state["world_size"] != self.world:
            log.warning("resuming a %d-process run with %d processes: same data order and batches, "
                        "but per-process RNG streams (dropout) differ", state["world_size"], self.world)
        return state


# ---------------------------------------------------------------------------------------------
# plot


def _plot(history: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h for h in history if "loss" in h]
    epochs = [h for h in history if "val_loss" in h or "val_f1" in h]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "kd", "ce"):
        if steps and key in steps[0]:
            a.plot([h["step"] for h in steps], [h[key] for h in steps], label=key)
    a.set_xlabel("optimizer step")
    a.set_title("training loss terms")
    a.legend()
    if epochs and "val_f1" in epochs[0]:
        b.plot([h["epoch"] for h in epochs], [h["train_f1"] for h in epochs], "o-", label="train macro-F1")
        b.plot([h["epoch"] for h in epochs], [h["val_f1"] for h in epochs], "o-", label="validation macro-F1")
        b.set_ylim(0, 1.02)
        b.set_title("train vs validation (watch the gap)")
    elif epochs:
        b.plot([h["epoch"] for h in epochs], [h["val_loss"] for h in epochs], "o-", label="validation loss")
        b.set_title("validation loss per epoch")
    if epochs:
        b.set_xlabel("epoch")
        b.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# the loop


class SwampWatch:
    """Warn once when one weighted loss term stays below a small share of the total for many steps."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.runs, self.warned, self.messages = cfg, {"kd": 0, "ce": 0}, set(), []

    def update(self, step: int, kd: float, ce: float, main: bool) -> None:
        c = self.cfg
        if not 0 < c.alpha < 1:
            return
        kd_w, ce_w = c.alpha * c.temperature ** 2 * kd, (1 - c.alpha) * ce
        total = kd_w + ce_w
        if total <= 0:
            return
        for name, share in (("kd", kd_w / total), ("ce", ce_w / total)):
            self.runs[name] = self.runs[name] + 1 if share < c.swamp_fraction else 0
            if self.runs[name] >= c.swamp_steps and name not in self.warned:
                self.warned.add(name)
                if name == "kd":
                    msg = (f"step {step}: the distillation term alpha*T^2*KD ({kd_w:.4g}) has been under "
                           f"{c.swamp_fraction:.0%} of the loss for {c.swamp_steps} steps: the student learns from "
                           "the gold labels alone; raise train.alpha or train.temperature, or check the cache")
                else:
                    msg = (f"step {step}: the cross-entropy term (1-alpha)*CE ({ce_w:.4g}) has been under "
                           f"{c.swamp_fraction:.0%} of the loss for {c.swamp_steps} steps: the gold labels have no "
                           "effect; lower train.alpha or train.temperature if that is not intended")
                self.messages.append(msg)
                if main:
                    log.warning(msg)

    def state(self) -> dict:
        return {"runs": dict(self.runs), "warned": sorted(self.warned), "messages": list(self.messages)}

    def restore(self, st: dict) -> None:
        self.runs, self.warned, self.messages = dict(st["runs"]), set(st["warned"]), list(st["messages"])


def _better(ev: dict, best: dict | None, metric: str) -> bool:
    if best is None:
        return True
    if metric == "val_f1":
        return (ev["val_f1"], -ev["val_loss"]) > (best["val_f1"], -best["val_loss"])
    return ev["val_loss"] < best["val_loss"]


def run_train(recipe: Recipe, cache: str | None = None, out: str | None = None, init_from: str | None = None,
              resume: bool = False, stop_after_steps: int | None = None) -> Path:
    """Train the student; returns its directory (the best evaluation's weights, a Hugging Face directory).

    resume: continue from the newest checkpoint in OUT/checkpoints (a fresh start if there is none).
    stop_after_steps: stop after that many optimizer steps with a checkpoint, as an interruption would
    (the schedule stays that of the whole run), to be continued with resume=True.
    """
    from accelerate.utils import set_seed

    cfg, task = recipe.train, recipe.task
    src = recipe.path or "recipe"
    metric = check_train_config(cfg, task.type, src)
    if stop_after_steps is not None and (stop_after_steps < 1 or cfg.keep_checkpoints == 0):
        raise UsageError(f"--stop-after-steps {stop_after_steps}: expected a positive number of steps and "
                         f"train.keep_checkpoints > 0 in {src} (the stop leaves a checkpoint to --resume from)")
    check_quantization(cfg.student, cfg.lora, src)
    kw = loss_kwargs(cfg.loss, cfg.jsd_beta, cfg.skew_lambda)
    note = single_process_cpu_launch_note()
    acc = _make_accelerator(cfg)
    rank, world = dist_info(acc)
    main = rank == 0
    if not main:  # one copy of the log: rank 0's (warnings and errors still come from every rank)
        logging.getLogger("distill").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)
    if note and main:
        log.warning(note)
    ds = _is_deepspeed(acc)
    if cfg.batch_size % world:
        raise UsageError(f"{src}: train.batch_size={cfg.batch_size} must divide evenly over {world} processes")
    if cfg.lora and _zero_stage(acc) == 3:
        raise UsageError(f"{src}: train.lora with DeepSpeed ZeRO-3 is not supported (the adapter is small: use "
                         "recipes/accelerate/zero2.yaml or ddp.yaml)")
    set_seed(cfg.seed)
    splits = prepare_splits(task, recipe.workdir, src)
    if not splits.validation:
        raise UsageError(f"{src}: task.split.validation: the validation split is empty; training selects its "
                         "best epoch on it")
    base_path = resolve_model_path(resolve_teacher(init_from or recipe.teacher).source)
    tok = load_tokenizer(cfg.student.model and resolve_model_path(cfg.student.model) or base_path)
    model = build_student(cfg.student, base_path, gradient_checkpointing=cfg.gradient_checkpointing)
    n_params = count_parameters(model)
    if cfg.lora:
        model = add_lora(model, cfg.lora)
    cache_dir = Path(cache or recipe.workdir_path / "cache")
    data = (ClassificationTask if task.type == "classification" else GenerationTask)(recipe, splits, tok, model, cache_dir)
    n_train = len(data.train)
    if n_train == 0:
        raise UsageError(f"{src}: no training examples")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    per_epoch = math.ceil(n_train / cfg.batch_size)
    total_batches = max(1, int(round(cfg.epochs * per_epoch)))
    total_steps = math.ceil(total_batches / cfg.grad_accum)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    total_batches = total_steps * cfg.grad_accum  # whole optimizer steps only
    scheduler = _schedule(optimizer, int(cfg.warmup_ratio * total_steps), total_steps, cfg.schedule)
    if ds:
        _configure_deepspeed(acc, cfg, world)
    # the scheduler is stepped here, once per optimizer step (accelerate would step it once per process)
    model, optimizer = acc.prepare(model, optimizer)

    out_dir = Path(out or recipe.workdir_path / "student")
    ck_root = out_dir / "checkpoints"
    ckpt = Checkpointer(ck_root, acc, model, optimizer, scheduler, rank, world, cfg.keep_checkpoints)
    identity = {"data_fingerprint": splits.fingerprint, "base": str(base_path), "task_type": task.type,
                "cache": str(cache_dir) if cfg.alpha > 0 else None}
    gen = torch.Generator().manual_seed(cfg.seed)
    pos = {"micro_batch": 0, "step": 0, "epoch_index": 0, "offset": n_train, "order": None}
    history, best, bad_evals, elapsed0 = [], None, 0, 0.0
    swamp = SwampWatch(cfg)
    resumed_from, rng = None, None
    existing = list_checkpoints(ck_root)
    if main and ck_root.is_dir():  # partial copies of a run killed while writing one
        for partial in ck_root.glob(".tmp-*"):
            shutil.rmtree(partial, ignore_errors=True)
    if resume and existing:
        st = ckpt.load(existing[-1], cfg, identity)
        resumed_from = str(existing[-1])
        gen.set_state(st["gen_state"])
        pos = {k: st[k] for k in pos}
        history, best, bad_evals, elapsed0 = st["history"], st["best"], st["bad_evals"], st["elapsed_s"]
        swamp.restore(st["swamp"])
        rng = st.get("rng")
        if main:
            log.info("resuming from %s (optimizer step %d of %d)", existing[-1], pos["step"], total_steps)
    else:
        if resume and main:
            log.warning("--resume: no checkpoint in %s; starting from the beginning", ck_root)
        if existing and main:
            log.info("removing %d checkpoint(s) of an earlier run in %s (use --resume to continue one)", len(existing), ck_root)
        if main:
            shutil.rmtree(ck_root, ignore_errors=True)
        _barrier(world)
    if rng is not None:
        _set_rng_state(rng)

    t0 = time.time() - elapsed0
    step, b = pos["step"], pos["micro_batch"]
    epoch_index, offset, order = pos["epoch_index"], pos["offset"], pos["order"]
    bar = tqdm(total=total_batches, initial=b, desc="train", unit="batch", disable=not main)
    acc.step = 0  # micro-batches since the last optimizer step: checkpoints are taken at step boundaries
    acc_kd = acc_ce = 0.0
    grad_norm = None
    pending_epoch_ckpt, stopped, last_saved = False, None, None

    def state_now() -> dict:
        return {"micro_batch": b, "step": step, "epoch_index": epoch_index, "offset": offset, "order": order,
                "gen_state": gen.get_state(), "history": history, "best": best, "bad_evals": bad_evals,
                "elapsed_s": round(time.time() - t0, 1), "swamp": swamp.state(),
                "config": _config_for_resume(cfg), "identity": identity}

    while b < total_batches and (stopped is None or b % cfg.grad_accum):  # a stop waits for the step's end
        if offset >= n_train:
            order = torch.randperm(n_train, generator=gen).tolist()
            offset, epoch_index = 0, epoch_index + 1
        gidx = order[offset: offset + cfg.batch_size]
        offset += len(gidx)
        local = gidx[rank::world]
        weight = world / data.count(gidx)
        if not local:  # a short last batch leaves this rank nothing: take part with a zero-weight example
            local, weight = gidx[:1], 0.0
        model.train()
        with acc.accumulate(model):
            kd_sum, ce_sum = data.loss_sums(model, local, kw)
            loss = (cfg.alpha * cfg.temperature ** 2 * kd_sum + (1 - cfg.alpha) * ce_sum) * weight
            acc.backward(loss)
            if acc.sync_gradients and not ds:
                grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        terms = torch.tensor([kd_sum.item(), ce_sum.item()], dtype=torch.float64) * (weight / world)
        terms = _all_reduce_sum(terms, world)  # the whole batch's mean KD and CE
        acc_kd += terms[0].item() / cfg.grad_accum
        acc_ce += terms[1].item() / cfg.grad_accum
        b += 1
        bar.update(1)
        epoch_done = offset >= n_train or b == total_batches
        if acc.sync_gradients:
            step += 1
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            if ds:
                grad_norm = model.get_global_grad_norm()
            rec = {"step": step, "loss": cfg.alpha * cfg.temperature ** 2 * acc_kd + (1 - cfg.alpha) * acc_ce,
                   "kd": acc_kd, "ce": acc_ce, "lr": lr}
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            history.append(rec)
            swamp.update(step, acc_kd, acc_ce, main)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", kd=f"{rec['kd']:.3f}", ce=f"{rec['ce']:.3f}")
            acc_kd = acc_ce = 0.0
        if epoch_done:
            epoch = (epoch_index - 1) + offset / n_train
            ev = data.evaluate(acc.unwrap_model(model), rank, world, kw)
            ev["epoch"] = round(epoch, 3)
            ev["step"] = step
            ev["elapsed_s"] = round(time.time() - t0, 1)
            history.append(ev)
            if main:
                log.info("epoch %.2f: val loss %.4f%s, val CE %.4f%s", epoch, ev["val_loss"],
                         f", val macro-F1 {ev['val_f1']:.4f}, train macro-F1 {ev['train_f1']:.4f}" if "val_f1" in ev else "",
                         ev["val_ce"], f", val KD {ev['val_kd']:.4f}" if "val_kd" in ev else "")
                if ev.get("train_val_gap", 0) > cfg.overfit_gap:
                    log.warning("train macro-F1 exceeds validation by %.3f: the student may be overfitting", ev["train_val_gap"])
            if _better(ev, best, metric):
                best, bad_evals = ev, 0
                _save_best(acc, model, tok, out_dir, cfg, main, base_path)
            else:
                bad_evals += 1
                if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                    stopped = (f"early stopping at epoch {ev['epoch']}: no better {metric} for "
                               f"{bad_evals} evaluation(s)")
                    if main:
                        log.info(stopped)
            pending_epoch_ckpt = True
            acc.wait_for_everyone()
        at_boundary = b % cfg.grad_accum == 0
        if at_boundary and last_saved != step:
            finished = b >= total_batches or stopped is not None
            interrupt = stop_after_steps is not None and step >= stop_after_steps and not finished
            periodic = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
            if periodic or pending_epoch_ckpt or finished or interrupt:
                ckpt.save(step, state_now())
                last_saved, pending_epoch_ckpt = step, False
            if interrupt:
                bar.close()
                if main:
                    log.info("stopped after optimizer step %d of %d as asked; continue with --resume", step, total_steps)
                acc.wait_for_everyone()
                return out_dir
    bar.close()
    if main:
        summary = {"recipe": recipe.path, "task_type": task.type, "alpha": cfg.alpha, "temperature": cfg.temperature,
                   "loss": cfg.loss, "loss_params": kw, "base": base_path,
                   "layers": acc.unwrap_model(model).config.num_hidden_layers, "parameters": n_params,
                   "trainable_parameters": count_parameters(params),
                   "train_examples": n_train, "validation_examples": len(data.val), "best": best,
                   "best_metric": metric, "overfit_gap": cfg.overfit_gap, "steps": step, "total_steps": total_steps,
                   "stopped_early": stopped, "resumed_from": resumed_from, "warnings": swamp.messages,
                   "seconds": round(time.time() - t0, 1), "world_size": world,
                   "distributed": str(acc.distributed_type).split(".")[-1], "zero_stage": _zero_stage(acc) or None,
                   "mixed_precision": cfg.mixed_precision, "cache": str(cache_dir) if cfg.alpha > 0 else None}
        atomic_write_text(out_dir / "training.json", json.dumps(summary, indent=1))
        atomic_write_text(out_dir / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        _plot(history, out_dir / "training.png")
    acc.wait_for_everyone()
    return out_dir


def _save_best(acc, model, tok, out_dir: Path, cfg: TrainConfig, main: bool, base_path: str) -> None:
    """The best evaluation's weights as a Hugging Face directory (rank 0 writes; ZeRO-3 gathers on every rank)."""
    state = acc.get_state_dict(model) if _zero_stage(acc) == 3 else None
    if main:
        m = acc.unwrap_model(model)
        if cfg.student.quantization and cfg.lora and cfg.lora.merge:  # QLoRA: merge into full-precision weights
            m = dense_lora_copy(m, cfg.student, cfg.lora, base_path)
        save_model(m, tok, out_dir, merge=cfg.lora.merge if cfg.lora else True, state_dict=state)
