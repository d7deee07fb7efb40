"""The server backend: a teacher behind one or more running vLLM OpenAI-compatible servers.

Everything goes through `POST /v1/completions` with token-id prompts, so no text is re-tokenized:
- top-k over a sequence: `echo`, `max_tokens: 1`, `prompt_logprobs: K`; `choices[i].prompt_logprobs[t]`
  is null (t = 0) or {"<token id>": {"logprob", "rank", ...}}, the distribution that predicted
  token t, with the actual token added when it is outside the top K (filtered by rank);
- soft labels of a label-token teacher (every label answer one token): the prompt alone, `max_tokens: 1`,
  `logprob_token_ids` = the label tokens; `choices[i].logprobs.top_logprobs[0]` holds their
  log-probabilities at the position after the prompt: one prefill per text, whatever the label count;
- soft labels from full answers: the prompt followed by each label answer with `prompt_logprobs: 1`,
  reading the actual token's entry at each answer position;
- teacher-written responses: sampling settings and `logprobs: K` with `return_tokens_as_token_ids`, so
  the response tokens and the top K at each are captured in the same pass.

Requests run concurrently (a thread pool), each sent to the least busy server; connection errors
and 5xx answers are retried with exponential backoff (on another server when there are several). Every
request has a deadline for its whole answer (`DISTILL_TEACHER_TIMEOUT`, default 300 s): a server that
accepts a request and never answers, or stops mid-body, is not asked again for it (another server is,
when there are several), so a run ends within about that time with one clear line, its finished shards
kept for the same command to resume. Before any work a probe checks every server: the model it serves
(`/v1/models`), that it allows `max_logprobs >= K` (a one-token request asking for K), and that its
tokenizer splits probe texts exactly as the local tokenizer does (`/tokenize`).

Secrets: an API key from `DISTILL_TEACHER_API_KEY` (else `VLLM_API_KEY`, the variable `vllm serve`
reads for `--api-key`) goes as `Authorization: Bearer`; a URL's `user:password@` goes as HTTP basic
auth. Neither is ever part of a URL distill shows or stores (`errors.redact`).

Numbers at the door: every answer is parsed strictly (common.checked_logprob, checked_token): a
log-probability that is not a JSON number, not finite or above 0, a token id outside the vocabulary,
a position asked for and missing, is a DistillError naming the server, before anything is cached.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from distill.config import TeacherSpec
from distill.data.prompts import render_chat
from distill.errors import DistillError, UsageError, redact
from distill.teacher.common import (  # noqa: F401 - TransientError, split_credentials: this module's API too
    TIMEOUT_VAR,
    Answer,
    Generated,
    Sampling,
    TransientError,
    checked_logprob,
    checked_positions,
    checked_token,
    fetch,
    one_token_labels,
    request_timeout,
    rows_from_entries,
    score_label_tokens,
    score_labels,
    server_auth,
    split_credentials,
)

log = logging.getLogger(__name__)

PROBE_TEXTS = [
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.",
    "  Ünïcödé → déjà vu, naïve café; 東京 🙂 tabs\tand\nnewlines  ",
]
def normalize_url(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all mean the server root."""
    u = url.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", u):
        raise UsageError(f"teacher url {redact(url)!r}: expected http://HOST:PORT (optionally ending in /v1)")
    if u.endswith("/v1"):
        u = u[: -len("/v1")]
    return u


def spec_urls(spec: TeacherSpec) -> list[str]:
    """The servers of a teacher spec: `url` and `urls` (either may hold several, comma separated)."""
    raw = []
    for v in [spec.url, *(getattr(spec, "urls", None) or [])]:
        if v:
            raw += [x for x in re.split(r"[,\s]+", v) if x]
    out = []
    for u in map(normalize_url, raw):
        if u not in out:
            out.append(u)
    return out


class _Server:
    """One server: `base` is its URL without credentials (all that is shown), `auth` what authenticates."""

    def __init__(self, url: str):
        self.base, self.auth = server_auth(url)
        self.busy = 0
        self.failures = 0


class ServerTeacher:
    name = "server"

    def __init__(self, spec: TeacherSpec, tok, k: int, vocab_rows: int | None = None, urls=None,
                 model_path: str | None = None, concurrency: int = 4, per_request: int = 4,
                 timeout: float | None = None, retries: int = 6, backoff: float = 0.5, probe: bool = True):
        import requests

        self._requests = requests
        urls = urls or spec_urls(spec)
        if not urls:
            raise UsageError(f"teacher {redact(spec.name)}: backend server needs a url (teacher spec `url:` or "
                             "--teacher-url)")
        self.servers = [_Server(u) for u in urls]
        self.spec, self.tok, self.k = spec, tok, k
        self.model_path = model_path
        self._turn = 0
        self.vocab_limit = len(tok)
        self.pad_rows = max(0, (vocab_rows or 0) - self.vocab_limit)
        self.id_limit = self.vocab_limit + self.pad_rows  # ids at or above: outside the model's vocabulary
        self.per_request = max(1, per_request)
        self.timeout = timeout if timeout is not None else request_timeout(spec)
        self.retries, self.backoff = retries, backoff
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency) * len(self.servers),
                                        thread_name_prefix="teacher-http")
        self.model: str | None = None
        self.max_logprobs: int | None = None
        self.max_model_len: int | None = None
        if probe:
            for s in self.servers:
                try:
                    self._probe(s)
                except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
                    raise DistillError(f"{s.base}: malformed answer to the start-up probe ({type(e).__name__}: "
                                       f"{str(e)[:200]})") from None
        # ask for a few more tokens than k when padded rows may take places in the top k
        self.k_request = k if not self.pad_rows else min(k + self.pad_rows, self.max_logprobs or k)

    # -- HTTP ----------------------------------------------------------------------------------
    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = self._requests.Session()
        return s

    def _once(self, server: _Server, method: str, path: str, payload=None) -> Answer:
        r = fetch(self._session(), method, server.base + path, self.timeout, payload, **server.auth)
        if r.status_code >= 500 or r.status_code == 429:
            raise TransientError(f"{server.base}{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r

    def _pick(self, avoid: set, dead: set) -> _Server:
        with self._lock:
            live = [s for s in self.servers if s.base not in dead]
            pool = [s for s in live if s.base not in avoid] or live
            self._turn += 1  # least busy first; among equals, take turns
            n = len(self.servers)
            s = min(pool, key=lambda s: (s.busy, (self.servers.index(s) - self._turn) % n))
            s.busy += 1
            return s

    def _call(self, method: str, path: str, payload=None, server: _Server | None = None):
        """One request with retries; returns (server, answer). Non-transient answers are returned. A
        request that timed out is not sent to that server again (to another one, if any)."""
        avoid: set = set()
        dead: set = set()  # servers this request timed out on
        delay = self.backoff
        last = None
        for attempt in range(self.retries + 1):
            s = server
            if s is None:
                s = self._pick(avoid, dead)
            else:
                with self._lock:
                    s.busy += 1
            try:
                return s, self._once(s, method, path, payload)
            except TransientError as e:
                last = e
                with self._lock:
                    s.failures += 1
                if e.timed_out:
                    dead.add(s.base)
                    if server is not None or len(dead) == len(self.servers):
                        raise DistillError(f"teacher server {e}: the server accepted the request but did not "
                                           f"answer in time; raise {TIMEOUT_VAR} (seconds) if it is only slow; "
                                           "finished work is kept, the same command resumes") from None
                if server is None and len(self.servers) > 1:
                    avoid.add(s.base)
                    if len(avoid) == len(self.servers):
                        avoid.clear()
                if attempt < self.retries:
                    log.warning("teacher server: %s; retrying in %.1f s (%d/%d)", e, delay, attempt + 1, self.retries)
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
            finally:
                with self._lock:
                    s.busy -= 1
        raise DistillError(f"teacher server: giving up after {self.retries + 1} attempts: {last}")

    def _json(self, server: _Server, r: Answer, what: str) -> dict:
        if r.status_code != 200:
            raise DistillError(f"{server.base}{what}: HTTP {r.status_code}: {_error_text(r)}")
        try:
            data = r.json()
        except ValueError:
            raise DistillError(f"{server.base}{what}: not a JSON answer: {r.text[:200]!r}") from None
        if not isinstance(data, dict):
            raise DistillError(f"{server.base}{what}: expected a JSON object, got {type(data).__name__}")
        return data

    # -- start-up probe ------------------------------------------------------------------------
    def _probe(self, s: _Server) -> None:
        _, r = self._call("GET", "/v1/models", server=s)
        data = self._json(s, r, "/v1/models")
        served = [m for m in data.get("data", []) if isinstance(m, dict) and m.get("id")]
        model = self._match_model(s, served)
        if self.model is not None and model != self.model:
            raise UsageError(f"{s.base}: serves {model!r}, another server of this teacher serves {self.model!r}")
        self.model = model
        # max_logprobs: ask for k (+ room for padded rows) on a one-token prompt and read the answer
        one = [self.tok.bos_token_id if self.tok.bos_token_id is not None else 0]
        want = self.k + self.pad_rows
        _, r = self._call("POST", "/v1/completions", {"model": model, "prompt": one, "max_tokens": 1,
                                                       "prompt_logprobs": want}, server=s)
        if r.status_code == 200:
            allowed = want
        else:
            text = _error_text(r)
            m = re.search(r"greater than max allowed:?\s*(\d+)", text)
            if not m:
                raise DistillError(f"{s.base}/v1/completions: probe request failed: HTTP {r.status_code}: {text}")
            allowed = int(m.group(1))
        if allowed < self.k:
            raise UsageError(f"{s.base}: the server allows at most {allowed} log-probabilities per position, this run "
                             f"needs k={self.k}; restart it with --max-logprobs {self.k} or more "
                             f"(`distill serve-teacher` takes it from the teacher spec's max_logprobs)")
        if allowed < want:
            log.warning("%s: max_logprobs %d leaves no room for the %d padded vocabulary rows; rows where padded "
                        "ids rank in the top k will hold fewer than k tokens", s.base, allowed, self.pad_rows)
        self.max_logprobs = allowed if self.max_logprobs is None else min(self.max_logprobs, allowed)
        self._check_tokenizer(s)
        log.info("teacher server %s: model %s, max_logprobs >= %d, tokenizer agrees", s.base, model, allowed)

    def _match_model(self, s: _Server, served: list[dict]) -> str:
        """The served model that is this teacher: by name (`served_model_name`, else the spec's name, as
        `distill serve-teacher` names it) or by the path/hub id it was loaded from (vLLM's `root`)."""
        spec = self.spec
        names = [m["id"] for m in served]
        if not served:
            raise DistillError(f"{s.base}/v1/models: the server lists no model")
        explicit = getattr(spec, "served_model_name", None)
        if explicit:
            if explicit not in names:
                raise UsageError(f"{s.base}: serves {', '.join(names)}, not the teacher's served_model_name "
                                 f"{explicit!r}; check the url or the teacher spec")
            return explicit
        if spec.name in names:
            return spec.name
        sources = {str(x).rstrip("/") for x in (spec.source, self.model_path) if x}
        sources |= {str(Path(x).resolve()) for x in sources if Path(x).exists()}
        for m in served:
            if {str(m.get("id", "")).rstrip("/"), str(m.get("root") or "").rstrip("/")} & sources:
                return m["id"]
        if not spec.source and len(served) == 1:  # a bare URL: whatever it serves (the tokenizer check follows)
            return names[0]
        raise UsageError(f"{s.base}: serves {', '.join(names)}, which is not teacher {spec.name!r} "
                         f"(source {spec.source!r}); start it with `distill serve-teacher`, or set "
                         "served_model_name in the teacher spec")

    def _check_tokenizer(self, s: _Server) -> None:
        for text in PROBE_TEXTS:
            local = self.tok(text, add_special_tokens=False).input_ids
            _, r = self._call("POST", "/tokenize", {"model": self.model, "prompt": text,
                                                    "add_special_tokens": False}, server=s)
            if r.status_code == 404:
                raise DistillError(f"{s.base}/tokenize: not found; cannot check that the server's tokenizer "
                                   "matches the local one (a vLLM server has this endpoint)")
            data = self._json(s, r, "/tokenize")
            if data.get("tokens") != local:
                raise UsageError(f"{s.base}: the server's tokenizer differs from the local tokenizer of "
                                 f"{self.spec.name}: {text!r} -> server {data.get('tokens')[:12]}..., "
                                 f"local {local[:12]}...; point the teacher spec at the same model")
            if data.get("max_model_len"):
                self.max_model_len = int(data["max_model_len"]) if self.max_model_len is None else \
                    min(self.max_model_len, int(data["max_model_len"]))
        if getattr(self.tok, "chat_template", None):
            msgs = [{"role": "user", "content": PROBE_TEXTS[0]}]
            local = self.tok(render_chat(self.tok, msgs, add_generation_prompt=True),
                             add_special_tokens=False).input_ids
            _, r = self._call("POST", "/tokenize", {"model": self.model, "messages": msgs,
                                                    "add_generation_prompt": True, "add_special_tokens": False},
                              server=s)
            if r.status_code == 200 and r.json().get("tokens") != local:
                raise UsageError(f"{s.base}: the server's chat template gives other tokens than the local one; "
                                 "point the teacher spec at the same model")

    # -- work ----------------------------------------------------------------------------------
    def _completions(self, payloads: list[dict]) -> list[tuple[str, list[dict]]]:
        """Send the payloads concurrently; each answer's server and choices, in prompt order."""
        def one(p):
            s, r = self._call("POST", "/v1/completions", p)
            data = self._json(s, r, "/v1/completions")
            with _answer_from(s.base):
                choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
                n = len(p["prompt"]) if p["prompt"] and isinstance(p["prompt"][0], list) else 1
                if len(choices) != n:
                    raise DistillError(f"asked for {n} completions, got {len(choices)}")
            return s.base, choices

        return list(self._pool.map(one, payloads))

    def _check_len(self, seqs) -> None:
        longest = max(len(s) for s in seqs)
        if self.max_model_len and longest + 1 > self.max_model_len:
            raise UsageError(f"a sequence of {longest} tokens does not fit the server's max_model_len="
                             f"{self.max_model_len}; lower task.max_length or serve with a larger max_model_len")

    def _prompt_logprobs(self, seqs, n_logprobs: int):
        """Per sequence, per position, the checked [(id, log-prob, rank)] (None at position 0)."""
        self._check_len(seqs)
        payloads = [{"model": self.model, "prompt": [list(map(int, s)) for s in seqs[i:i + self.per_request]],
                     "max_tokens": 1, "echo": True, "prompt_logprobs": n_logprobs, "temperature": 0.0}
                    for i in range(0, len(seqs), self.per_request)]
        out = []
        for base, choices in self._completions(payloads):
            for c in choices:
                with _answer_from(base):
                    out.append(checked_positions(c.get("prompt_logprobs"), len(seqs[len(out)]), self.id_limit))
        return out

    def topk(self, seqs, positions, k):
        return [rows_from_entries([plp[p] for p in pos], k, self.vocab_limit, self.k_request)
                for pos, plp in zip(positions, self._prompt_logprobs(seqs, self.k_request))]

    def _next_logprobs(self, prompts, ids):
        """One sequence per prompt: the log-probabilities of exactly `ids` at the position after it."""
        self._check_len(prompts)
        ids = list(map(int, ids))
        payloads = [{"model": self.model, "prompt": [list(map(int, p)) for p in prompts[i:i + self.per_request]],
                     "max_tokens": 1, "temperature": 0.0, "logprobs": len(ids), "logprob_token_ids": ids,
                     "return_tokens_as_token_ids": True}
                    for i in range(0, len(prompts), self.per_request)]
        out = []
        for base, choices in self._completions(payloads):
            for c in choices:
                with _answer_from(base):
                    top = ((c.get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
                    out.append({_token_id(t, self.id_limit): checked_logprob(v, f"label token {t}")
                                for t, v in top.items()})
        return out

    def label_logprobs(self, prompts, label_ids) -> torch.Tensor:
        tokens = one_token_labels(label_ids)
        if tokens is not None:
            return score_label_tokens(prompts, tokens, self._next_logprobs)
        return score_labels(prompts, label_ids, self._prompt_logprobs, _actual_logprob)

    def generate_topk(self, prompts, k, sampling: Sampling, seeds) -> list[Generated]:
        self._check_len([list(p) + [0] * sampling.max_new_tokens for p in prompts])
        payloads = []
        for p, seed in zip(prompts, seeds):
            body = {"model": self.model, "prompt": list(map(int, p)), "max_tokens": sampling.max_new_tokens,
                    "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0, "min_p": 0.0,
                    "repetition_penalty": 1.0, "seed": int(seed),
                    "logprobs": self.k_request, "return_tokens_as_token_ids": True,
                    "stop_token_ids": list(sampling.stop_ids), "skip_special_tokens": False}
            if self.pad_rows:
                body["allowed_token_ids"] = list(range(self.vocab_limit))
            payloads.append(body)
        out = []
        for base, (c,) in self._completions(payloads):
            with _answer_from(base):
                out.append(self._generated(c, k))
        return out

    def _generated(self, c: dict, k: int) -> Generated:
        """One choice of a sampling request: the response's tokens and the checked top k at each."""
        lp = c.get("logprobs") or {}
        response = [_token_id(t, self.vocab_limit) for t in lp.get("tokens") or []]
        tops = lp.get("top_logprobs") or []
        if len(tops) != len(response):
            raise DistillError("the answer's logprobs do not cover every generated token")
        entries = []
        for i, top in enumerate(tops):
            if not isinstance(top, dict) or not top:
                raise DistillError(f"response token {i}: no log-probabilities")
            entries.append([(_token_id(t, self.id_limit), checked_logprob(v, f"response token {i}"), None)
                            for t, v in top.items()])
        ids, vals, tail = rows_from_entries(entries, k, self.vocab_limit, self.k_request)
        return Generated(response, ids, vals, tail)

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _answer_from(base: str):
    """Whatever is wrong with an answer of server `base` becomes one DistillError naming the server."""
    try:
        yield
    except DistillError as e:
        raise DistillError(f"teacher server {base}/v1/completions: bad answer: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise DistillError(f"teacher server {base}/v1/completions: malformed answer ({type(e).__name__}: "
                           f"{str(e)[:200]})") from None


def _actual_logprob(entry, tok: int) -> float:
    """A label token's log-probability in one position's checked entries."""
    for t, lp, _ in entry or ():
        if t == tok:
            return lp
    raise DistillError(f"teacher server: no log-probability for label token {tok}")


def _token_id(t: str, id_limit: int) -> int:
    if isinstance(t, str) and t.startswith("token_id:"):
        return checked_token(t[len("token_id:"):], id_limit, "token")
    raise DistillError(f"expected a token as 'token_id:N', got {str(t)[:40]!r} (return_tokens_as_token_ids ignored?)")


def _error_text(r) -> str:
    try:
        data = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    return str(data)[:500]
