"""Checkpoints: OUT/checkpoints/step-NNNNNNNN, each complete or absent.

A checkpoint is written to a temporary directory, fsynced and renamed; the newest
`train.keep_checkpoints` are kept. It holds the trainable weights (or DeepSpeed's partitions),
the optimizer and scheduler state, every rank's RNG states and the loop state (from which the
data position follows), so `--resume` continues to the same result as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from distill.config import TrainConfig
from distill.errors import DistillError, UsageError
from distill.fileio import atomic_write_text, fsync_file, fsync_tree, pause_point, ran_out_of_space
from distill.train.distributed import barrier, is_deepspeed

log = logging.getLogger(__name__)

FORMAT = 3  # 2: the loop state is one record (micro-batch counter; the data position is derived); 3: every
#               file loads with torch.load(weights_only=True) (the numpy RNG state as a tensor, not an array)
# TrainConfig keys that may change between an interrupted run and its --resume
RESUME_FREE_KEYS = {"checkpoint_every", "keep_checkpoints", "overfit_gap", "swamp_fraction", "swamp_steps",
                    "early_stopping_patience", "report_to"}


def rng_state() -> dict:
    """Every RNG's state in types `torch.load(weights_only=True)` reads: tensors, numbers, lists (numpy's
    key array becomes a tensor, so loading it needs no numpy class on an allow-list)."""
    import numpy as np

    name, key, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"])
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    n = st["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_data_only(path: Path):
    """torch.load that runs no code from the file: only tensors and plain values are read, and a file
    holding anything else (a crafted pickle, or a checkpoint another program wrote) is refused."""
    import pickle

    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:  # what weights_only raises for any class or call outside the allow-list
        raise UsageError(f"{path}: holds objects other than tensors and plain values, so it was not loaded (no "
                         "code in a checkpoint is run); not a checkpoint distill wrote: start afresh without "
                         "--resume") from None
    except Exception as e:  # noqa: BLE001 - EOFError, RuntimeError (truncated, not a zip): unreadable
        raise UsageError(f"{path}: not readable as a checkpoint file ({type(e).__name__}); start afresh "
                         "without --resume") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: holds a {type(data).__name__}, not a checkpoint record; start afresh without "
                         "--resume")
    return data


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory is complete once renamed from its temporary name)."""
    if not root.is_dir():
        return []
    done = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / "state.pt").is_file()]
    return sorted(done, key=lambda d: int(d.name.split("-")[1]))


def remove_partial(root: Path) -> None:
    """Partial copies of a run killed while writing a checkpoint."""
    if root.is_dir():
        for partial in root.glob(".tmp-*"):
            _remove(partial)


def _remove(path: Path) -> None:
    """Remove a temporary directory, or a link planted under its name (the link, never its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def config_for_resume(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: v for k, v in d.items() if k not in RESUME_FREE_KEYS}


class Checkpointer:
    """Saves and restores one run's checkpoints (every rank calls both: DeepSpeed writes partitions)."""

    def __init__(self, root: Path, acc, model, optimizer, scheduler, rank: int, world: int, keep: int):
        self.root, self.acc, self.model, self.optimizer, self.scheduler = root, acc, model, optimizer, scheduler
        self.rank, self.world, self.keep = rank, world, keep
        self.ds = is_deepspeed(acc)

    def save(self, step: int, loop: dict, settings: dict) -> Path | None:
        """Write step-N holding `loop` (the loop state) and `settings` ({"train": ..., "identity": ...}:
        what a resume must match)."""
        if self.keep == 0:
            return None
        name = f"step-{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        try:
            return self._save(tmp, final, loop, settings)
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

    def _save(self, tmp: Path, final: Path, loop: dict, settings: dict) -> Path:
        if self.rank == 0:
            _remove(tmp)
            tmp.mkdir(parents=True)
        barrier(self.world)
        if self.ds:  # every rank writes its partition of the weights and optimizer state
            self.model.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
        elif self.rank == 0:
            from safetensors.torch import save_file

            m = self.acc.unwrap_model(self.model)
            save_file({n: p.detach().cpu().clone().contiguous() for n, p in m.named_parameters() if p.requires_grad},
                      str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
        barrier(self.world)
        if self.rank == 0:
            torch.save({"format": FORMAT, "loop": loop, **settings, "scheduler": self.scheduler.state_dict(),
                        "world_size": self.world, "deepspeed": self.ds}, tmp / "state.pt")
            atomic_write_text(tmp / "trainer_state.json", json.dumps(
                {"micro_batch": loop["micro_batch"], "step": int(final.name.split("-")[1]),
                 "elapsed_s": loop["elapsed_s"], "world_size": self.world, "deepspeed": self.ds}, indent=1))
            fsync_tree(tmp)
            pause_point("checkpoint_written")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_file(self.root)
            for old in list_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.world)
        return final

    def load(self, ck: Path, settings: dict) -> tuple[dict, dict | None]:
        """Restore weights, optimizer and scheduler from ck; returns (loop state, this rank's RNG state)."""
        state = load_data_only(ck / "state.pt")
        if state.get("format") != FORMAT:
            raise UsageError(f"{ck}: a checkpoint of an older distill (format {state.get('format', 1)}, this one "
                             f"reads {FORMAT}); start afresh without --resume")
        diffs = [f"{where}.{k}: checkpoint {state[where].get(k)!r}, now {v!r}"
                 for where, now in settings.items() for k, v in now.items() if state[where].get(k) != v]
        diffs += [f"{where}.{k}: checkpoint {v!r}, now unset" for where, now in settings.items()
                  for k, v in state[where].items() if k not in now]
        if diffs:
            raise UsageError(f"{ck}: made by a run with other settings, cannot resume it ({'; '.join(diffs)}); "
                             "start afresh without --resume")
        if state["deepspeed"] != self.ds:
            raise UsageError(f"{ck}: saved {'with' if state['deepspeed'] else 'without'} DeepSpeed; "
                             "resume it the same way")
        self._load_weights(ck, state)
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        rng = ck / f"rng-rank{self.rank}.pt"
        if not rng.is_file():
            log.warning("%s: no RNG state for rank %d (saved by %d processes); its RNG starts from the seed",
                        ck, self.rank, state["world_size"])
        if state["world_size"] != self.world:
            log.warning("resuming a %d-process run with %d processes: same data order and batches, "
                        "but per-process RNG streams (dropout) differ", state["world_size"], self.world)
        return state["loop"], load_data_only(rng) if rng.is_file() else None

    def _load_weights(self, ck: Path, state: dict) -> None:
        if self.ds:
            if state["world_size"] != self.world:
                raise UsageError(f"{ck}: a DeepSpeed checkpoint of {state['world_size']} processes; resume it with "
                                 f"--num_processes {state['world_size']} (ZeRO partitions are per process)")
            self.model.load_checkpoint(str(ck), tag="deepspeed", load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
            return
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
        self.optimizer.load_state_dict(load_data_only(ck / "optimizer.pt"))
