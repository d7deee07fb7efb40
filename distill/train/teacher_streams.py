"""A top-k split from several teachers' caches (recipe `teachers:`), read as one stream.

Each teacher's cache of a split is its own `TopkStream` (train/data.py); the teachers' caches hold the same
rows in the same shard layout (one recipe, one data), so one order serves them all. A batch's examples are
read from every teacher's stream and joined example by example: `train.teacher_mix: mixture`, the weighted
mixture over the union of their top-k (cache/ensemble.mix_topk_examples; the teachers must have scored the
same sequences, i.e. responses from the data); `route`, each row its own teacher's example, named by
task.teacher_field (cache/ensemble.row_teachers), so teacher-written responses can be routed.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from distill.cache import ensemble
from distill.cache.store import TopkExample
from distill.config import Recipe
from distill.errors import DistillError
from distill.train.data import InMemory, ShardOrder, TopkStream


class TeachersStream:
    """Several teachers' TopkStreams of one split behind the ExampleStream protocol: the first stream's
    layout and order, every stream told where each batch is, examples mixed or routed."""

    def __init__(self, streams: Sequence[TopkStream], weights: Sequence[float], route: Sequence[int] | None):
        first = streams[0]
        for s in streams[1:]:
            if (s.n, s.starts, s.counts) != (first.n, first.starts, first.counts):
                raise DistillError(f"{s.cache_dir} and {first.cache_dir}: the teachers' caches are sharded "
                                   "differently (generate.shard_size); run `distill generate` with one setting")
        self.streams, self.weights, self.route = list(streams), list(weights), route
        self.n = first.n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> TopkExample:
        return self._join([s[i] for s in self.streams], i)

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def _join(self, per_teacher: list[TopkExample], i: int) -> TopkExample:
        if self.route is not None:
            return per_teacher[self.route[i]]
        e = ensemble.mix_topk_examples(per_teacher, self.weights)
        return TopkExample(e.sequence.long(), e.positions.long(), e.topk_ids.long(), e.topk_logprobs.float(),
                           e.tail_mass.float())  # as the loss takes an example (data._widened)

    def examples(self, idx) -> list[TopkExample]:
        per = [s.examples(idx) for s in self.streams]
        return [self._join([p[j] for p in per], i) for j, i in enumerate(idx)]

    def count(self, idx) -> int:
        if self.route is None:  # one sequence per row whatever the teacher: the first stream's count
            return self.streams[0].count(idx)
        return sum(len(e.positions) for e in self.examples(idx))  # each row's own teacher's response

    # the layout ShardOrder reads (the first stream's; the others follow the same plan)
    @property
    def shares(self) -> int:
        return self.streams[0].shares

    @property
    def local(self) -> int:
        return self.streams[0].local

    def plan(self, epoch: int):
        return self.streams[0].plan(epoch)

    def order(self, batch_size: int, seed: int, rank: int, world: int) -> ShardOrder:
        for s in self.streams:
            s.order(batch_size, seed, rank, world)
        return ShardOrder(self, batch_size, seed)

    def want(self, epoch: int, pos: int) -> None:
        for s in self.streams:
            s.want(epoch, pos)

    def close(self) -> None:
        for s in self.streams:
            s.close()


def topk_split(cache_dir: Path, recipe: Recipe, split: str, examples: Sequence[dict], n: int, rows: int,
               in_memory: bool = False):
    """The first n examples of a cached top-k split: one teacher's (TopkStream), or the recipe's teachers'
    mixed or routed (TeachersStream); in memory (InMemory) for validation."""
    if not recipe.teachers:
        stream = TopkStream(cache_dir, split, len(examples), n, rows)
    else:
        names = [t.key for t in recipe.teachers]
        route = (ensemble.row_teachers(recipe.task, list(examples)[:n], names)
                 if recipe.train.teacher_mix == "route" else None)
        stream = TeachersStream([TopkStream(ensemble.teacher_dir(cache_dir, name), split, len(examples), n, rows)
                                 for name in names], ensemble.normalised_weights(recipe), route)
    return InMemory(stream) if in_memory else stream
