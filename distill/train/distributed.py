"""Processes: ranks, collectives, the Accelerator and DeepSpeed's batch arithmetic.

Ranks come from torch.distributed when it is initialised: on CPU, accelerate may report one
process per rank although the process group has several.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from distill.config import TrainConfig

log = logging.getLogger(__name__)


def dist_info(acc=None) -> tuple[int, int]:
    """(rank, world size): torch.distributed's when initialised, else accelerate's, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if acc is not None:
        return acc.process_index, acc.num_processes
    return 0, 1


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def all_gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sharded(score, items, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """score(list) -> tensor [len, ...] over `items`, each rank taking an equal contiguous share (the
    last padded, so every rank runs the same number of forward passes: ZeRO-3 needs that), gathered."""
    n = len(items)
    if n == 0:
        return torch.zeros((0,))
    per = math.ceil(n / world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    mine += [n - 1] * (per - len(mine))
    parts = [score([items[i] for i in mine[b:b + batch_size]]) for b in range(0, per, batch_size)]
    return torch.cat(all_gather(torch.cat(parts), world))[:n]


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


def make_accelerator(cfg: TrainConfig, project_dir=None):
    """The run's Accelerator; `train.report_to` trackers log under project_dir/logs (the model directory)."""
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
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                       log_with=cfg.report_to or None,
                       project_dir=str(Path(project_dir) / "logs") if cfg.report_to else None)


def is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def zero_stage(acc) -> int:
    if not is_deepspeed(acc):
        return 0
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def configure_deepspeed(acc, cfg: TrainConfig, world: int) -> None:
    """DeepSpeed wants its batch arithmetic in its config (no prepared DataLoader here): the recipe's values win."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": cfg.batch_size // world, "gradient_accumulation_steps": cfg.grad_accum,
              "train_batch_size": cfg.batch_size * cfg.grad_accum, "gradient_clipping": cfg.max_grad_norm}
    for key, value in wanted.items():
        old = ds.get(key, "auto")
        if old not in ("auto", value):
            log.warning("DeepSpeed config %s=%s replaced by %s from the recipe (train.batch_size is global)",
                        key, old, value)
        ds[key] = value
    acc.state.deepspeed_plugin.gradient_accumulation_steps = cfg.grad_accum
