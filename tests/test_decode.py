"""Greedy decoding gives the same tokens in every runtime: the transformers backend batched and left-padded
against transformers' own generate one prompt at a time, the model's f16 GGUF in llama.cpp, and (slow) the
vLLM engine. A runtime that decoded differently would score a model on outputs it does not write."""
import subprocess
import sys

import pytest
import torch

from distill.evaluate.decode import greedy_backend, greedy_gguf
from distill.teacher.hf import HFTeacher

PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello in French, please, and then say goodbye.",
           "List three animals"]
NEW = 12


@pytest.fixture(scope="module")
def prompts(tiny_model):
    from transformers import AutoTokenizer

    from distill.data.prompts import chat_ids, stop_ids

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return [chat_ids(tok, [{"role": "user", "content": p}], True) for p in PROMPTS], stop_ids(tok)


def reference(model_dir, prompts, stops) -> list[list[int]]:
    """transformers' generate, one prompt at a time (no padding), cut before the first stop token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for p in prompts:
        with torch.no_grad():
            seq = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=stops,
                                 pad_token_id=stops[0])[0, len(p):].tolist()
        cut = next((j for j, t in enumerate(seq) if t in stops), len(seq))
        out.append(seq[:cut])
    return out


def test_batched_backend_decodes_like_one_prompt_at_a_time(tiny_model, prompts):
    ids, stops = prompts
    got = greedy_backend(HFTeacher(tiny_model, dtype="float32"), ids, NEW, stops, batch_size=3)
    assert got.responses == reference(tiny_model, ids, stops)
    assert got.new_tokens >= sum(map(len, got.responses)) and got.seconds > 0


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from distill.export.pipeline import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    export_gguf(tiny_model, out, "f16", verify=False)
    return out


def test_f16_gguf_decodes_like_the_hf_model(tiny_model, tiny_gguf, prompts):
    ids, stops = prompts
    assert greedy_gguf(tiny_gguf, ids, NEW, stops).responses == reference(tiny_model, ids, stops)
    assert greedy_gguf(tiny_gguf, ids, NEW, stops, parallel=1).responses == reference(tiny_model, ids, stops)


def one_at_a_time(path, prompts, max_new, stops) -> list[list[int]]:
    """llama-cpp-python's own decoding loop (Llama.generate, greedy), one prompt after another, cut before the
    first stop token: what the batched decoder must reproduce."""
    from distill.models.llamacpp import import_llama_cpp

    llm = import_llama_cpp().Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    out = []
    for p in prompts:
        toks = []
        for t in llm.generate(list(p), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            toks.append(int(t))
            if t in stops or len(toks) >= max_new:
                break
        out.append(toks[:-1] if toks and toks[-1] in stops else toks)
    llm.close()
    return out


@pytest.fixture(scope="module")
def chain_gguf(tmp_path_factory, smollm2_dir):
    """An f16 GGUF of a random untied tiny llama: each prompt's response is a chain of its own tokens."""
    pytest.importorskip("llama_cpp")
    from conftest import make_tiny_untied

    from distill.export.pipeline import export_gguf

    d = tmp_path_factory.mktemp("chain")
    export_gguf(make_tiny_untied(d / "model", smollm2_dir, 2, 0, 0.5), d / "m.gguf", "f16", verify=False)
    return d / "m.gguf"


@pytest.fixture(scope="module")
def mixed(chain_gguf):
    """Seven prompts of different lengths, a stop token that ends some of their responses early but not all
    (one the first prompt writes that another does not), and their responses decoded one at a time."""
    import random

    rng = random.Random(0)
    many = [[rng.randrange(200, 40000) for _ in range(n)] for n in (3, 17, 9, 40, 5, 26, 12)]
    free = one_at_a_time(chain_gguf, many, NEW, set())
    stops = [next(t for t in free[0][2:] if any(t not in r for r in free))]
    return many, stops, one_at_a_time(chain_gguf, many, NEW, set(stops))


@pytest.mark.parametrize("parallel", [1, 3, 16])
def test_batched_gguf_decodes_like_one_prompt_at_a_time(chain_gguf, mixed, parallel):
    many, stops, expected = mixed
    assert any(len(r) < NEW for r in expected) and any(len(r) == NEW for r in expected)  # both endings covered
    assert len({tuple(r) for r in expected}) == len(many)
    got = greedy_gguf(chain_gguf, many, NEW, stops, n_ctx=128, parallel=parallel)
    assert got.responses == expected  # in the prompts' order, though they finish in another
    assert got.new_tokens == sum(len(r) + (len(r) < NEW) for r in expected)


def test_batched_gguf_decodes_a_real_model_like_one_prompt_at_a_time(prompts):
    """The tiny models' next token hardly depends on anything but the last one; SmolLM2-135M's (the package's
    Q4_1 GGUF) does, so a sequence reading another's KV cache, or the wrong positions, would show here."""
    pytest.importorskip("llama_cpp")
    from conftest import TEACHER_SOURCE

    from distill.models.loading import _package_file

    ids, stops = prompts
    many = ids + [ids[3][:-5] + ids[1][-5:], ids[2] + ids[0][-5:]]
    path = _package_file(TEACHER_SOURCE)
    expected = one_at_a_time(path, many, 16, set(stops))
    assert any(len(r) < 16 for r in expected) and any(len(r) == 16 for r in expected)
    assert greedy_gguf(path, many, 16, stops, n_ctx=256, parallel=4).responses == expected


def test_batched_gguf_feeds_long_prompts_over_several_steps(chain_gguf, mixed):
    """A batch smaller than the prompts: prefill is cut into chunks, interleaved with other slots' decoding."""
    from distill.models.llamacpp_batch import BatchedLlama

    many, stops, _ = mixed
    llm = BatchedLlama(chain_gguf, room=128, parallel=3, n_threads=1, n_batch=8)
    try:
        written = llm.greedy(many, 5, stops)
        assert written == [r[:5] + ([stops[0]] if len(r) < 5 else []) for r in
                           one_at_a_time(chain_gguf, many, 5, set(stops))]
        assert llm.greedy(many[:2], 5, stops) == written[:2]  # a second call starts from an empty cache
    finally:
        llm.close()


def test_batched_gguf_stops_at_the_sequence_room(chain_gguf, mixed):
    from distill.errors import DistillError
    from distill.models.llamacpp_batch import BatchedLlama

    many, _, _ = mixed
    llm = BatchedLlama(chain_gguf, room=256, parallel=2, n_threads=1)
    try:
        room, short = llm.room, many[0]
        assert [len(r) for r in llm.greedy([short], 10_000, [])] == [room - len(short) + 1]
        with pytest.raises(DistillError, match="no room"):
            llm.greedy([[short[0]] * room], 4, [])
    finally:
        llm.close()


VLLM_SCRIPT = """
import json, sys
from distill.config import TeacherSpec
from distill.evaluate.decode import greedy_backend
from distill.teacher.vllm_engine import VLLMTeacher

def main():
    model, prompts, stops, out = sys.argv[1], *map(json.loads, sys.argv[2:4]), sys.argv[4]
    spec = TeacherSpec(name="t", source=model, dtype="float32", max_model_len=128, cpu_kvcache_space_gib=1)
    eng = VLLMTeacher(model, spec, 1)
    res = greedy_backend(eng, prompts, %d, stops).responses
    eng.close()
    open(out, "w").write(json.dumps(res))

if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()
""" % NEW


@pytest.mark.slow
def test_vllm_engine_decodes_like_the_hf_model(tiny_model, prompts, tmp_path):
    pytest.importorskip("vllm")
    import json

    ids, stops = prompts
    (tmp_path / "engine.py").write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "engine.py"), tiny_model, json.dumps(ids), json.dumps(stops),
                           str(tmp_path / "out.json")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text()) == reference(tiny_model, ids, stops)
