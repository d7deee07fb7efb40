"""The examples a task trains on and the order micro-batches take them in: in memory, or streamed
from a top-k cache shard by shard.

Both kinds answer the same calls, the `ExampleStream` protocol: `len`, `[i]`, `examples(idx)` (a batch's
examples), `count(idx)` (its target tokens) and `order(batch_size, seed, rank, world)` (the DataOrder the
loop follows).
Soft-label caches and encoded data are small and stay in memory (`InMemory`, the order a seeded
permutation per epoch, state.DataOrder).

A top-k cache is streamed (`TopkStream`): memory holds a few windows of decoded shards, whatever
the cache's size. The order of an epoch is a pure function of train.seed, the epoch, the manifest's
shard sizes and the number of shares P (one per process):

* the split's shards are permuted (seeded by seed and epoch) and their examples laid end to end;
* that sequence is cut into P contiguous shares of equal size (the first n mod P one longer): a
  share touches about 1/P of the shards, one at each end possibly shared with a neighbour;
* each share is cut into windows of WINDOW_SHARDS consecutive pieces of shards, and each window's
  examples are permuted (seeded by seed, epoch, P, share and window): the bounded shuffle buffer;
* micro-batch i takes positions [i*b, (i+1)*b) of every share (b = batch_size / P), interleaved so
  that the loop's share of it, batch[rank::world], is exactly its own share's examples.

Every epoch holds each example once, and has ceil(n / batch_size) micro-batches, the last one short,
as in memory. A process reads only its own shares' shards: the next window is decoded in a
background thread while the current one trains, each shard's SHA-256 checked on the bytes it then
decodes. Resuming from the micro-batch counter recomputes the same order and reads from there. The
order depends on P, so it is part of what a checkpoint must match (`layout`).

The stream's examples hold each target's k (id, log-prob) pairs in the order the codec stores them,
not in rank order (`cache.load_split` ranks them): the same pairs, which is all the losses use
(losses.sparse_kd treats the k entries as a set), without a sort per row.
"""
from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from distill.cache import store as cache_mod
from distill.cache.store import TopkExample
from distill.errors import DistillError, UsageError
from distill.train.distributed import all_reduce_sum
from distill.train.state import DataOrder

WINDOW_SHARDS = 2  # pieces of shards shuffled together: the in-memory shuffle buffer
SHARES_ENV = "DISTILL_TEST_DATA_SHARES"  # tests: one process draws the order of N processes (reads all shares)


@runtime_checkable
class ExampleStream(Protocol):
    """A task's training examples with the order they are trained in: `InMemory` or `TopkStream`."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int, /) -> TopkExample:
        """Example i, by random access (a stream decodes its shard)."""

    def examples(self, idx: Sequence[int], /) -> list[TopkExample]:
        """A batch's examples, in the order of idx."""

    def count(self, idx: Sequence[int], /) -> int:
        """The target tokens of examples idx (summed over the processes when each reads its own share)."""

    def order(self, batch_size: int, seed: int, rank: int, world: int, /) -> DataOrder:
        """The order the loop follows over the examples (see the module's docstring)."""


class InMemory(list):
    """Examples held in memory (TopkExample with long ids), behind the stream's interface. With a
    shard size (generation data: generate.shard_size) they follow the order a cache of theirs would
    be streamed in, so a run without a cache (alpha = 0) trains on the same batches as one with it."""

    def __init__(self, items=(), shard_size: int | None = None):
        super().__init__(items)
        self.shards = None
        if shard_size:
            starts = list(range(0, len(self), shard_size))
            self.shards = ShardLayout(len(self), starts, [min(shard_size, len(self) - a) for a in starts])

    def examples(self, idx) -> list:
        return [self[i] for i in idx]

    def count(self, idx) -> int:
        return sum(len(self[i].positions) for i in idx)

    def order(self, batch_size: int, seed: int, rank: int, world: int) -> DataOrder:
        if self.shards is None:
            return DataOrder(len(self), batch_size, seed)
        return self.shards.order(batch_size, seed, rank, world)


def data_order(train: ExampleStream | Sequence, batch_size: int, seed: int, rank: int, world: int,
               group_by_length: bool = False) -> DataOrder:
    """The order the loop follows over a task's training examples: a stream's own, else a seeded permutation
    per epoch (or batches grouped by length) over a plain list."""
    if isinstance(train, ExampleStream):
        if group_by_length:
            raise UsageError("train.group_by_length: only classification tasks group their batches by length "
                             "(generation data follows its cache's shard order); remove it from the recipe")
        return train.order(batch_size, seed, rank, world)
    if group_by_length:
        return LengthGroupedOrder(len(train), batch_size, seed, [len(e.prompt) for e in train])
    return DataOrder(len(train), batch_size, seed)


class LengthGroupedOrder(DataOrder):
    """A seeded permutation per epoch, cut into groups of GROUP_BATCHES batches, each group sorted by
    prompt length and the batches then shuffled: a batch holds texts of about one length, so little of
    its forward pass is padding (a random batch of short texts is padded to its longest), while
    every epoch still holds each example once and the batches come in random order. The short last
    batch stays last, as in DataOrder."""

    GROUP_BATCHES = 64

    def __init__(self, n: int, batch_size: int, seed: int, lengths: list[int]):
        super().__init__(n, batch_size, seed)
        self.lengths = np.asarray(lengths)
        self.layout = f"grouped by length, {self.GROUP_BATCHES} batches a group"
        self._grouped = (-1, None)

    def epoch_order(self, epoch: int) -> list[int]:
        if self._grouped[0] != epoch:
            perm = np.asarray(super().epoch_order(epoch))
            g = self.GROUP_BATCHES * self.batch_size
            seq = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                  for c in np.split(perm, range(g, len(perm), g))]) if len(perm) else perm
            full = len(seq) // self.batch_size
            batches = seq[:full * self.batch_size].reshape(full, self.batch_size)
            batches = batches[np.random.default_rng([self.seed, epoch]).permutation(full)]
            self._grouped = (epoch, batches.ravel().tolist() + seq[full * self.batch_size:].tolist())
        return self._grouped[1]


@dataclass(frozen=True)
class Window:
    """Pieces of shards decoded together; `ids` their examples in training order."""

    shards: tuple[int, ...]  # indices into the stream's shard table
    ids: np.ndarray


@dataclass(frozen=True)
class EpochPlan:
    windows: list[list[Window]]  # per share
    window_ends: list[np.ndarray]  # per share: where each window ends in the share's sequence
    shard_begin: np.ndarray  # per shard: where its examples begin in the epoch's permuted sequence
    share_lo: np.ndarray  # per share: where it begins in that sequence

    def share_sequence(self, r: int) -> np.ndarray:
        ws = self.windows[r]
        return np.concatenate([w.ids for w in ws]) if ws else np.zeros(0, dtype=np.int64)


def plan_epoch(counts, starts, n: int, seed: int, epoch: int, shares: int,
               window_shards: int = WINDOW_SHARDS) -> EpochPlan:
    """Every share's windows for one epoch (see the module's docstring); counts/starts per shard."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(counts))
    c = np.asarray(counts, dtype=np.int64)[perm]
    ends = np.cumsum(c)
    begins = ends - c
    q, rem = divmod(n, shares)
    lo = np.array([r * q + min(r, rem) for r in range(shares + 1)])
    windows = []
    for r in range(shares):
        pieces, j = [], int(np.searchsorted(ends, lo[r], side="right"))
        while j < len(perm) and begins[j] < lo[r + 1]:
            a, b = max(lo[r], begins[j]), min(lo[r + 1], ends[j])
            s = int(perm[j])
            pieces.append((s, starts[s] + int(a - begins[j]), starts[s] + int(b - begins[j])))
            j += 1
        share = []
        for w in range(0, len(pieces), window_shards):
            group = pieces[w:w + window_shards]
            ids = np.concatenate([np.arange(a, b, dtype=np.int64) for _, a, b in group])
            rng = np.random.default_rng([seed, epoch, shares, r, w // window_shards])
            share.append(Window(tuple(s for s, _, _ in group), rng.permutation(ids)))
        windows.append(share)
    shard_begin = np.empty(len(perm), dtype=np.int64)
    shard_begin[perm] = begins
    ends = [np.cumsum([len(w.ids) for w in share], dtype=np.int64) for share in windows]
    return EpochPlan(windows, ends, shard_begin, lo[:-1])


def interleave(seqs: list[np.ndarray], local: int, per_epoch: int) -> np.ndarray:
    """One epoch's order: micro-batch i holds positions [i*local, (i+1)*local) of every share, the
    shares' examples alternating (so batch[r::P] is share r's)."""
    grid = np.full((len(seqs), per_epoch * local), -1, dtype=np.int64)
    for r, s in enumerate(seqs):
        grid[r, :len(s)] = s
    flat = grid.reshape(len(seqs), per_epoch, local).transpose(1, 2, 0).ravel()
    return flat[flat >= 0]


class ShardOrder(DataOrder):
    """DataOrder over a ShardLayout: the shard-and-window order; each batch tells the layout where it is."""

    def __init__(self, layout: ShardLayout, batch_size: int, seed: int):
        self.stream = layout
        super().__init__(layout.n, batch_size, seed)
        self.layout = f"stream: {layout.shares} share(s), windows of {WINDOW_SHARDS} shards"

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._drawn[0] != epoch:
            plan = self.stream.plan(epoch)
            seqs = [plan.share_sequence(r) for r in range(self.stream.shares)]
            self._drawn = (epoch, None, interleave(seqs, self.stream.local, self.per_epoch))
        return self._drawn[2]

    def batch(self, mb: int) -> list[int]:
        epoch, i = divmod(mb, self.per_epoch)
        ids = self.epoch_order(epoch)[i * self.batch_size:(i + 1) * self.batch_size].tolist()
        self.stream.want(epoch, i * self.stream.local)
        return ids


class ShardLayout:
    """The first n examples of a split in shards (starts, counts): the plans of its epochs."""

    def __init__(self, n: int, starts: list[int], counts: list[int]):
        self.n, self.starts, self.counts = n, starts, counts
        self.shares, self.mine, self.rank, self.world, self.local, self.seed = 1, [0], 0, 1, 1, 0
        self._plans: dict[int, EpochPlan] = {}

    def order(self, batch_size: int, seed: int, rank: int, world: int) -> ShardOrder:
        shares = int(os.environ.get(SHARES_ENV) or world)
        if shares % world or batch_size % shares:
            raise UsageError(f"{SHARES_ENV}={shares}: expected a multiple of the {world} processes that divides "
                             f"train.batch_size={batch_size}")
        self.rank, self.world, self.shares, self.seed = rank, world, shares, seed
        self.mine, self.local = list(range(rank, shares, world)), batch_size // shares
        self._plans = {}
        return ShardOrder(self, batch_size, seed)

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if epoch - 1 <= e <= epoch + 1}
            self._plans[epoch] = plan_epoch(self.counts, self.starts, self.n, self.seed, epoch, self.shares)
        return self._plans[epoch]

    def want(self, epoch: int, pos: int) -> None:
        """Where the next batch reads (held examples: nothing to do)."""


class TopkStream(ShardLayout):
    """The first n examples of a cached top-k split, read shard by shard (see the module's docstring).

    Before `order()` it is random access (`[i]` decodes the example's shard; the last two are kept).
    """

    def __init__(self, cache_dir, split: str, split_len: int, n: int, vocab_rows: int):
        self.cache_dir, self.split, self.vocab_rows = Path(cache_dir), split, vocab_rows
        m = cache_mod.read_manifest(self.cache_dir)
        shards = cache_mod.split_shards(self.cache_dir, m, split)
        covered = sum(s["count"] for s in shards)
        if covered != split_len:
            raise DistillError(f"{cache_dir}: split '{split}' has {covered} examples, the data has {split_len}")
        if n > covered:
            raise DistillError(f"{cache_dir}: split '{split}' has no entry for example {covered}")
        self.kind, self.shards = m.kind, [s for s in shards if s["start"] < n]
        super().__init__(n, [s["start"] for s in self.shards], [min(s["count"], n - s["start"]) for s in self.shards])
        self.decoded: list[int] = []  # shard numbers decoded, in order (tests: what a process read)
        self._held: OrderedDict = OrderedDict()  # (epoch, share, window) -> {example: TopkExample}
        self._pending: dict = {}  # (epoch, share, window) -> Future of the same
        self._wanted = None  # (epoch, position) the last batch asked for
        self._recent: OrderedDict = OrderedDict()  # random access: shard index -> decoded tensors
        self._pool = None

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def __getitem__(self, i: int) -> TopkExample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        held = next((w[i] for w in self._held.values() if i in w), None)
        if held is not None:
            return _widened(held)
        s = bisect.bisect_right(self.starts, i) - 1
        if s not in self._recent:
            self._recent[s] = self._decode(s)
            while len(self._recent) > 2:
                self._recent.popitem(last=False)
        return _widened(cache_mod.example_topk(self._recent[s], i - self.starts[s]))

    # -- the order's plan -------------------------------------------------------------------------

    def _owner(self, epoch: int, i: int) -> int:
        """The share example i belongs to in this epoch."""
        plan, s = self.plan(epoch), bisect.bisect_right(self.starts, i) - 1
        return int(np.searchsorted(plan.share_lo, plan.shard_begin[s] + i - self.starts[s], side="right")) - 1

    def want(self, epoch: int, pos: int) -> None:
        """The next batch reads positions [pos, pos + local) of this process's shares (decoded on use)."""
        self._wanted = (epoch, pos)

    # -- reading -----------------------------------------------------------------------------------

    def examples(self, idx) -> list[TopkExample]:
        """A batch's examples: from the held windows in streaming order, else by random access. The
        loop's zero-weight stand-in for an empty share (one example of another share) gets one held here."""
        self._ensure()
        out = []
        for i in idx:
            e = next((w[i] for w in self._held.values() if i in w), None)
            stand_in = len(idx) == 1 and self._held and self._wanted
            if e is None and stand_in and self._owner(self._wanted[0], i) not in self.mine:
                e = next(iter(next(iter(self._held.values())).values()))
            out.append(_widened(e) if e is not None else self[i])
        return out

    def count(self, idx) -> int:
        """Target tokens of batch idx. Streaming over several processes, each counts its own share and
        the counts are summed (every rank calls this for every batch); a rank that cannot read its
        share makes every rank stop instead of waiting for it."""
        if self._wanted is None or self.world == 1:
            return sum(len(e.positions) for e in self.examples(idx))
        error, local = None, 0
        try:
            local = sum(len(e.positions) for e in self.examples(idx[self.rank::self.world]))
        except (DistillError, UsageError) as e:
            error = e
        total = all_reduce_sum(torch.tensor([float(local), float(error is not None)], dtype=torch.float64), self.world)
        if error is not None:
            raise error
        if total[1] > 0:
            raise DistillError(f"{self.cache_dir}: another process could not read its share of the cache "
                               "(see its error)")
        return int(total[0].item())

    def _ensure(self) -> None:
        """Hold the windows the wanted batch needs (keep the last ones when it needs none), and start
        decoding the next window of each share."""
        if self._wanted is None:
            return
        epoch, pos = self._wanted
        need = [(epoch, r, w) for r in self.mine for w in self._overlapping(epoch, r, pos, pos + self.local)]
        if need:
            for key in [k for k in self._held if k not in need]:
                del self._held[key]
            for key in need:
                if key not in self._held:
                    future = self._pending.pop(key, None)
                    self._held[key] = future.result() if future else self._build(self._window(key))
        ahead = [self._after(epoch, r, [w for e, rr, w in need if rr == r]) for r in self.mine]
        for key in [k for k in self._pending if k not in ahead]:
            del self._pending[key]  # a jump (resume): that decode is not needed
        for key in ahead:
            if key is not None and key not in self._held and key not in self._pending:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="cache-prefetch")
                self._pending[key] = self._pool.submit(self._build, self._window(key))

    def _window(self, key) -> Window:
        epoch, r, w = key
        return self.plan(epoch).windows[r][w]

    def _overlapping(self, epoch: int, r: int, a: int, b: int) -> list[int]:
        plan = self.plan(epoch)
        ws, ends = plan.windows[r], plan.window_ends[r]
        out, w = [], int(np.searchsorted(ends, a, side="right"))
        while w < len(ws) and (ends[w - 1] if w else 0) < b:
            out.append(w)
            w += 1
        return out

    def _after(self, epoch: int, r: int, used: list[int]):
        """The window of share r to decode next."""
        if used and used[-1] + 1 < len(self.plan(epoch).windows[r]):
            return epoch, r, used[-1] + 1
        return (epoch + 1, r, 0) if self.plan(epoch + 1).windows[r] else None

    def _build(self, window: Window) -> dict[int, TopkExample]:
        """A window's examples (int32/float32 views into its decoded shards)."""
        out = {}
        for s in window.shards:
            data, a = self._decode(s), self.starts[s]
            ids = window.ids[(window.ids >= a) & (window.ids < a + self.counts[s])]
            seq, so, po = data["input_ids"], data["seq_offsets"].tolist(), data["pos_offsets"].tolist()
            pos, top, lp, tail = data["positions"], data["topk_ids"], data["topk_logprobs"], data["tail_mass"]
            for i in ids.tolist():  # cache.example_topk's slices, the offsets read once a shard
                j = i - a
                p0, p1 = po[j], po[j + 1]
                out[i] = TopkExample(seq[so[j]:so[j + 1]], pos[p0:p1], top[p0:p1], lp[p0:p1], tail[p0:p1])
        return out

    def _decode(self, s: int) -> dict[str, torch.Tensor]:
        """Shard s, checksum verified, its examples and token ids checked; each position's top-k pairs
        in the codec's stored order (the loss takes them as a set: no per-row sort to rank order)."""
        entry = self.shards[s]
        data = cache_mod.read_verified_shard(self.cache_dir, entry, self.kind, ranked=False)
        self.decoded.append(entry["number"])
        if not torch.equal(data["index"], torch.arange(entry["start"], entry["start"] + entry["count"])):
            raise DistillError(f"{self.cache_dir / entry['file']}: holds other examples than the manifest says "
                               f"({entry['start']}..{entry['start'] + entry['count'] - 1})")
        ids = data["topk_ids"].numpy()  # numpy: a torch reduction may wait for its intra-op threads
        if ids.size and int(ids.max()) >= self.vocab_rows:
            raise UsageError(f"{self.cache_dir}: the teacher's top-k holds token id {int(ids.max())}, beyond the "
                             f"student's {self.vocab_rows} output rows; the student cannot be trained on this cache")
        return data

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _widened(e: TopkExample) -> TopkExample:
    """An example as the loss takes it: long ids and positions, float numbers."""
    return TopkExample(e.sequence.long(), e.positions.long(), e.topk_ids.long(), e.topk_logprobs.float(),
                       e.tail_mass.float())
