"""Greedy decoding of many prompts at once in llama.cpp. A small model decoding one token at a time is bound by
reading its weights (and by the per-call overhead), not by arithmetic: one llama_decode over the next token
of N sequences reads the weights once for all N. So one context holds a KV sequence per slot, every step feeds
each slot's pending tokens (a new prompt's prefill, or the token it just chose) in one batch, and a slot whose
response has ended is cleared and takes the next prompt (continuous batching), so short responses do not leave
slots idle while long ones finish.

llama-cpp-python's `Llama` decodes one sequence (its context is opened with one sequence id), so this opens its
own context, with a sequence per slot, on the model a `Llama` has loaded (which keeps its quiet loading and
owns the weights).
"""
from __future__ import annotations

import os
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distill.errors import DistillError
from distill.models.llamacpp import import_llama_cpp


def default_threads() -> int:
    """The cores this process may run on: llama.cpp's own default (4) oversubscribes a 2-core machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class _Slot:
    """One sequence of the batch: the prompt it answers, the tokens still to feed and what it has written."""

    index: int
    pending: list[int]
    fed: int = 0  # positions the KV cache holds for this sequence
    out: list[int] = field(default_factory=list)


class BatchedLlama:
    """A GGUF model with a llama.cpp context of `parallel` sequences of `room` positions each (prompt and
    response), for greedy decoding of many prompts in one batch. `parallel` 1 decodes one prompt at a time."""

    def __init__(self, path: str | Path, room: int = 1024, parallel: int = 16, n_threads: int | None = None,
                 n_batch: int = 512):
        lc = import_llama_cpp()
        threads = n_threads or default_threads()
        # The Llama only loads the model: its own one-sequence context stays small and unused.
        self.llm = lc.Llama(model_path=str(path), n_ctx=256, n_batch=64, n_threads=threads, verbose=False)
        # The Llama's own settings (no flash attention: on CPU it attends in f16, and greedy outputs would drift
        # from the model's), with room for `parallel` sequences.
        params = type(self.llm.context_params).from_buffer_copy(self.llm.context_params)
        params.n_ctx, params.n_seq_max = room * parallel, parallel
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise DistillError(f"{path}: llama.cpp could not open a context of {parallel} sequences × {room} "
                               f"positions")
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self._free = weakref.finalize(self, _free, lc, self.ctx, self.batch)
        self.lc, self.parallel, self.n_batch = lc, parallel, n_batch
        self.room = lc.llama_n_ctx_seq(self.ctx)
        self.memory = lc.llama_get_memory(self.ctx)
        self.n_vocab = self.llm.n_vocab()

    def close(self) -> None:
        self._free()
        self.llm.close()

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, stop_ids, on_done=None) -> list[list[int]]:
        """The greedy continuation of every prompt, in the prompts' order: up to and including its first stop
        token, at most `max_new_tokens` tokens, and no further than the sequence's room. `on_done(i)` is
        called when prompt i's response is complete."""
        too_long = [len(p) for p in prompts if not 0 < len(p) < self.room]
        if too_long:
            raise DistillError(f"llama.cpp: a prompt of {too_long[0]} tokens leaves no room to answer in a sequence "
                               f"of {self.room} positions (raise n_ctx)")
        stops, queue = set(stop_ids), deque(range(len(prompts)))
        out: list[list[int] | None] = [None] * len(prompts)
        slots: list[_Slot | None] = [None] * self.parallel
        self.lc.llama_memory_clear(self.memory, True)
        while queue or any(slots):
            for s in range(self.parallel):
                if slots[s] is None and queue:
                    i = queue.popleft()
                    slots[s] = _Slot(i, list(prompts[i]))
            readers = self._step(slots)
            for s, tok in zip(readers, self._argmax(len(readers))):
                slot = slots[s]
                slot.out.append(int(tok))
                if tok in stops or len(slot.out) >= max_new_tokens or slot.fed >= self.room:
                    out[slot.index], slots[s] = slot.out, None
                    self.lc.llama_memory_seq_rm(self.memory, s, -1, -1)
                    if on_done:
                        on_done(slot.index)
                else:
                    slot.pending = [int(tok)]
        return out

    def _step(self, slots: list[_Slot | None]) -> list[int]:
        """One llama_decode of the slots' pending tokens, at most n_batch of them: the slots decoding a response
        first (one token each), then prefill, a long prompt over several steps. The slots whose pending tokens
        are all fed, in the order of their logits rows."""
        b, n, readers = self.batch, 0, []
        for s in sorted((s for s, sl in enumerate(slots) if sl is not None), key=lambda s: len(slots[s].pending)):
            slot = slots[s]
            take = min(len(slot.pending), self.n_batch - n)
            if take == 0:
                break
            done = take == len(slot.pending)
            for j, tok in enumerate(slot.pending[:take]):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = tok, slot.fed + j, 1, done and j == take - 1
                b.seq_id[n][0] = s
                n += 1
            slot.fed += take
            del slot.pending[:take]
            if done:
                readers.append(s)
        b.n_tokens = n
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise DistillError(f"llama.cpp: llama_decode returned {rc} for a batch of {n} tokens")
        return readers

    def _argmax(self, rows: int) -> np.ndarray:
        """The most likely token after each position whose logits the last decode kept, in batch order."""
        if rows == 0:
            return np.empty(0, dtype=np.int64)
        logits = np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(rows, self.n_vocab))
        return logits.argmax(axis=1)


def _free(lc, ctx, batch) -> None:
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
