"""The loop's state in one record, and the data position that follows from it.

Everything about where a run stands derives from one counter, the micro-batches done: the optimizer
step (micro-batches // grad_accum), the epoch and the offset into its shuffled order (every epoch
has ceil(examples / batch) micro-batches, the last one short), and whether a step or an epoch ends.
The epoch's order is the (epoch+1)-th permutation drawn from one generator seeded with train.seed,
so a resumed run redraws exactly the orders an uninterrupted run drew. A streamed top-k cache
follows its own order with the same counter arithmetic (train/data.py: ShardOrder).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from distill.train.reporting import SwampWatch


@dataclass
class DataOrder:
    """Which examples micro-batch number mb holds."""

    n: int
    batch_size: int
    seed: int
    layout = None  # what else the order depends on (a checkpoint must match it); streams name theirs

    def __post_init__(self):
        self.per_epoch = math.ceil(self.n / self.batch_size)
        self._drawn = (-1, None, None)  # (epoch, generator after its draw, order)

    def epoch_order(self, epoch: int) -> list[int]:
        last, gen, order = self._drawn
        if epoch < last or gen is None:
            last, gen = -1, torch.Generator().manual_seed(self.seed)
        while last < epoch:
            order, last = torch.randperm(self.n, generator=gen).tolist(), last + 1
        self._drawn = (last, gen, order)
        return order

    def batch(self, mb: int) -> list[int]:
        epoch, i = divmod(mb, self.per_epoch)
        return self.epoch_order(epoch)[i * self.batch_size: (i + 1) * self.batch_size]

    def epoch_ends(self, done: int) -> bool:
        """Whether the done-th micro-batch was the last of an epoch."""
        return done % self.per_epoch == 0

    def epochs_done(self, done: int) -> float:
        """Epochs done after `done` micro-batches, counting the examples of a partial epoch."""
        epoch = (done - 1) // self.per_epoch
        within = done - epoch * self.per_epoch
        return epoch + min(self.n, within * self.batch_size) / self.n


@dataclass
class LoopState:
    """What changes as the loop runs; `record()` is what a checkpoint keeps."""

    micro_batch: int = 0  # micro-batches done
    history: list[dict] = field(default_factory=list)  # a record per optimizer step and per evaluation
    best: dict | None = None  # the best evaluation so far (its weights are the saved model)
    bad_evals: int = 0  # evaluations since the best one
    stopped: str | None = None  # why early stopping ended the run
    elapsed_s: float = 0.0  # training time before this process started
    eval_unsaved: bool = False  # an evaluation happened since the last checkpoint
    window: list[float] = field(default_factory=lambda: [0.0, 0.0])  # mean KD, CE of this step's micro-batches
    step_clock: list[float] = field(default_factory=lambda: [0.0, 0.0])  # wall, CPU seconds of this step so far
    swamp: SwampWatch | None = None
    resumed_from: str | None = None
    _clock: float = field(default_factory=time.time)

    def step(self, grad_accum: int) -> int:
        return self.micro_batch // grad_accum

    def elapsed(self) -> float:
        return time.time() - self._clock + self.elapsed_s

    def record(self) -> dict:
        return {"micro_batch": self.micro_batch, "history": self.history, "best": self.best,
                "bad_evals": self.bad_evals, "stopped": self.stopped, "elapsed_s": round(self.elapsed(), 1),
                "eval_unsaved": self.eval_unsaved, "window": list(self.window), "swamp": self.swamp.state()}

    def restore(self, rec: dict, source: str) -> None:
        swamp = rec.pop("swamp")
        for key, value in rec.items():
            setattr(self, key, value)
        self.swamp.restore(swamp)
        self.resumed_from, self._clock = source, time.time()
