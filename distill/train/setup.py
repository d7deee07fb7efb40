"""Set-up of one training run: machine checks, processes, data, student, optimizer, schedule, checkpointer.

`setup()` returns a `Run`, everything the loop reads and never changes. The recipe's own values were
checked by `config` (one pass, when it was read); what only this machine can answer, a CUDA GPU or an
installed package, is checked here (`check_machine`). `scripts/bench_train.py` builds its students
through the same `build_parts`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distill.cache.written_pool import join_written
from distill.config import Recipe, TrainConfig, resolve_teacher, stopping_metric, validate_recipe
from distill.data.leakage import split_overlaps, warn_overlaps
from distill.data.prompts import task_token_ids
from distill.data.splits import Splits, prepare_splits
from distill.errors import UsageError
from distill.fileio import check_output_dir, directory_lock
from distill.models.label_tokens import add_label_tokens
from distill.models.loading import count_parameters, load_tokenizer, resolve_model_path
from distill.student.build import add_lora, build_student
from distill.train.checkpoint import Checkpointer, config_for_resume
from distill.train.data import data_order
from distill.train.distributed import (
    all_gather,
    configure_deepspeed,
    dist_info,
    is_deepspeed,
    make_accelerator,
    single_process_cpu_launch_note,
    zero_stage,
)
from distill.train.losses import loss_kwargs
from distill.train.reporting import tracker_config
from distill.train.state import DataOrder
from distill.train.tasks import Task, make_task

if TYPE_CHECKING:  # types only: accelerate and transformers are imported where the work starts
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Run:
    """One run's fixed parts, built by keyword (`setup`)."""

    recipe: Recipe
    cfg: TrainConfig  # recipe.train
    accelerator: Accelerator
    rank: int  # this process
    world: int  # processes in the run
    model: torch.nn.Module  # prepared by accelerate (DDP / DeepSpeed engine)
    params: list[torch.nn.Parameter]  # the trainable parameters
    optimizer: torch.optim.Optimizer  # prepared by accelerate
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped by the loop once per optimizer step
    task: Task
    tok: PreTrainedTokenizerBase  # the student's tokenizer
    order: DataOrder
    total_steps: int  # optimizer steps
    total_batches: int  # micro-batches
    metric: str  # picks the best evaluation (config.stopping_metric)
    divergence_params: dict[str, float]  # keyword arguments of losses.divergence for train.loss
    base_path: str  # the model the student was built from
    n_params: int  # the student's parameters (before LoRA)
    cache_dir: Path
    out_dir: Path
    ckpt: Checkpointer
    settings: dict[str, dict]  # what a checkpoint must match to be resumed
    stop_after_steps: int | None
    out_lock: contextlib.ExitStack  # held for the whole run: a second `distill train` to the same --out is refused
    labels: list[str] | None  # the label set when the student answers with label tokens

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def deepspeed(self) -> bool:
        return is_deepspeed(self.accelerator)


@dataclass(kw_only=True)
class Parts:
    """The student and what it trains on, before accelerate wraps them."""

    splits: Splits
    base_path: str
    tok: PreTrainedTokenizerBase
    model: torch.nn.Module
    n_params: int
    task: Task
    cache_dir: Path
    label_tokens: list[int] | None  # ids of the label tokens (classification students), else None


def check_machine(recipe: Recipe) -> None:
    """What the recipe asks of this machine: a CUDA GPU for fp16 and 4-bit (QLoRA), bitsandbytes for 4-bit,
    the packages of train.report_to's trackers; bf16 on a CPU that only emulates it is warned. The recipe's
    own values and combinations are config's (validate_recipe)."""
    cfg, src = recipe.train, recipe.path or "recipe"
    cuda = torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and not cuda:
        raise UsageError(f"{src}: train.mixed_precision: fp16 needs a CUDA GPU; on CPU use bf16")
    if cfg.mixed_precision == "bf16" and not cuda and not cpu_has_native_bf16():
        log.warning("%s: train.mixed_precision: bf16 on a CPU without bfloat16 instructions (oneDNN finds none): "
                    "autocast emulates it, and a training step can be many times slower than in float32; "
                    "'no' is faster here", src)
    if cfg.student.quantization is not None:
        if not cuda:
            raise UsageError(f"{src}: train.student.quantization: 4bit (QLoRA) needs a CUDA GPU for bitsandbytes' "
                             "4-bit kernels, and this machine has none; on CPU use plain LoRA (remove "
                             "train.student.quantization) or full fine-tuning")
        from transformers.utils import is_bitsandbytes_available

        if not is_bitsandbytes_available():
            raise UsageError(f"{src}: train.student.quantization: 4bit needs the bitsandbytes package "
                             "(pip install bitsandbytes)")
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    missing = [t for t in cfg.report_to if not available[t]()]
    if missing:
        raise UsageError(f"{src}: train.report_to: {', '.join(missing)} not installed in this environment "
                         f"(pip install {' '.join(missing)}), or remove it from train.report_to")


def check_stop(recipe: Recipe, stop_after_steps: int | None) -> None:
    """--stop-after-steps beside the recipe: the stop leaves a checkpoint to resume from."""
    if stop_after_steps is not None and (stop_after_steps < 1 or recipe.train.keep_checkpoints == 0):
        raise UsageError(f"--stop-after-steps {stop_after_steps}: expected a positive number of steps and "
                         f"train.keep_checkpoints > 0 in {recipe.path or 'recipe'} (the stop leaves a checkpoint "
                         "to --resume from)")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN, which runs torch's CPU matmuls, has bfloat16 instructions here (AVX512, AMX); without
    them bf16 autocast is emulated and slow. True when torch cannot tell (no warning is better than a false one)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def build_parts(recipe: Recipe, cache: str | None = None, init_from: str | None = None) -> Parts:
    """Seed, splits, tokenizer, student (layers cut, label tokens and LoRA added) and the task's encoded
    data and cache."""
    from accelerate.utils import set_seed

    cfg, src = recipe.train, recipe.path or "recipe"
    set_seed(cfg.seed)
    splits = join_written(recipe, prepare_splits(recipe.task, recipe.workdir, src))
    warn_overlaps(split_overlaps(recipe.task, splits))  # validation or holdout texts that are also training texts
    if not splits.validation:
        raise UsageError(f"{src}: task.split.validation: the validation split is empty; training selects its "
                         "best epoch on it")
    base_path = resolve_model_path(resolve_teacher(init_from or recipe.teacher).source)
    tok = load_tokenizer(cfg.student.model and resolve_model_path(cfg.student.model) or base_path)
    texts = None if cfg.student.model else task_token_ids(recipe.task, splits, tok, cfg.student.importance_examples,
                                                       recipe.task.split.seed)  # importance and throughput
    model = build_student(cfg.student, base_path, gradient_checkpointing=cfg.gradient_checkpointing,
                          texts=texts, pad_id=tok.pad_token_id)
    label_tokens = None
    if recipe.task.type == "classification" and cfg.student.label_tokens:
        label_tokens = add_label_tokens(model, tok, splits.labels)
    n_params = count_parameters(model)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if cfg.lora:
        model = add_lora(model, cfg.lora, label_tokens)
    fold_frozen_output_layer(model)
    cache_dir = Path(cache or recipe.workdir_path / "cache")
    task = make_task(recipe, splits, tok, model, cache_dir)
    if not task.train:
        raise UsageError(f"{src}: no training examples")
    return Parts(splits=splits, base_path=base_path, tok=tok, model=model, n_params=n_params, task=task,
                 cache_dir=cache_dir, label_tokens=label_tokens)


def fold_frozen_output_layer(model) -> None:
    """Give a frozen output layer contiguous inputs. The hidden states of the last positions
    (`logits_to_keep`) are a strided view; torch's matmul multiplies such a view by a weight that needs no
    gradient as a batched product over a broadcast copy of the weight, much slower on CPU than the one
    matrix product it runs once the view is contiguous."""
    out = model.get_output_embeddings()
    if out is not None and not out.weight.requires_grad:
        out.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


def check_out_dir(out_dir: Path, recipe: Recipe, parts: Parts) -> None:
    """Refuse an output directory that is, or lies inside, something this run reads: the run would
    write a student over its own teacher, starting model or cache."""
    cfg = recipe.train
    reads = {"the teacher (the student's base)": parts.base_path,
             "the teacher cache": parts.cache_dir if cfg.reads_cache else None,
             "the student's starting model (train.student.model)": cfg.student.model}
    out = out_dir.resolve()
    for what, path in reads.items():
        if path is None or not Path(path).exists():
            continue  # a hub id, or nothing read
        src = Path(path).resolve()
        if out == src or src in out.parents:
            raise UsageError(f"--out {out_dir}: is {'inside ' if out != src else ''}{what} ({path}); "
                             "training would write over what it reads. Choose another --out")
    check_output_dir(out_dir, "--out", "model")  # not a user's directory, nor another command's output


def lock_out_dir(out_dir: Path, rank: int, world: int) -> contextlib.ExitStack:
    """Rank 0 takes OUT/.lock, held until the returned stack is closed (the run's `with`) or the process
    dies; every rank learns whether it could, so a refusal stops all of them instead of leaving some waiting."""
    held, refused = contextlib.ExitStack(), None
    if rank == 0:
        try:
            held.enter_context(directory_lock(out_dir, "another `distill train` ({holder}) is writing this model "
                                                       "directory; wait for it, stop it, or choose another --out"))
        except UsageError as e:
            refused = str(e)
    refused = next((r for r in all_gather(refused, world) if r), None)
    if refused:
        raise UsageError(refused)
    return held


def make_optimizer(params, cfg: TrainConfig):
    """AdamW, fused (one kernel over all parameters instead of one per tensor) where torch supports it
    for these parameters, the plain one otherwise."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(optimizer, warmup: int, total: int, kind: str = "cosine"):
    """Linear warm-up over `warmup` steps, then cosine, linear or constant to step `total`."""
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


def step_counts(n_train: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps, micro-batches) of the whole run: whole optimizer steps only, capped by max_steps."""
    total_steps = math.ceil(max(1, int(round(cfg.epochs * math.ceil(n_train / cfg.batch_size)))) / cfg.grad_accum)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return total_steps, total_steps * cfg.grad_accum


def _start_processes(cfg: TrainConfig, src: str, out_dir: Path):
    """The Accelerator and this process's rank; rank 0 alone logs at INFO."""
    note = single_process_cpu_launch_note()
    acc = make_accelerator(cfg, out_dir)
    rank, world = dist_info(acc)
    if rank != 0:  # one copy of the log: rank 0's (warnings and errors still come from every rank)
        logging.getLogger("distill").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)
    if note and rank == 0:
        log.warning(note)
    if cfg.batch_size % world:
        raise UsageError(f"{src}: train.batch_size={cfg.batch_size} must divide evenly over {world} processes")
    if cfg.lora and zero_stage(acc) == 3:
        raise UsageError(f"{src}: train.lora with DeepSpeed ZeRO-3 is not supported (the adapter is small: use "
                         "recipes/accelerate/zero2.yaml or ddp.yaml)")
    return acc, rank, world


def setup(recipe: Recipe, cache=None, out=None, init_from=None, stop_after_steps=None) -> Run:
    """Everything the loop needs, after the recipe (validate_recipe: a recipe built or edited in code is
    checked by the same pass as a file), the machine and --stop-after-steps are checked."""
    cfg, src = recipe.train, recipe.path or "recipe"
    validate_recipe(recipe)
    check_machine(recipe)
    check_stop(recipe, stop_after_steps)
    out_dir = Path(out or recipe.workdir_path / "student")
    accelerator, rank, world = _start_processes(cfg, src, out_dir)
    p = build_parts(recipe, cache, init_from)
    check_out_dir(out_dir, recipe, p)
    out_lock = lock_out_dir(out_dir, rank, world)
    params = [q for q in p.model.parameters() if q.requires_grad]
    optimizer = make_optimizer(params, cfg)
    total_steps, total_batches = step_counts(len(p.task.train), cfg)
    scheduler = make_schedule(optimizer, int(cfg.warmup_ratio * total_steps), total_steps, cfg.schedule)
    if is_deepspeed(accelerator):
        configure_deepspeed(accelerator, cfg, world)
    # the scheduler is stepped by the loop, once per optimizer step (accelerate would step it once per process)
    model, optimizer = accelerator.prepare(p.model, optimizer)
    if cfg.report_to:
        accelerator.init_trackers(recipe.name, config=tracker_config(cfg))  # tensorboard: OUT/logs/NAME/
    ckpt = Checkpointer(out_dir / "checkpoints", accelerator, model, optimizer, scheduler, rank, world,
                        cfg.keep_checkpoints)
    # streamed top-k: each rank its share
    order = data_order(p.task.train, cfg.batch_size, cfg.seed, rank, world, cfg.group_by_length)
    identity = {"data_fingerprint": p.splits.fingerprint, "base": str(p.base_path), "task_type": recipe.task.type,
                "cache": str(p.cache_dir) if cfg.reads_cache else None, "data_order": order.layout}
    return Run(recipe=recipe, cfg=cfg, accelerator=accelerator, rank=rank, world=world, model=model, params=params,
               optimizer=optimizer, scheduler=scheduler, task=p.task, tok=p.tok, order=order,
               total_steps=total_steps, total_batches=total_batches, metric=stopping_metric(recipe),
               divergence_params=loss_kwargs(cfg.loss, cfg.jsd_beta, cfg.skew_lambda), base_path=p.base_path,
               n_params=p.n_params, cache_dir=p.cache_dir, out_dir=out_dir, ckpt=ckpt,
               settings={"train": config_for_resume(cfg), "identity": identity},
               stop_after_steps=stop_after_steps, out_lock=out_lock,
               labels=p.splits.labels if p.label_tokens else None)
