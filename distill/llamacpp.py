"""Running llama.cpp (llama-cpp-python): a GGUF loaded in this process to score labels (eval, bench),
or jobs in a child process (export: quantizing, and logits to verify a written file).

llama.cpp's OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, `passive_openmp`). Its threads
otherwise spin while waiting for each other, and on a machine where other work (or torch's own thread
pool, in this process) holds the cores, a 40-token eval of SmolLM2-135M took 9-18 s instead of 0.6 s
(measured on 2 cores). libgomp reads the setting once, when it loads, and llama.cpp shares the one
torch loads (both link libgomp.so.1): so a process that imports torch must have it before that import
(with OMP_DISPLAY_ENV=VERBOSE, setting it after `import torch` leaves GOMP_SPINCOUNT at 300000; before,
0). The CLI applies it first thing for the commands that run llama.cpp (eval of a .gguf, bench); export's
jobs run in a fresh interpreter that gets it in its environment, which also keeps llama.cpp's native
state out of the caller's process.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import DistillError, UsageError


def have_llama_cpp() -> bool:
    """Whether llama-cpp-python is installed, without loading it."""
    import importlib.util
    import sys

    if "llama_cpp" in sys.modules:
        return sys.modules["llama_cpp"] is not None
    return importlib.util.find_spec("llama_cpp") is not None


def require_llama_cpp(why: str) -> None:
    if not have_llama_cpp():
        raise DistillError(f"{why} needs llama.cpp's Python binding: pip install llama-cpp-python "
                           f"(or pip install 'distill[llama]'); it builds from source in several minutes")


def passive_openmp(env=None) -> None:
    """Passive OpenMP waits in this process (effective only before torch or llama_cpp is imported) or,
    given a child's `env`, in that child. An explicit OMP_WAIT_POLICY is left alone."""
    (os.environ if env is None else env).setdefault("OMP_WAIT_POLICY", "PASSIVE")


def import_llama_cpp():
    """The llama_cpp module, with passive OpenMP waits when nothing has loaded libgomp yet."""
    passive_openmp()
    import llama_cpp

    return llama_cpp


def load_gguf(path, n_ctx: int, **kwargs):
    """A llama.cpp model on the GGUF `path` that keeps the logits of every evaluated position."""
    return import_llama_cpp().Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, verbose=False, **kwargs)


# ---------------------------------------------------------------- in this process: label scoring

def _log_softmax_at(row: np.ndarray, tok: int) -> float:
    m = row.max()
    return row[tok] - (m + np.log(np.exp(row - m).sum()))


class GGUFScorer:
    """Scores labels with llama.cpp on a GGUF file: the prompt is evaluated once, then each label's
    answer is evaluated after it (the KV cache is cut back to the prompt between labels)."""

    kind = "llama.cpp"

    def __init__(self, path: str, tokenizer_dir: str | None = None, n_ctx: int = 1024, n_threads: int | None = None):
        from .models import load_tokenizer

        require_llama_cpp(f"{path}: scoring a GGUF file")
        gguf = Path(path)
        if not gguf.is_file():
            raise UsageError(f"{gguf}: no such file")
        self.path = str(gguf)
        self.llm = load_gguf(gguf, n_ctx, seed=0, n_threads=n_threads)
        tdir = tokenizer_dir or (str(gguf.parent) if (gguf.parent / "tokenizer_config.json").is_file() else None)
        if tdir:
            self.tokenizer = load_tokenizer(tdir)
        else:  # the tokenizer embedded in the GGUF, through transformers
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        meta = self.llm.metadata
        arch = meta.get("general.architecture", "llama")
        self.layers = int(meta.get(f"{arch}.block_count", 0))
        self.parameters = None
        self.n_ctx = n_ctx

    def _score_one(self, prompt, label_ids):
        llm = self.llm
        if len(prompt) + max(map(len, label_ids)) > self.n_ctx:
            raise UsageError(f"{self.path}: a prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        llm.reset()
        llm.eval(prompt)
        P = len(prompt)
        last = np.array(llm.scores[P - 1], dtype=np.float64)
        out = []
        for lab in label_ids:
            llm.n_tokens = P
            if len(lab) > 1:
                llm.eval(lab[:-1])
            rows = [last] + [np.array(llm.scores[P + t], dtype=np.float64) for t in range(len(lab) - 1)]
            total = 0.0
            for row, tok in zip(rows, lab):
                total += _log_softmax_at(row, tok)
            out.append(total)
        return out

    def scores(self, encoded, label_ids, batch_size=16, desc=None):
        import torch
        from tqdm import tqdm

        bar = tqdm(total=len(encoded), desc=desc, unit="ex", disable=desc is None)
        rows = []
        for e in encoded:
            rows.append(self._score_one(e.prompt, label_ids))
            bar.update(1)
        bar.close()
        return torch.tensor(rows, dtype=torch.float32).reshape(len(encoded), len(label_ids))


# ---------------------------------------------------------------- in a child process: export's jobs

def quantize(src: Path, dst: Path, ftype_name: str, embedding_type: str | None = None, keep: list[str] = ()) -> None:
    """Quantize the GGUF `src` into `dst` with llama.cpp's quantizer (see export.quantize_k)."""
    require_llama_cpp("q4_k_m export")
    run_job({"job": "quantize", "src": str(src), "dst": str(dst), "ftype": ftype_name,
             "embedding_type": embedding_type, "keep_iq4_nl": list(keep)})


def logits(path: Path, ids_list) -> list[np.ndarray]:
    """llama.cpp's own logits at every position of each token-id sequence (the runtime users run)."""
    require_llama_cpp("verifying with llama.cpp")
    result = run_job({"job": "logits", "path": str(path), "ids_list": [list(map(int, x)) for x in ids_list]})
    return [result[f"p{i}"] for i in range(len(ids_list))]


def run_job(request: dict) -> dict:
    """Run one llama.cpp job (see _job) in a child process; its result dict, or DistillError.

    The child stops with this process: on any exception here, KeyboardInterrupt included (Ctrl-C, or
    SIGTERM through the CLI), subprocess.run kills it and waits for it; its stderr is captured, so the
    traceback the same Ctrl-C gives the child is never shown.
    """
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="distill-llama.") as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps({**request, "result": str(Path(tmp) / "result.npz")}))
        env = dict(os.environ)
        passive_openmp(env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                           env.get("PYTHONPATH")]))
        code = f"from distill.llamacpp import _job; _job({str(req)!r})"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise DistillError(f"llama.cpp {request['job']} failed: {tail}")
        with np.load(Path(tmp) / "result.npz") as z:
            return {k: z[k] for k in z.files}


def _job(request_path: str) -> None:
    """Child-process side of run_job: quantize a file or compute logits, results into an .npz."""
    from .fileio import pause_point

    request = json.loads(Path(request_path).read_text())
    pause_point("llama_job")
    if request["job"] == "quantize":
        _quantize_here(Path(request["src"]), Path(request["dst"]), request["ftype"], request.get("embedding_type"),
                       request.get("keep_iq4_nl", []))
        np.savez(request["result"], ok=np.array(1))
    elif request["job"] == "logits":
        out = _logits_here(Path(request["path"]), request["ids_list"])
        np.savez(request["result"], **{f"p{i}": x for i, x in enumerate(out)})
    else:
        raise ValueError(f"unknown job {request['job']}")


def _quantize_here(src: Path, dst: Path, ftype_name: str, embedding_type: str | None = None,
                   keep_iq4_nl: list[str] = ()) -> None:
    import ctypes
    import re

    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    if embedding_type:
        params.token_embedding_type = getattr(llama_cpp, f"GGML_TYPE_{embedding_type}")
    params.nthread = os.cpu_count() or 1
    if keep_iq4_nl:  # one anchored pattern; the array ends with a NULL pattern
        pattern = ("^(" + "|".join(re.escape(n) for n in keep_iq4_nl) + ")$").encode()
        overrides = (llama_cpp.llama_model_tensor_override * 2)()
        overrides[0].pattern, overrides[0].type = pattern, llama_cpp.GGML_TYPE_IQ4_NL
        overrides[1].pattern = None
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc} for {src} -> {ftype_name}")


def _logits_here(path: Path, ids_list) -> list[np.ndarray]:
    longest = max(len(ids) for ids in ids_list)
    n_ctx = -(-longest // 64) * 64
    llm = load_gguf(path, n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=os.cpu_count())
    try:
        out = []
        for ids in ids_list:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        return out
    finally:
        llm.close()
