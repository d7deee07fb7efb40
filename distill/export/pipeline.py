"""Export a trained student (a model directory or a LoRA adapter) to GGUF for llama.cpp, and check the result.

A GGUF that loads is not necessarily right: a wrong Q/K permutation or a bad quantization still runs
and produces fluent-looking garbage. So every export is reloaded and its logits are compared with the
source model's at every position of a few probe prompts before the file is put in place.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distill.data.prompts import render_chat
from distill.errors import DistillError, UsageError
from distill.export.gguf_writer import NUMPY_QUANTS, arch_spec, gguf_parameter_names, write_gguf
from distill.fileio import check_output_file, fsync_file, pause_point, pid_alive
from distill.models import llamacpp
from distill.models.llamacpp import have_llama_cpp, require_llama_cpp
from distill.models.loading import adapter_base, check_remote_code, hf_kwargs, is_adapter, load_model, size_on_disk

log = logging.getLogger(__name__)

QUANTS = NUMPY_QUANTS + ("q4_k_m",)
CALIBRATION_EXAMPLES = 128


@dataclass(frozen=True)
class Thresholds:
    """What a sound export of each quant type reaches on the probes.

    Against the source model (catches conversion bugs: layout, vocabulary, tokenizer):
      top1: agreement of the argmax, counted at positions where the source's top-2 margin is above
        TIE_MARGIN of the logit range (near-ties may flip under any rounding); f16 only, because how
        far quantization moves the argmax depends on the model: a distilled classifier's flat
        distributions over free text flip far more often than a chat model's (measured below).
      max_err_rel: max |logit error| / (max - min logit) over all probe positions.
      pearson: mean over positions of the correlation between source and GGUF logit vectors.
    Against the dequantized reference (transformers running the file's own dequantized weights;
    checked when llama.cpp does the run): pearson_dequantized, which separates the runtime's
    arithmetic from the quantization error and so holds for any model.
    """

    top1: float | None = None
    max_err_rel: float | None = None
    pearson: float | None = None
    pearson_dequantized: float | None = None


TIE_MARGIN = 0.005
# Measured with llama.cpp, 4 probes, 131 positions (top-1 decisive / correlation, against the source):
#   SmolLM2-135M-Instruct: f16 1.000 / 1.0000; q8_0 0.991 / 0.9986; q4_k_m 0.939 / 0.982; q4_0 0.80 / 0.906.
#   the default task's distilled 8-layer student: q8_0 0.935 / 0.9982; q4_k_m 0.630 / 0.976; q4_0 0.25 / 0.909.
#   against the dequantized reference, every one of these: correlation >= 0.997 (min per position 0.990).
#   the same student as q4_k_m with its 576-wide matrices GPTQ-calibrated on task text (IQ4_NL): r 0.951 on
#   these free-text probes, while its label distributions on the validation split are closer to the float
#   model's than the uncalibrated file's (KL 0.064 vs 0.075): calibration trades off-task fidelity, hence 0.90.
# The SmolLM2 f16 export without the Q/K permutation scored top-1 0.71 / r 0.83, and as q4_0 r 0.77,
# so these limits still catch a broken file.
THRESHOLDS = {
    "f16": Thresholds(top1=1.0, max_err_rel=0.01, pearson=0.9999),
    "q8_0": Thresholds(pearson=0.995, pearson_dequantized=0.99),
    "q4_k_m": Thresholds(pearson=0.90, pearson_dequantized=0.99),
    "q4_0": Thresholds(pearson=0.85, pearson_dequantized=0.99),
}

PROBES = (
    "The quick brown fox jumps over the lazy dog. Afterwards it ran into the forest, where three owls "
    "were watching the moon rise over the hills.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Question: What is the capital of France, and which river flows through it?\nAnswer: The capital",
)


# ---------------------------------------------------------------- loading the source

def source_config(model_dir: Path):
    """The config of the model that will be exported (the base's for an adapter), checked before any weights load."""
    from transformers import AutoConfig

    check_remote_code(model_dir)
    path = adapter_base(model_dir) if is_adapter(model_dir) else str(model_dir)
    check_remote_code(path)
    try:
        config = AutoConfig.from_pretrained(path, **hf_kwargs())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read the model config ({e})") from None
    arch_spec(config)
    return config


def load_source(model_dir: Path):
    """(model in float32, tokenizer, checkpoint bytes); a LoRA adapter is merged into its base."""
    from transformers import AutoTokenizer

    model, tokenizer_dir = load_model(str(model_dir), "float32")
    model.eval()
    check_remote_code(tokenizer_dir)
    return model, AutoTokenizer.from_pretrained(tokenizer_dir, **hf_kwargs()), size_on_disk(model_dir)


# ---------------------------------------------------------------- writing

def check_out_outside_source(out: Path, model_dir: Path) -> None:
    """Refuse an --out that is, or lies inside, the model directory being exported (or, for a LoRA
    adapter, its base model's): the export would write over, or into, what it reads."""
    sources = [model_dir]
    if is_adapter(model_dir):
        base = Path(adapter_base(model_dir))
        if base.is_dir():  # a hub id is not a directory this export could write into
            sources.append(base)
    target = out.resolve()
    for src in sources:
        root = src.resolve()
        if target == root or root in target.parents:
            what = "the source model" if src == model_dir else "the adapter's base model"
            where = "is" if target == root else "lies inside"
            raise UsageError(f"--out {out}: {where} {what} ({src}); the export would write over what it reads. "
                             "Choose a path outside it")


def _temp_prefix(out: Path, pid: int | None = None) -> str:
    return f".{out.stem}.{os.getpid() if pid is None else pid}."


def remove_stale_temps(out: Path) -> list[Path]:
    """Temporary files and directories of earlier exports to `out` whose process is gone (killed):
    removed, so an interrupted export costs no disk. Those of a live export are left alone."""
    removed = []
    for f in out.parent.glob(f".{out.stem}.*.tmp*"):
        pid = f.name[len(out.stem) + 2:].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            if f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)
            removed.append(f)
    return removed


@contextlib.contextmanager
def atomic_output(out: Path):
    """Yield a temp path next to `out`; on success fsync it and rename it over `out`, else delete it.
    The temp name carries this process's id, so a later export can tell a killed run's leftovers."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for f in remove_stale_temps(out):
        log.info("removed %s, left by an interrupted export", f)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(out), suffix=".tmp.gguf", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes the file private; the export is an ordinary file
        fsync_file(tmp)
        pause_point("export_verified")
        os.replace(tmp, out)
        fsync_file(out.parent)
    finally:
        tmp.unlink(missing_ok=True)


def quantize_k(src: Path, dst: Path, ftype_name: str = "LLAMA_FTYPE_MOSTLY_Q4_K_M",
               embedding_type: str | None = None, keep: list[str] = ()) -> None:
    """Re-quantize an f16 GGUF with llama.cpp (the gguf package cannot make K-quants).

    embedding_type overrides llama.cpp's type for the token embedding. llama.cpp gives it Q6_K in Q4_K_M, and
    when the rows do not fit 256-wide K blocks (hidden size 576 in SmolLM2) it falls back to Q8_0: for a small
    model with tied embeddings that one tensor is half the file. Q5_0 is the closest block type below Q6_K's
    6.6 bits.

    keep: tensors already quantized in `src` (the calibrated IQ4_NL matrices); llama.cpp is told to
    give them the type they have, which it then copies unchanged.
    """
    llamacpp.quantize(src, dst, ftype_name, embedding_type, keep)


def _write(model, tokenizer, path: Path, quant: str, name: str, calibration=None) -> dict:
    """Write `path` in the requested quant; q4_k_m goes through an f16 file quantized by llama.cpp.

    For q4_k_m, the layer matrices whose rows do not fit Q4_K's 256-wide blocks are quantized here to
    IQ4_NL with GPTQ when there is calibration text (token-id sequences), and left to llama.cpp's
    round-to-nearest Q5_0 fallback when there is none.
    """
    if quant != "q4_k_m":
        return write_gguf(model, tokenizer, path, quant, name=name)
    require_llama_cpp("q4_k_m export")
    narrow = narrow_matrices(model)
    calibrated = calibrated_iq4_nl(model, narrow, calibration) if narrow and calibration else {}
    prefix = path.name.split(".tmp.gguf")[0] + "."
    with tempfile.TemporaryDirectory(prefix=prefix, suffix=".tmp.d", dir=path.parent) as tmp:
        f16 = Path(tmp) / "f16.gguf"
        info = write_gguf(model, tokenizer, f16, "f16", name=name, prequantized=calibrated)
        quantize_k(f16, path, embedding_type=None if model.config.hidden_size % K_BLOCK == 0 else "Q5_0",
                   keep=list(calibrated))
    info["tensor_types"] = gguf_tensor_types(path)
    info["calibrated"] = {"method": "gptq", "type": "IQ4_NL", "tensors": len(calibrated),
                          "sequences": len(calibration or ()),
                          "tokens": sum(map(len, calibration or ()))} if calibrated else None
    return info


K_BLOCK = 256  # values per row block of llama.cpp's K-quants


def narrow_matrices(model) -> dict[str, str]:
    """GGUF name -> parameter name of the layer matrices whose rows K-quants cannot hold (not the embedding)."""
    spec = arch_spec(model.config)
    state = model.state_dict()
    return {g: p for g, p in gguf_parameter_names(model, spec).items()
            if g.startswith("blk.") and state[p].ndim == 2 and state[p].shape[1] % K_BLOCK
            and state[p].shape[1] % 32 == 0}


def calibrated_iq4_nl(model, narrow: dict[str, str], calibration) -> dict:
    """GGUF name -> (IQ4_NL, GPTQ block bytes) for each matrix in `narrow`, Hessians from `calibration`."""
    from gguf import GGMLQuantizationType
    from tqdm import tqdm

    from distill.export.gguf_writer import hf_tensors
    from distill.export.gptq import input_hessians, quantize_iq4_nl

    modules = sorted({p.rsplit(".", 1)[0] for p in narrow.values()})
    hessians = input_hessians(model, calibration, modules)
    tensors = hf_tensors(model, arch_spec(model.config))
    out = {}
    for g, p in tqdm(narrow.items(), desc="GPTQ (IQ4_NL)", unit="matrix", leave=False):
        blocks, _ = quantize_iq4_nl(tensors[g], hessians[p.rsplit(".", 1)[0]])
        out[g] = (GGMLQuantizationType.IQ4_NL, blocks)
    return out


def calibration_sequences(model_dir: Path, recipe_path, tokenizer, n: int = CALIBRATION_EXAMPLES):
    """Token ids of up to `n` training examples (prompt + answer), the text GPTQ calibrates on; or None.

    The recipe is `recipe_path`, else the one the model was trained with (its training.json). Only the
    training split is read: the holdout stays untouched until the quantized model is evaluated on it.
    """
    from distill.config import load_recipe
    from distill.data.prompts import task_token_ids
    from distill.data.splits import prepare_splits

    if recipe_path is None:
        meta = model_dir / "training.json"
        try:
            recipe_path = json.loads(meta.read_text()).get("recipe") if meta.is_file() else None
        except (OSError, json.JSONDecodeError):
            recipe_path = None
        if not recipe_path or not Path(recipe_path).is_file():
            return None
    recipe = load_recipe(recipe_path)
    task = recipe.task
    splits = prepare_splits(task, recipe.workdir, recipe.path or str(recipe_path))
    return task_token_ids(task, splits, tokenizer, n, task.split.seed, with_answers=True)


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF holds (llama.cpp picks fallbacks for K-quants)."""
    from collections import Counter

    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


# ---------------------------------------------------------------- verification

def probe_ids(tokenizer) -> list[list[int]]:
    """Token ids of the probe prompts (one of them through the chat template when there is one)."""
    probes = [tokenizer(p)["input_ids"] for p in PROBES]
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": "Name three primary colours."},
                {"role": "assistant", "content": "Red, yellow and blue."}]
        text = render_chat(tokenizer, chat, add_generation_prompt=False)
        probes.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [list(map(int, p)) for p in probes]


def reference_logits(model, ids_list) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in ids_list]


def transformers_logits(path: Path, ids_list) -> list[np.ndarray]:
    """Logits from transformers' GGUF loader, which dequantizes: a check that needs no llama.cpp."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 **hf_kwargs())
    model.eval()
    return reference_logits(model, ids_list)


def compare_logits(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """Agreement figures between source and GGUF logits, all positions of all probes pooled."""
    r = np.concatenate(ref).astype(np.float64)
    g = np.concatenate(got).astype(np.float64)
    if r.shape != g.shape:
        raise DistillError(f"GGUF logits have shape {g.shape}, the source model's {r.shape}")
    span = float(r.max() - r.min()) or 1.0
    top2 = np.sort(r, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > TIE_MARGIN * span
    agree = r.argmax(1) == g.argmax(1)
    rc = r - r.mean(1, keepdims=True)
    gc = g - g.mean(1, keepdims=True)
    corr = (rc * gc).sum(1) / np.sqrt((rc * rc).sum(1) * (gc * gc).sum(1) + 1e-30)
    return {
        "positions": int(len(r)),
        "top1": float(agree.mean()),
        "top1_decisive": float(agree[decisive].mean()) if decisive.any() else 1.0,
        "max_abs_err": float(np.abs(r - g).max()),
        "logit_range": span,
        "max_err_rel": float(np.abs(r - g).max() / span),
        "pearson": float(corr.mean()),
        "pearson_min": float(corr.min()),
    }


def judge(figures: dict, quant: str) -> list[str]:
    """The thresholds `figures` misses for this quant (empty when the export is sound)."""
    t = THRESHOLDS[quant]
    misses = []
    if t.top1 is not None and figures["top1_decisive"] < t.top1:
        misses.append(f"top-1 agreement {figures['top1_decisive']:.3f} < {t.top1}")
    if t.max_err_rel is not None and figures["max_err_rel"] > t.max_err_rel:
        misses.append(f"max abs error {figures['max_err_rel']:.4f} of the logit range > {t.max_err_rel}")
    if t.pearson is not None and figures["pearson"] < t.pearson:
        misses.append(f"logit correlation {figures['pearson']:.4f} < {t.pearson}")
    deq = figures.get("dequantized")
    if t.pearson_dequantized is not None and deq is not None and deq["pearson"] < t.pearson_dequantized:
        misses.append(f"logit correlation with the dequantized weights {deq['pearson']:.4f} < {t.pearson_dequantized}")
    return misses


def _backend(choice) -> str:
    if choice in (True, "auto"):
        return "llama_cpp" if have_llama_cpp() else "transformers"
    if choice not in ("llama_cpp", "transformers"):
        raise UsageError(f"unknown verification backend {choice!r} (auto, llama_cpp, transformers)")
    return choice


def verify_gguf(model, tokenizer, path: Path, quant: str, backend="auto", ref=None) -> dict:
    """Compare a written GGUF's logits with the source model's; the figures, thresholds and a pass flag."""
    backend = _backend(backend)
    ids_list = probe_ids(tokenizer)
    ref = ref if ref is not None else reference_logits(model, ids_list)
    got = (llamacpp.logits if backend == "llama_cpp" else transformers_logits)(Path(path), ids_list)
    figures = compare_logits(ref, got)
    if backend == "llama_cpp" and THRESHOLDS[quant].pearson_dequantized is not None:
        figures["dequantized"] = compare_logits(transformers_logits(Path(path), ids_list), got)
    misses = judge(figures, quant)
    return {"backend": backend, **figures, "thresholds": asdict(THRESHOLDS[quant]),
            "passed": not misses, "failures": misses}


# ---------------------------------------------------------------- entry point

def export_gguf(model_dir, out, quant: str = "q4_k_m", verify=True, recipe=None) -> dict:
    """Export `model_dir` (HF directory or PEFT LoRA adapter) to the GGUF file `out`; return a report.

    verify: True/"auto" checks logits with llama.cpp when installed, else transformers' GGUF loader;
    "llama_cpp" or "transformers" forces one; False skips the check. A failed check raises DistillError
    and leaves no file at `out`. recipe: the recipe whose training split calibrates q4_k_m (default:
    the one in MODEL_DIR/training.json).
    """
    model_dir, out = Path(model_dir), check_output_file(out, "--out")  # never over a user's file, '' or '/'
    if quant not in QUANTS:
        raise UsageError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: no such model directory")
    check_out_outside_source(out, model_dir)
    if out.is_dir():
        raise UsageError(f"{out}: is a directory; give the .gguf file to write")
    if quant == "q4_k_m":
        require_llama_cpp("q4_k_m export")
    backend = _backend(verify) if verify else None
    source_config(model_dir)
    start = time.perf_counter()
    model, tokenizer, source_bytes = load_source(model_dir)
    calibration = None
    if quant == "q4_k_m" and narrow_matrices(model):
        calibration = calibration_sequences(model_dir, recipe, tokenizer)
        if calibration is None:
            log.warning("q4_k_m: %s names no training recipe and no --recipe was given, so the matrices whose "
                        "rows do not fit 256-wide blocks get llama.cpp's uncalibrated Q5_0 fallback", model_dir)
    with atomic_output(out) as tmp:
        info = _write(model, tokenizer, tmp, quant, name=model_dir.name, calibration=calibration)
        report = {"path": str(out), "format": "gguf", "quant": quant, "source": str(model_dir),
                  "adapter_merged": is_adapter(model_dir), "bytes": tmp.stat().st_size,
                  "source_bytes": source_bytes, **info}
        pause_point("export_written")
        if backend:
            check = verify_gguf(model, tokenizer, tmp, quant, backend)
            report["verify"] = check
            if not check["passed"]:
                raise DistillError(f"GGUF export to {out} failed verification ({backend}): "
                                   f"{'; '.join(check['failures'])}; no file written")
    report["seconds"] = round(time.perf_counter() - start, 2)
    log.info("wrote %s (%s, %.1f MB)", out, quant, report["bytes"] / 1e6)
    return report


def format_export_report(report: dict) -> str:
    """A few human lines for the CLI: what was written and how closely it matches the source."""
    mb = report["bytes"] / 1e6
    src = f" (source checkpoint {report['source_bytes'] / 1e6:.1f} MB)" if report.get("source_bytes") else ""
    merged = ", LoRA adapter merged" if report.get("adapter_merged") else ""
    lines = [f"wrote {report['path']}: {report['quant']}, {mb:.1f} MB{src}, {report['architecture']}, "
             f"{report['n_vocab']} tokens, pre-tokenizer {report['pre_tokenizer']}{merged}"]
    cal = report.get("calibrated")
    if cal:
        lines.append(f"{cal['tensors']} matrices whose rows do not fit 256-wide K blocks: {cal['type']} by GPTQ, "
                     f"calibrated on {cal['sequences']} training examples ({cal['tokens']} tokens)")
    v = report.get("verify")
    if v:
        lines.append(f"verified with {v['backend']} on {v['positions']} positions: top-1 agreement "
                     f"{v['top1_decisive']:.3f} ({v['top1']:.3f} counting near-ties), max error "
                     f"{100 * v['max_err_rel']:.2f}% of the logit range, correlation {v['pearson']:.4f}")
        if v.get("dequantized"):
            lines.append(f"llama.cpp against the file's own dequantized weights: correlation "
                         f"{v['dequantized']['pearson']:.4f} (the rest is quantization error)")
    else:
        lines.append("not verified (--no-verify)")
    return "\n".join(lines)
