"""Teacher backends: each turns token ids into label log-probabilities or top-k distributions.

All backends share one interface, `TeacherBackend`, so the cache does not care where numbers came from.
Backends: `transformers` (hf.py), `vllm` (vllm_engine.py, the offline engine), `server` (remote.py, one
or more running vLLM OpenAI-compatible servers, e.g. from `distill serve-teacher`, which launch.py starts).
"""
from __future__ import annotations

import importlib.util
import logging
import typing
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from distill.config import Backend, TeacherSpec
from distill.errors import UsageError

if TYPE_CHECKING:  # types only: picking a backend imports neither torch nor a backend
    import torch

    from distill.teacher.common import Generated, Sampling

log = logging.getLogger(__name__)


@runtime_checkable
class TeacherBackend(Protocol):
    """What `distill generate` and on-policy training ask of a teacher, whichever backend serves it."""

    name: str  # the backend's name, as `pick_backend` returns it

    def label_logprobs(self, prompts: list[list[int]], label_ids: list[list[int]], /) -> torch.Tensor:
        """[B, n_labels]: log p(full label answer | prompt). A label-token model's answers are one token
        each, read at the position after the prompt: one prefill per text, in every backend."""

    def topk(self, seqs: list[list[int]], positions: list[list[int]], k: int, /
             ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per sequence (ids [n, k], logprobs [n, k], tail_mass [n]): for each target position t, the
        distribution that predicted token t (from tokens < t)."""

    def generate_topk(self, prompts: list[list[int]], k: int, sampling: Sampling, seeds: list[int], /
                      ) -> list[Generated]:
        """The teacher writes a response to each prompt; its top k at each response token come from the
        same pass."""

    def close(self) -> None:
        """Free the model or the connections (a backend that started a server stops it)."""

BACKENDS: tuple[str, ...] = typing.get_args(Backend)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pick_backend(name: str | None, spec: TeacherSpec) -> str:
    """`auto`: a server when a URL is given; the vLLM engine on a CUDA GPU; transformers on CPU, where the
    plain forward of the packed transformers scorer measured faster than vLLM's CPU engine.
    """
    name = name or spec.backend or "auto"
    if name not in BACKENDS:
        raise UsageError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        if spec.url or spec.urls:
            return "server"
        return "vllm" if vllm_available() and cuda_available() else "transformers"
    return name


def make_backend(name: str, spec: TeacherSpec, model_path: str, k: int, tok=None,
                 vocab_rows: int | None = None) -> TeacherBackend:
    """A backend object. `tok` (the teacher's tokenizer) bounds the token ids a top-k row may hold
    (padded embedding rows are left out); the server backend also checks the server against it."""
    vocab_limit = len(tok) if tok is not None else None
    if name == "transformers":
        from distill.teacher.hf import HFTeacher

        return HFTeacher(model_path, dtype=spec.dtype, vocab_limit=vocab_limit)
    if name == "vllm":
        if not vllm_available():
            raise UsageError("backend vllm: vLLM is not installed (pip install 'distill[cpu]' or 'distill[gpu]')")
        if spec.data_parallel_size > 1:
            return _local_server(spec, model_path, k, tok, vocab_rows)
        from distill.teacher.vllm_engine import VLLMTeacher

        return VLLMTeacher(model_path, spec, k, vocab_limit=vocab_limit, vocab_rows=vocab_rows)
    if name == "server":
        if tok is None:
            from distill.models.loading import load_tokenizer

            tok = load_tokenizer(model_path)
        from distill.teacher.remote import ServerTeacher

        return ServerTeacher(spec, tok, k, vocab_rows=vocab_rows, model_path=model_path)
    raise UsageError(f"unknown backend {name!r}")


def _local_server(spec: TeacherSpec, model_path: str, k: int, tok, vocab_rows):
    """vLLM's offline engine cannot run data parallel in one process: serve the teacher locally with
    --data-parallel-size and use the server backend on it (stopped by `close()`)."""
    import dataclasses

    from distill.teacher.launch import ServedTeacher
    from distill.teacher.remote import ServerTeacher

    log.info("data_parallel_size=%d: vLLM's offline engine runs one replica per process; starting a local "
             "vLLM server with --data-parallel-size %d instead", spec.data_parallel_size, spec.data_parallel_size)
    pad = max(0, (vocab_rows or 0) - len(tok))
    srv = ServedTeacher(spec, model_path=model_path, max_logprobs=max(spec.max_logprobs, k + pad)).start()
    try:
        client = ServerTeacher(dataclasses.replace(spec, url=srv.url, urls=None, served_model_name=spec.name),
                               tok, k, vocab_rows=vocab_rows)
    except BaseException:
        srv.stop()
        raise
    client.name = "vllm"
    inner_close = client.close

    def close():
        try:
            inner_close()
        finally:
            srv.stop()

    client.close = close
    return client
