"""Hugging Face causal LM -> GGUF, written for this project on top of the `gguf` package's GGUFWriter.

The `gguf` package knows the file format, the tensor names and numpy quantization, but not how an HF
checkpoint maps onto llama.cpp's expectations; this module holds that knowledge for the architectures
we support (Llama family and Qwen2). K-quants are not made here (see distill.export.pipeline).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.errors import DistillError, UsageError

log = logging.getLogger(__name__)

# HF architecture -> (gguf architecture name, whether llama.cpp wants Q/K rows permuted).
# llama.cpp's llama arch applies rotary embeddings to adjacent pairs (2i, 2i+1) while HF rotates halves
# (i, i + d/2), so Q/K rows are reordered per head; its qwen2 arch uses the NEOX (half) layout, like HF.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}

NUMPY_QUANTS = ("f16", "q8_0", "q4_0")

# Block quants need rows that are a whole number of blocks; others stay at f16.
_BLOCK = 32


@dataclass(frozen=True)
class ArchSpec:
    hf_name: str
    gguf_arch: str
    permute_qk: bool


def arch_spec(config) -> ArchSpec:
    """The conversion rules for this config, or a UsageError naming what is supported."""
    archs = list(getattr(config, "architectures", None) or [])
    for name in archs:
        if name in SUPPORTED_ARCHITECTURES:
            gguf_arch, permute = SUPPORTED_ARCHITECTURES[name]
            return ArchSpec(name, gguf_arch, permute)
    got = ", ".join(archs) or getattr(config, "model_type", "unknown")
    raise UsageError(f"GGUF export does not support architecture {got}; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def _check_config(config, spec: ArchSpec) -> None:
    """Refuse settings llama.cpp would silently compute differently."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UsageError(f"GGUF export: hidden_act {act!r} is not supported (llama.cpp's {spec.gguf_arch} uses silu)")
    if getattr(config, "mlp_bias", False):
        raise UsageError("GGUF export: MLP biases are not supported by llama.cpp's llama architecture")
    window = getattr(config, "sliding_window", None)
    if spec.gguf_arch == "llama" and window and window < getattr(config, "max_position_embeddings", 0):
        log.warning("llama.cpp ignores the sliding window (%d): outputs differ beyond %d tokens", window, window)
    if spec.gguf_arch == "qwen2" and getattr(config, "use_sliding_window", False):
        log.warning("llama.cpp's qwen2 ignores use_sliding_window: long contexts may differ")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder a Q/K weight (or bias) from HF's rotate-half layout to llama.cpp's interleaved pairs.

    Within each head, HF row i pairs with row i + d/2; llama.cpp pairs rows 2i and 2i+1.
    """
    rows = w.shape[0]
    d = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, d // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def rope_parameters(config) -> dict:
    """The rope settings in one dict whatever the transformers version stored (rope_parameters or rope_scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def rope_freq_factors(config) -> np.ndarray:
    """llama.cpp's rope_freqs tensor: per-frequency divisors = default inverse frequency / scaled one.

    Taken from transformers' own rope functions, so it is exactly what the HF model computes.
    """
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_parameters(config)
    scaled, attention_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    if abs(float(attention_factor) - 1.0) > 1e-6:
        raise UsageError(f"GGUF export: rope type {params['rope_type']} with attention factor {attention_factor} "
                         f"is not supported")
    d = head_dim(config)
    default = 1.0 / (params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return (default / scaled.double()).float().numpy()


def _add_rope(writer, config) -> dict[str, np.ndarray]:
    """Write rope metadata; return extra tensors it needs (llama3 scaling ships per-frequency factors)."""
    import gguf

    params = rope_parameters(config)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    kind = params["rope_type"]
    if kind == "default":
        return {}
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return {}
    if kind == "llama3":
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": rope_freq_factors(config)}
    raise UsageError(f"GGUF export: rope type {kind!r} is not supported (supported: default, linear, llama3)")


def _add_hparams(writer, config, n_vocab: int) -> None:
    hd = head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(hd)
    if hd * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    writer.add_vocab_size(n_vocab)


# ---------------------------------------------------------------- tokenizer

# Tokenizer families recognised by a token at a fixed id (and the size of the BPE model's own
# vocabulary, which tokens added later, such as label tokens, do not change) -> llama.cpp pre-tokenizer name.
_KNOWN_PRE = (
    ({1: "<|im_start|>", 0: "<|endoftext|>"}, 49152, "smollm"),  # SmolLM / SmolLM2
    ({151643: "<|endoftext|>"}, None, "qwen2"),  # Qwen2 / Qwen2.5
    ({128000: "<|begin_of_text|>"}, None, "llama-bpe"),  # Llama 3
)


def pre_tokenizer_name(tokenizer, config, n_base: int) -> str:
    """A pre-tokenizer name llama.cpp knows (it refuses unknown ones): by tokenizer family, then architecture.
    n_base: the number of tokens in the BPE model's vocabulary (tokenizer.json's model.vocab)."""
    vocab = tokenizer.get_vocab()
    for marks, size, name in _KNOWN_PRE:
        if all(vocab.get(tok) == i for i, tok in marks.items()) and (size is None or n_base == size):
            return name
    if getattr(config, "model_type", "") == "qwen2":
        return "qwen2"
    log.warning("unrecognised tokenizer: writing pre-tokenizer 'default'; llama.cpp may split text "
                "differently from transformers")
    return "default"


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError("GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json")
    return json.loads(backend.to_str())


def _merges(model_json: dict) -> list[str]:
    """BPE merges as the 'left right' strings GGUF stores (tokenizers writes pairs or strings)."""
    return [m if isinstance(m, str) else " ".join(m) for m in model_json.get("merges", [])]


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding plain text adds BOS / EOS, so llama.cpp tokenizes prompts the same way."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(ids) > 1 and ids[0] == bos
    add_eos = eos is not None and len(ids) > 1 and ids[-1] == eos
    return add_bos, add_eos


def control_token_ids(tokenizer) -> set[int]:
    """The added tokens llama.cpp gets as CONTROL, which its detokenizer does not print: the ones the
    tokenizer names (bos, eos, unk, pad, its extra special tokens) and the special ones marked up as
    control tokens are (<|im_start|>, <repo_name>, [PAD]). Every other added token is USER_DEFINED,
    which llama.cpp prints as its text: a classifier's label tokens (special in transformers, so data
    text cannot produce them; see distill.models.label_tokens) must print, so greedy decoding shows the label."""
    named = set(tokenizer.all_special_ids)
    marked = {i for i, a in tokenizer.added_tokens_decoder.items() if a.special and _marked_up(a.content)}
    return named | marked


def _marked_up(text: str) -> bool:
    return len(text) > 2 and (text[0], text[-1]) in (("<", ">"), ("[", "]"))


def _token_table(tokenizer, n_rows: int, spm: bool) -> tuple[list[str], list[int], list[float]]:
    """Tokens, types and scores for every embedding row; rows without a token become UNUSED padding."""
    from gguf import TokenType

    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    if id_to_token and max(id_to_token) >= n_rows:
        raise UsageError(f"tokenizer has token id {max(id_to_token)} but the embedding only {n_rows} rows")
    added = {i: a for i, a in tokenizer.added_tokens_decoder.items()}
    control = control_token_ids(tokenizer)
    tokens, types, scores = [], [], []
    for i in range(n_rows):
        tok = id_to_token.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if i in control else TokenType.USER_DEFINED)
        elif spm and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            tokens.append(tok)
            types.append(TokenType.BYTE)
        else:
            tokens.append(tok)
            types.append(TokenType.NORMAL)
        # SentencePiece-style vocabularies are merged by score: earlier ids (earlier merges) win.
        scores.append(-float(i))
    return tokens, [int(t) for t in types], scores


def _add_space_prefix(spec: dict) -> bool:
    text = json.dumps(spec.get("normalizer")) + json.dumps(spec.get("pre_tokenizer"))
    return '"Prepend"' in text or '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text


def add_vocab(writer, tokenizer, config, n_rows: int) -> dict:
    """Write the tokenizer: byte-level BPE as llama.cpp's gpt2 model, byte-fallback BPE as its llama (SPM) model."""
    spec = _tokenizer_json(tokenizer)
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UsageError(f"GGUF export supports BPE tokenizers, not {model.get('type')}")
    spm = bool(model.get("byte_fallback"))
    tokens, types, scores = _token_table(tokenizer, n_rows, spm)
    if spm:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_add_space_prefix(spec))
        pre = "default"
    else:
        pre = pre_tokenizer_name(tokenizer, config, len(model.get("vocab", ())))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = _merges(model)
    if merges:
        writer.add_token_merges(merges)
    _add_special_tokens(writer, tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return {"tokenizer_model": "llama" if spm else "gpt2", "pre_tokenizer": pre,
            "n_tokens": len(tokens), "n_merges": len(merges)}


def _add_special_tokens(writer, tokenizer) -> None:
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    add_bos, add_eos = _adds_bos_eos(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)


# ---------------------------------------------------------------- tensors

def _tensor_name_map(spec: ArchSpec, n_blocks: int):
    import gguf

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[spec.gguf_arch]
    return gguf.get_tensor_name_map(arch, n_blocks)


def gguf_parameter_names(model, spec: ArchSpec) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, for the tensors the file stores."""
    names = _tensor_name_map(spec, model.config.num_hidden_layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out = {}
    for hf_name in model.state_dict():
        if (tied and hf_name == "lm_head.weight") or "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise DistillError(f"GGUF export: no GGUF name for tensor {hf_name}")
        out[name] = hf_name
    return out


def hf_tensors(model, spec: ArchSpec) -> dict[str, np.ndarray]:
    """The model's tensors as float32 numpy arrays under GGUF names, with Q/K permuted where llama.cpp needs it."""
    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    state = model.state_dict()
    out = {}
    # a tied lm_head is left out: llama.cpp reuses token_embd when output.weight is absent
    for name, hf_name in gguf_parameter_names(model, spec).items():
        arr = state[hf_name].detach().to("cpu").float().numpy()
        if spec.permute_qk and ".self_attn.q_proj." in hf_name:
            arr = permute_rotary_rows(arr, n_head)
        elif spec.permute_qk and ".self_attn.k_proj." in hf_name:
            arr = permute_rotary_rows(arr, n_kv)
        out[name] = arr
    return out


def tensor_type(name: str, arr: np.ndarray, quant: str):
    """The GGML type one tensor gets: 1-D tensors (norms, biases) f32; matrices per quant, f16 when rows
    don't fit blocks.

    With q4_0 the embedding/output matrix stays q8_0: it carries every logit, and llama.cpp's own q4
    presets also keep the output layer at higher precision.
    """
    from gguf import GGMLQuantizationType as T

    if arr.ndim < 2:
        return T.F32
    if quant == "f16" or arr.shape[-1] % _BLOCK:
        return T.F16
    if quant == "q8_0":
        return T.Q8_0
    if quant == "q4_0":
        return T.Q8_0 if name.startswith(("token_embd.", "output.")) else T.Q4_0
    raise UsageError(f"unknown quant {quant!r}; numpy quants: {', '.join(NUMPY_QUANTS)}")


def encode(arr: np.ndarray, qtype) -> np.ndarray:
    """Convert a float32 array to the bytes (or float array) GGUFWriter stores for qtype."""
    import gguf
    from gguf import GGMLQuantizationType as T

    if qtype == T.F32:
        return arr.astype(np.float32)
    if qtype == T.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


_FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def write_gguf(model, tokenizer, path: str | Path, quant: str = "f16", name: str | None = None,
               prequantized: dict | None = None) -> dict:
    """Write `model` + `tokenizer` as a GGUF at `path` (in place: callers make it atomic). Returns what was written.

    prequantized: GGUF tensor name -> (GGML type, block bytes) written as given instead of converted
    (the calibrated IQ4_NL matrices of distill.export.gptq).
    """
    import gguf

    if quant not in NUMPY_QUANTS:
        raise UsageError(f"unknown quant {quant!r}; numpy quants: {', '.join(NUMPY_QUANTS)}")
    config = model.config
    spec = arch_spec(config)
    _check_config(config, spec)
    tensors = hf_tensors(model, spec)
    n_rows = tensors["token_embd.weight"].shape[0]

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines name our temp file; we log the result
    writer = gguf.GGUFWriter(str(path), spec.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or getattr(config, "_name_or_path", "") or spec.hf_name)
    _add_hparams(writer, config, n_rows)
    tensors.update(_add_rope(writer, config))
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[quant])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = add_vocab(writer, tokenizer, config, n_rows)

    counts = Counter()
    for tname, arr in tensors.items():
        if prequantized and tname in prequantized:
            qtype, data = prequantized[tname]
        else:
            qtype = tensor_type(tname, arr, quant)
            data = encode(arr, qtype)
        writer.add_tensor(tname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        counts[qtype.name] += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"architecture": spec.gguf_arch, "hf_architecture": spec.hf_name, "n_vocab": n_rows,
            "tensor_types": dict(counts), **vocab}
