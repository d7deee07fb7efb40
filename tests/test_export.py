"""GGUF export: the written file must give the source model's logits, in llama.cpp and in transformers.

The tiny models are random, but not with the default init. With std 0.02 everywhere the logits are
flat (top-1 flips under any rounding) and quantization noise swamps the correlation, so nothing is
learnt about the converter. Instead (measured on these shapes, see THRESHOLDS notes in distill.export.pipeline):
- embeddings N(0, 1): the residual stream carries the token, so the output distribution has a clear
  top-1 (the tied / near-tied output head);
- attention q/k N(0, 0.1): sharp, position-dependent attention, so a wrong rotary layout moves the
  logits by ~6% of their range, six times the f16 tolerance (test_wrong_rotary_layout_is_caught);
- other matrices N(0, 0.03), MLP N(0, 0.01): layers matter, but add little quantization noise, so
  q4 correlation (0.996-0.999 measured) is meaningful against the 0.995 bar.
Rows: hidden 256 and intermediate 512 are multiples of 256, so q4_k_m really uses K-quant blocks.
The vocabulary is padded: embedding rows = len(tokenizer) + 64.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import sigint_default, write_class_data, write_recipe

from distill.errors import DistillError, UsageError
from distill.export.pipeline import (
    THRESHOLDS,
    Thresholds,
    export_gguf,
    gguf_tensor_types,
    probe_ids,
    reference_logits,
    transformers_logits,
)
from distill.models.llamacpp import have_llama_cpp
from distill.models.llamacpp import logits as llama_cpp_logits

HAVE_LLAMA = have_llama_cpp()
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed "
                                 "(pip install 'distill[llama]'): llama.cpp checks skipped")
PAD_ROWS = 64


def build_model(out: Path, tok_dir: str, arch: str) -> Path:
    """A random tiny model of `arch` with the SmolLM2 tokenizer, initialised as the module docstring says."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tok = AutoTokenizer.from_pretrained(tok_dir)
    common = dict(vocab_size=len(tok) + PAD_ROWS, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    elif arch == "llama3rope":  # scaled rope: every frequency below the original context is stretched
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0,
                                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 16}))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, tie_word_embeddings=False, sliding_window=None))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False, use_sliding_window=False))
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    with torch.no_grad():
        _init(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _init(model) -> None:
    import torch

    emb = model.model.embed_tokens.weight
    emb.normal_(0, 1.0)
    if not model.config.tie_word_embeddings:  # a separate head, close to the embedding so top-1 is clear
        model.lm_head.weight.copy_(emb + 0.3 * torch.randn_like(emb))
    for name, p in model.named_parameters():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            continue
        if "norm" in name:  # not all ones, so swapped norms would show
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif p.ndim == 1:  # q/k/v biases (qwen2): random, not the default zeros
            p.normal_(0, 0.15)
        elif "q_proj" in name or "k_proj" in name:
            p.normal_(0, 0.1)
        elif ".mlp." in name:
            p.normal_(0, 0.01)
        else:
            p.normal_(0, 0.03)


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_dir):
    """model_dir(arch) -> a saved tiny model, built once per module."""
    built = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_model(tmp_path_factory.mktemp(arch) / "model", smollm2_dir, arch)
        return built[arch]

    return get


@pytest.fixture(scope="module")
def f16_export(tmp_path_factory, model_dir):
    """f16_export(arch) -> (gguf path, report), exported once without the built-in check (tests check it)."""
    done = {}

    def get(arch: str):
        if arch not in done:
            out = tmp_path_factory.mktemp(f"{arch}-f16") / "model.gguf"
            done[arch] = out, export_gguf(model_dir(arch), out, "f16", verify=False)
        return done[arch]

    return get


def hf_logits(path: Path, ids_list):
    from distill.models.loading import load_causal_lm

    model = load_causal_lm(str(path), "float32").eval()
    return reference_logits(model, ids_list)


def assert_f16_match(ref, got):
    """Every position: same argmax, and max abs error at most 1% of the logit range."""
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        assert (r.argmax(1) == g.argmax(1)).all(), "top-1 differs at some position"
        span = r.max() - r.min()
        assert np.abs(r - g).max() <= 0.01 * span, f"max error {np.abs(r - g).max():.4f} > 1% of {span:.2f}"


def mean_correlation(ref, got) -> float:
    r, g = np.concatenate(ref), np.concatenate(got)
    r = r - r.mean(1, keepdims=True)
    g = g - g.mean(1, keepdims=True)
    return float(((r * g).sum(1) / np.sqrt((r * r).sum(1) * (g * g).sum(1))).mean())


# ---------------------------------------------------------------- f16 exactness

def test_probes_are_long_enough(tok):
    ids = probe_ids(tok)
    assert min(len(x) for x in ids) >= 16 and len(ids) >= 3


@needs_llama
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama3rope"])
def test_f16_matches_hf_in_llama_cpp(arch, model_dir, f16_export, tok):
    out, _ = f16_export(arch)
    ids = probe_ids(tok)
    assert_f16_match(hf_logits(model_dir(arch), ids), llama_cpp_logits(out, ids))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f16_matches_hf_in_transformers(arch, model_dir, f16_export, tok):
    out, _ = f16_export(arch)
    ids = probe_ids(tok)
    assert_f16_match(hf_logits(model_dir(arch), ids), transformers_logits(out, ids))


def test_tokenizer_and_layout_metadata(f16_export, tok):
    import gguf

    for arch, tied in (("llama", True), ("qwen2", False)):
        out, report = f16_export(arch)
        r = gguf.GGUFReader(str(out))
        tokens = r.fields["tokenizer.ggml.tokens"].contents()
        types = r.fields["tokenizer.ggml.token_type"].contents()
        assert len(tokens) == len(types) == len(tok) + PAD_ROWS == report["n_vocab"]
        assert tokens[: 3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        assert set(types[len(tok):]) == {int(gguf.TokenType.UNUSED)}
        assert types[tok.eos_token_id] == int(gguf.TokenType.CONTROL)
        assert len(r.fields["tokenizer.ggml.merges"].contents()) > 40000
        assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
        assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
        assert r.fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
        assert r.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
        assert r.fields["tokenizer.ggml.padding_token_id"].contents() == tok.pad_token_id
        assert r.fields["tokenizer.chat_template"].contents() == tok.chat_template
        names = {t.name: t.tensor_type.name for t in r.tensors}
        assert ("output.weight" in names) is not tied
        assert names["output_norm.weight"] == names["blk.0.attn_norm.weight"] == "F32"
        assert ("blk.0.attn_q.bias" in names) is (arch == "qwen2")


@needs_llama
def test_llama_cpp_tokenizes_like_transformers(f16_export, tok):
    """Pre-tokenizer name, merges and special tokens together decide this; compare on awkward text."""
    import llama_cpp

    out, _ = f16_export("llama")
    text = ("Hello  world!\n\tNumbers 12345 and 3.14, code: def f(x): return x**2  # ok\n"
            "Accents: café naïve — emoji 🙂 <|im_start|>user\nhi<|im_end|>")
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    assert got == tok(text, add_special_tokens=False)["input_ids"]


def _byte_fallback_tokenizer():
    """A small SentencePiece-style BPE (byte fallback, '▁' for spaces), as Mistral and Llama 2 use."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    corpus = [p.read_text() for p in sorted((Path(__file__).parents[1] / "distill").glob("*.py"))]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1200, special_tokens=specials, show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@needs_llama
def test_byte_fallback_tokenizer_exports_as_spm(tmp_path):
    import llama_cpp
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tok = _byte_fallback_tokenizer()
    cfg = MistralConfig(vocab_size=len(tok) + PAD_ROWS, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        sliding_window=None, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg)
    with torch.no_grad():
        _init(model)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    report = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16", verify="llama_cpp")
    assert report["tokenizer_model"] == "llama" and report["verify"]["passed"]
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        for text in ["Hello  world!\n\tdef f(x): return x**2", "caf\u00e9 \U0001f642", " leading space"]:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"]
    finally:
        llm.close()


# ---------------------------------------------------------------- quantized

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_k_m"])
def test_quantized_correlates_with_hf(arch, quant, model_dir, tmp_path, tok):
    if quant == "q4_k_m" and not HAVE_LLAMA:
        pytest.skip("llama-cpp-python is not installed: q4_k_m is made by llama.cpp")
    backend = "llama_cpp" if HAVE_LLAMA else "transformers"
    out = tmp_path / "model.gguf"
    report = export_gguf(model_dir(arch), out, quant, verify=backend)
    assert report["verify"]["passed"] and report["verify"]["backend"] == backend
    assert report["verify"]["pearson"] > 0.995
    if quant == "q4_k_m" and arch == "llama" and backend != "transformers":  # transformers reads K-quants too
        ids = probe_ids(tok)
        assert mean_correlation(hf_logits(model_dir(arch), ids), transformers_logits(out, ids)) > 0.995
    types = gguf_tensor_types(out)
    expected = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K"}[quant]
    assert types.get(expected, 0) >= 8, types
    assert "F16" not in types  # every matrix here has rows that fit the blocks


@needs_llama
def test_q4_k_m_calibrates_the_matrices_k_blocks_cannot_hold(tiny_model, tmp_path):
    """hidden 128: q/k/v/o/gate/up rows do not fit 256-wide K blocks (ffn_down's 256 do). With a recipe
    they become GPTQ IQ4_NL blocks calibrated on the training split, which llama.cpp copies unchanged;
    without one, llama.cpp's own Q5_0 fallback."""
    import gguf

    from distill.config import load_recipe
    from distill.data.splits import prepare_splits
    from distill.export.pipeline import calibrated_iq4_nl, calibration_sequences, load_source, narrow_matrices

    recipe = write_recipe(tmp_path / "r.yaml", write_class_data(tmp_path / "d.jsonl", copies=4), tmp_path / "w",
                          tiny_model)
    out = tmp_path / "cal.gguf"
    report = export_gguf(tiny_model, out, "q4_k_m", verify="llama_cpp", recipe=recipe)
    assert report["verify"]["passed"], report["verify"]
    assert report["calibrated"]["tensors"] == 12 and report["calibrated"]["type"] == "IQ4_NL"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    for i in range(2):
        for m in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{m}.weight"] == "IQ4_NL"
        assert types[f"blk.{i}.ffn_down.weight"] in ("Q4_K", "Q6_K")
    assert types["token_embd.weight"] == "Q5_0"

    # the file holds exactly the calibrated blocks (llama.cpp did not re-round them) ...
    model, tok, _ = load_source(Path(tiny_model))
    seqs = calibration_sequences(Path(tiny_model), recipe, tok)
    ours = calibrated_iq4_nl(model, narrow_matrices(model), seqs)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    for name, (_, blocks) in ours.items():
        np.testing.assert_array_equal(stored[name].reshape(blocks.shape), blocks)
    # ... calibrated on training examples only: never a holdout or validation text
    splits = prepare_splits(load_recipe(recipe).task, tmp_path / "w")
    texts = [tok.decode(s) for s in seqs]
    assert len(seqs) == len(splits.train)
    for ex in splits.holdout + splits.validation:
        assert not any(ex["text"] + "<|im_end|>" in t for t in texts)
    assert all(any(ex["text"] in t for t in texts) for ex in splits.train)

    # no recipe (the tiny model has no training.json): the uncalibrated fallback, said in the report
    plain = export_gguf(tiny_model, tmp_path / "plain.gguf", "q4_k_m", verify="llama_cpp")
    assert plain["calibrated"] is None and plain["verify"]["passed"]
    assert gguf_tensor_types(tmp_path / "plain.gguf").get("IQ4_NL", 0) == 0


# ---------------------------------------------------------------- LoRA, failures, CLI

def test_lora_adapter_is_merged(model_dir, tmp_path, tok):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from distill.models.loading import load_causal_lm

    base_dir = model_dir("llama")
    torch.manual_seed(1)
    peft_model = get_peft_model(load_causal_lm(str(base_dir)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                           init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    out = tmp_path / "merged.gguf"
    report = export_gguf(adapter, out, "f16", verify=True)
    assert report["adapter_merged"] and report["verify"]["passed"]

    ids = probe_ids(tok)
    merged = PeftModel.from_pretrained(load_causal_lm(str(base_dir)), str(adapter)).merge_and_unload().eval()
    got = (llama_cpp_logits if HAVE_LLAMA else transformers_logits)(out, ids)
    assert_f16_match(reference_logits(merged, ids), got)
    base = hf_logits(base_dir, ids)
    assert max(np.abs(b - g).max() for b, g in zip(base, got)) > 0.05 * (base[0].max() - base[0].min())


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UsageError, match="gpt2; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        export_gguf(tmp_path / "gpt2", tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_wrong_rotary_layout_is_caught(arch, model_dir, tmp_path, monkeypatch):
    """The check is sharp enough to see a Q/K layout bug (llama not permuted, qwen2 permuted)."""
    import distill.export.gguf_writer as gw

    if arch == "llama":
        monkeypatch.setattr(gw, "permute_rotary_rows", lambda w, n_heads: w)
    else:
        monkeypatch.setitem(gw.SUPPORTED_ARCHITECTURES, "Qwen2ForCausalLM", ("qwen2", True))
    out = tmp_path / "bad.gguf"
    with pytest.raises(DistillError, match="failed verification"):
        export_gguf(model_dir(arch), out, "f16", verify=True)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_q4_k_m_without_llama_cpp_says_what_to_install(model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(DistillError, match="pip install llama-cpp-python"):
        export_gguf(model_dir("llama"), tmp_path / "x.gguf", "q4_k_m")


def _run_cli(*args):
    from click.testing import CliRunner

    from distill.cli import cli

    return CliRunner().invoke(cli, ["export", *map(str, args)])


def test_cli_export_and_exit_codes(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    ok = _run_cli(model_dir("llama"), "--format", "gguf", "--quant", "q8_0", "--out", out)
    assert ok.exit_code == 0, ok.output
    assert out.is_file() and "verified with" in ok.output and "correlation" in ok.output

    bad_arch = tmp_path / "gpt2"
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(bad_arch)
    r = _run_cli(bad_arch, "--quant", "f16", "--out", tmp_path / "g.gguf")
    assert r.exit_code == 2 and "supported: LlamaForCausalLM" in r.output
    assert _run_cli(tmp_path / "missing", "--out", tmp_path / "g.gguf").exit_code == 2
    assert _run_cli(model_dir("llama"), "--quant", "q3", "--out", tmp_path / "g.gguf").exit_code == 2
    assert _run_cli(model_dir("llama"), "--format", "onnx", "--out", tmp_path / "g.gguf").exit_code == 2

    # An export below its quant's bar fails with status 1 and leaves neither the file nor a temp file.
    monkeypatch.setitem(THRESHOLDS, "q8_0", Thresholds(top1=1.0, pearson=1.01))
    failed = tmp_path / "failed"
    r = _run_cli(model_dir("llama"), "--quant", "q8_0", "--out", failed / "m.gguf")
    assert r.exit_code == 1 and "failed verification" in r.output
    assert not list(failed.iterdir())


# ---------------------------------------------------------------- interruption

EXPORT_KILLS = [("export_written", "SIGKILL"), ("export_verified", "SIGKILL"), ("export_written", "SIGTERM"),
                ("export_verified", "SIGINT"), ("random", "SIGKILL")]


def test_export_killed_at_any_point_leaves_no_file_and_reruns_to_the_same_bytes(model_dir, tmp_path):
    """`distill export` interrupted while its temp file is written, after verification just before the
    rename, and at a random moment: no (partial) output file appears, Ctrl-C / SIGTERM remove the temp
    file themselves, a SIGKILLed run's temp file is removed by the next export, and that export writes
    the same bytes as an uninterrupted one."""
    import os
    import random
    import signal
    import subprocess
    import time

    src = model_dir("llama")
    ref = tmp_path / "ref" / "m.gguf"
    cmd = lambda out: [sys.executable, "-m", "distill", "export", str(src), "--quant", "q8_0", "--out", str(out)]  # noqa: E731
    assert subprocess.run(cmd(ref), capture_output=True).returncode == 0
    rng = random.Random(11)
    for point, sig in EXPORT_KILLS:
        out = tmp_path / f"{point}-{sig}" / "m.gguf"
        out.parent.mkdir()
        env = dict(os.environ, DISTILL_TEST_PAUSE=f"{point}:60" if point != "random" else "")
        proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=sigint_default)
        try:
            if point == "random":
                time.sleep(rng.uniform(1.0, 6.0))
            else:  # wait until the run sits at the pause: the temp file complete, or also made readable (verified)
                def at_point():
                    tmps = list(out.parent.glob(".m.*.tmp.gguf"))
                    if not tmps or tmps[0].stat().st_size != ref.stat().st_size:
                        return False
                    return point == "export_written" or bool(tmps[0].stat().st_mode & 0o044)
                deadline = time.time() + 300
                while not at_point() and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.05)
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            proc.send_signal(getattr(signal, sig))
            rc = proc.wait(60)
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert not out.exists(), f"{point}/{sig}: an interrupted export left {out}"
        if sig != "SIGKILL":
            assert rc == 130 and "interrupted" in err and "Traceback" not in err, (rc, err[-1500:])
            assert not list(out.parent.iterdir()), list(out.parent.iterdir())
        r = subprocess.run(cmd(out), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert out.read_bytes() == ref.read_bytes(), f"{point}/{sig}: the rerun wrote other bytes"
        assert [p.name for p in out.parent.iterdir()] == ["m.gguf"], "leftovers of the killed run are removed"
