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


def test_f16_gguf_decodes_like_the_hf_model(tiny_model, prompts, tmp_path):
    pytest.importorskip("llama_cpp")
    from distill.export.pipeline import export_gguf

    ids, stops = prompts
    out = tmp_path / "m.gguf"
    export_gguf(tiny_model, out, "f16", verify=False)
    assert greedy_gguf(out, ids, NEW, stops).responses == reference(tiny_model, ids, stops)


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
