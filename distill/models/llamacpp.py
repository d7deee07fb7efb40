"""Running llama.cpp (llama-cpp-python): a GGUF loaded in this process to score labels (eval, bench),
or jobs in a child process (export: quantizing, and logits to verify a written file).

llama.cpp's OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, `passive_openmp`). Its threads otherwise
spin while waiting for each other, and on a machine where other work (or torch's own thread pool, in this
process) holds the cores, an eval slows down many times over (docs/benchmarks.md). libgomp reads the setting
once, when it loads, and llama.cpp shares the one torch loads (both link libgomp.so.1): so a process that
imports torch must have it before that import (with OMP_DISPLAY_ENV=VERBOSE, setting it after `import torch`
leaves GOMP_SPINCOUNT at 300000; before, 0). The CLI applies it first thing for the commands that run
llama.cpp (eval of a .gguf, bench); export's jobs run in a fresh interpreter that gets it in its environment,
which also keeps llama.cpp's native state out of the caller's process.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from distill.errors import DistillError, UsageError


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


def load_gguf(path, n_ctx: int, logits_all: bool = True, **kwargs):
    """A llama.cpp model on the GGUF `path`, by default keeping the logits of every evaluated position."""
    return import_llama_cpp().Llama(model_path=str(path), logits_all=logits_all, n_ctx=n_ctx, verbose=False,
                                    **kwargs)


# ---------------------------------------------------------------- in this process: label scoring

def _shared(a, b) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def feed_order(label_ids) -> list[int]:
    """Label indices in depth-first order of the prefix tree of their fed tokens (all but the last,
    which is only read), so every shared prefix is fed once for all the labels under it. A path comes
    before its own prefixes (the sort key ends in infinity): a branch is fed in one batch, as far as it
    goes, and a label whose path is a prefix of it is read without feeding anything."""
    return sorted(range(len(label_ids)), key=lambda j: (*label_ids[j][:-1], float("inf")))


class KVSequence:
    """One llama.cpp sequence whose KV cache is cut and extended by hand, with logits computed only
    where they are read. (llama-cpp-python's Llama.eval with logits_all runs the output layer at every
    position; for a small model's prompt that is most of the work.)"""

    def __init__(self, llm):
        import weakref

        lc = import_llama_cpp()
        self.lc, self.ctx, self.n_batch, self.n_vocab = lc, llm.ctx, llm.n_batch, llm.n_vocab()
        self.memory = lc.llama_get_memory(llm.ctx)
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)
        weakref.finalize(self, lc.llama_batch_free, self.batch)
        self.tokens: list[int] = []  # what the cache holds, position by position

    def cut(self, n: int) -> None:
        """Forget every position from `n` on."""
        self.lc.llama_memory_seq_rm(self.memory, 0, n, -1)
        del self.tokens[n:]

    def feed(self, tokens, every: bool) -> list[np.ndarray]:
        """Append `tokens`; the float32 logits after each of them (every) or after the last one only."""
        rows = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[start: start + self.n_batch])
            last = start + len(chunk) == len(tokens)
            wanted = list(range(len(chunk))) if every else [len(chunk) - 1] if last else []
            self._decode(chunk, set(wanted))
            rows += [np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
                     for i in wanted]
        return rows

    def _decode(self, chunk: list[int], wanted: set[int]) -> None:
        b, n_past = self.batch, len(self.tokens)
        b.n_tokens = len(chunk)
        for i, tok in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, n_past + i, 1, i in wanted
            b.seq_id[i][0] = 0
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise DistillError(f"llama.cpp: llama_decode returned {rc} at position {n_past}")
        self.tokens += chunk


def _row_logsumexp(row: np.ndarray) -> tuple[np.ndarray, float]:
    m = float(row.max())
    return row, m + float(np.log(np.exp(row.astype(np.float64) - m).sum()))


class GGUFScorer:
    """Scores labels with llama.cpp on a GGUF file. Each prompt is fed after the longest prefix it shares
    with what the KV cache holds (the system prompt, left by the text before); the labels' answers then
    follow as a prefix tree walked depth-first, the cache cut back to where the next branch leaves the
    path fed so far, so a shared answer prefix is fed once. Logits are computed only where read: a
    label-token model's answers are single tokens, so it gets one row per text, after the prompt."""

    kind = "llama.cpp"

    def __init__(self, path: str, tokenizer_dir: str | None = None, n_ctx: int = 1024, n_threads: int | None = None):
        from distill.models.loading import load_tokenizer

        require_llama_cpp(f"{path}: scoring a GGUF file")
        gguf = Path(path)
        if not gguf.is_file():
            raise UsageError(f"{gguf}: no such file")
        self.path = str(gguf)
        self.llm = import_llama_cpp().Llama(model_path=str(gguf), n_ctx=n_ctx, seed=0, n_threads=n_threads,
                                            verbose=False)
        self.seq = KVSequence(self.llm)
        tdir = tokenizer_dir or (str(gguf.parent) if (gguf.parent / "tokenizer_config.json").is_file() else None)
        self.tokenizer = load_tokenizer(tdir) if tdir else embedded_tokenizer(gguf)
        meta = self.llm.metadata
        arch = meta.get("general.architecture", "llama")
        self.layers = int(meta.get(f"{arch}.block_count", 0))
        self.parameters = None
        self.n_ctx = n_ctx

    def _score_one(self, prompt, label_ids, order):
        """Each label's log-probability after `prompt`; labels walked in `order` (feed_order)."""
        seq, P = self.seq, len(prompt)
        if P + max(map(len, label_ids)) > self.n_ctx:
            raise UsageError(f"{self.path}: a prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        keep = min(_shared(seq.tokens, prompt), P - 1)
        seq.cut(keep)
        # rows[t]: (logits, logsumexp) after the prompt and the first t answer tokens of the path fed
        rows = [_row_logsumexp(seq.feed(prompt[keep:], every=False)[-1])]
        out = [0.0] * len(label_ids)
        for j in order:
            lab = label_ids[j]
            keep = _shared(seq.tokens[P:], lab[:-1])
            if keep < len(lab) - 1:  # this branch leaves the path fed so far after `keep` answer tokens
                seq.cut(P + keep)
                rows = rows[: keep + 1] + [_row_logsumexp(r) for r in seq.feed(lab[keep:-1], every=True)]
            out[j] = sum(float(rows[t][0][tok]) - rows[t][1] for t, tok in enumerate(lab))
        return out

    def scores(self, encoded, label_ids, batch_size=16, desc=None):
        import torch
        from tqdm import tqdm

        bar = tqdm(total=len(encoded), desc=desc, unit="ex", disable=desc is None)
        rows = []
        order = feed_order(label_ids)
        for e in encoded:
            rows.append(self._score_one(e.prompt, label_ids, order))
            bar.update(1)
        bar.close()
        return torch.tensor(rows, dtype=torch.float32).reshape(len(encoded), len(label_ids))


def embedded_tokenizer(gguf: Path):
    """The tokenizer a GGUF holds, through transformers. Its USER_DEFINED tokens come back as plain added
    tokens; they are made special again, as distill's label tokens were before export (gguf_writer types
    them USER_DEFINED so llama.cpp prints them), so data text stays text (prompts.text_ids) and prompts
    are those of the model directory's tokenizer."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from distill.models.loading import hf_kwargs

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **hf_kwargs())
    plain = [a.content for a in tok.added_tokens_decoder.values() if not a.special]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in plain], special_tokens=True)
    return tok


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
    SIGTERM through the CLI), subprocess.run kills it and waits for it; a SIGKILL of this process kills
    it through the kernel (die_with_parent); its stderr is captured, so the traceback the same Ctrl-C
    gives the child is never shown.
    """
    import functools
    import subprocess
    import sys

    from distill.fileio import die_with_parent

    with tempfile.TemporaryDirectory(prefix="distill-llama.") as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps({**request, "result": str(Path(tmp) / "result.npz")}))
        env = dict(os.environ)
        passive_openmp(env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                           env.get("PYTHONPATH")]))
        code = f"from distill.models.llamacpp import _job; _job({str(req)!r})"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              preexec_fn=functools.partial(die_with_parent, os.getpid()))  # even if SIGKILLed
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise DistillError(f"llama.cpp {request['job']} failed: {tail}")
        with np.load(Path(tmp) / "result.npz") as z:
            return {k: z[k] for k in z.files}


def _job(request_path: str) -> None:
    """Child-process side of run_job: quantize a file or compute logits, results into an .npz."""
    from distill.fileio import pause_point

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
