"""On-policy and mixed distillation (train.on_policy, distill/train/onpolicy.py): a run killed with
SIGKILL after scoring rounds past its last checkpoint resumes to the uninterrupted run's weights without
asking the teacher again for those rounds; fraction 0 is the off-policy run, bit for bit; the
single-sample reverse-KL estimator against exact enumeration; the recipe's refusals.

The teacher here is the transformers backend (its calls are counted); tests/test_server.py scores an
on-policy round through a real vLLM server against it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import GEN_ROWS, ROOT, make_tiny_untied

from distill.cache import store as cache_mod
from distill.cache.generate import run_generate
from distill.config import load_recipe
from distill.errors import UsageError
from distill.train import run_train


@pytest.fixture(scope="module")
def gen(tmp_path_factory, smollm2_dir):
    """A 2-layer teacher, its top-k cache of 10 data responses, a 1-layer student with LoRA; 6 training
    examples in batches of 3, 2 epochs: 4 rounds, a checkpoint every 2 steps."""
    tmp = tmp_path_factory.mktemp("onpolicy")
    teacher = make_tiny_untied(tmp / "teacher", smollm2_dir, layers=2, seed=5, head_std=0.2)
    student = make_tiny_untied(tmp / "student-init", smollm2_dir, layers=1, seed=6, head_std=0.2)
    data = tmp / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    r = {"workdir": str(tmp / "work"), "teacher": teacher,
         "task": {"type": "generation", "data": str(data), "split": {"validation": 0.2, "holdout": 0.2},
                  "max_length": 48},
         "generate": {"k": 8, "batch_size": 4, "shard_size": 4},
         "train": {"alpha": 0.8, "temperature": 1.0, "epochs": 2, "lr": 3e-3, "batch_size": 3, "loss": "jsd",
                   "jsd_beta": 0.5, "checkpoint_every": 2, "student": {"model": student},
                   # LoRA dropout draws from the training RNG: the student's sampling must leave it as it was
                   "lora": {"r": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["q_proj", "v_proj"]},
                   "on_policy": {"fraction": 0.6, "max_new_tokens": 8}}}
    p = tmp / "gen.yaml"
    p.write_text(yaml.safe_dump(r))
    run_generate(load_recipe(p), backend="transformers")
    return tmp, p


def variant(tmp: Path, base: Path, name: str, **on_policy) -> Path:
    r = yaml.safe_load(base.read_text())
    if on_policy.pop("drop", False):
        r["train"].pop("on_policy")
    else:
        r["train"]["on_policy"].update(on_policy)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.fixture
def teacher_calls(monkeypatch):
    """Counts the transformers teacher's loads and top-k calls (sequences scored)."""
    from distill.teacher.hf import HFTeacher

    calls = {"loads": 0, "topk": 0, "sequences": 0}
    init, topk = HFTeacher.__init__, HFTeacher.topk

    def counted_init(self, *a, **kw):
        calls["loads"] += 1
        init(self, *a, **kw)

    def counted_topk(self, seqs, positions, k):
        calls["topk"] += 1
        calls["sequences"] += len(seqs)
        return topk(self, seqs, positions, k)

    monkeypatch.setattr(HFTeacher, "__init__", counted_init)
    monkeypatch.setattr(HFTeacher, "topk", counted_topk)
    return calls


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def rounds(out: Path) -> dict[int, dict]:
    m = cache_mod.read_manifest(out / "onpolicy")
    return {s["number"]: cache_mod.read_shard(out / "onpolicy", s, "topk") for s in m.shards}


def test_killed_on_policy_run_resumes_to_the_same_weights_without_rescoring(gen, teacher_calls):
    tmp, p = gen
    full = run_train(load_recipe(p), out=str(tmp / "full"))
    info = json.loads((full / "training.json").read_text())["on_policy"]
    scored = rounds(full)
    assert info["rounds_scored"] == len(scored) == teacher_calls["topk"] and info["rounds_read"] == 0
    assert teacher_calls["loads"] == 1 and teacher_calls["sequences"] == info["sequences"]
    assert 0 < info["sequences"] < 12  # mixed: some of the 4 rounds x 3 sequences
    later = [n for n in sorted(scored) if n >= 2]  # rounds after the step-2 checkpoint
    assert later
    kill_at = sorted(scored).index(later[0]) + 1  # the run is killed after writing this many rounds
    # the student's own responses: prompts from the cache, responses that are not the data's
    cached = cache_mod.load_split(tmp / "work" / "cache", "train")
    for data in scored.values():
        for j, i in enumerate(data["index"].tolist()):
            e, c = cache_mod.example_topk(data, j), cache_mod.example_topk(cached, i)
            n = int(c.positions[0])
            assert torch.equal(e.sequence[:n], c.sequence[:n]) and int(e.positions[0]) == n
            assert not torch.equal(e.sequence, c.sequence)
            assert e.topk_ids.shape == (len(e.positions), 8)

    # a real `distill train`, held just after writing its first round past the step-2 checkpoint, then SIGKILL
    out = tmp / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DISTILL_TEST_PAUSE=f"round_written:300:{kill_at}")
    log = tmp / "killed.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "distill", "train", str(p), "--out", str(out)], env=env,
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            m = out / "onpolicy" / "manifest.json"
            if m.is_file() and len(json.loads(m.read_text())["shards"]) == kill_at:
                break
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = sorted(rounds(out))
    assert before == sorted(scored)[:kill_at]
    last = max(int(c.name.split("-")[1]) for c in (out / "checkpoints").glob("step-*"))
    assert last == 2 and max(before) >= last  # a round scored after the checkpoint the run resumes from

    calls_before = dict(teacher_calls)
    run_train(load_recipe(p), out=str(out), resume=True)
    resumed = json.loads((out / "training.json").read_text())["on_policy"]
    assert resumed["rounds_read"] == len([r for r in before if r >= last])  # read back, not scored again
    assert teacher_calls["topk"] - calls_before["topk"] == len(scored) - len(before) == resumed["rounds_scored"]
    assert_same_weights(full, out)
    again = rounds(out)
    assert sorted(again) == sorted(scored)
    for n in scored:
        assert all(torch.equal(again[n][key], scored[n][key]) for key in scored[n])


def test_fraction_zero_is_the_off_policy_run(gen, teacher_calls):
    """fraction 0 with other on_policy settings: the same weights, bit for bit, as a recipe without
    the key; no teacher loaded, no rounds, and checkpoints that do not name on_policy (so a checkpoint
    of a run from before on-policy training existed resumes)."""
    tmp, p = gen
    a = run_train(load_recipe(variant(tmp, p, "no-key", drop=True)), out=str(tmp / "no-key"))
    b = run_train(load_recipe(variant(tmp, p, "zero", fraction=0.0, max_new_tokens=3, temperature=0.3)),
                  out=str(tmp / "zero"))
    assert_same_weights(a, b)
    assert teacher_calls == {"loads": 0, "topk": 0, "sequences": 0}
    assert not (a / "onpolicy").exists() and not (b / "onpolicy").exists()
    info = json.loads((b / "training.json").read_text())
    assert "on_policy" not in info
    ck = sorted((b / "checkpoints").glob("step-*"))[-1]
    assert "on_policy" not in torch.load(ck / "state.pt", weights_only=False)["train"]
    la = [json.loads(x) for x in (a / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in la] == [r.get("loss") for r in lb]


def test_sampled_reverse_kl_is_unbiased_over_the_student_buckets():
    """Enumerating every bucket b the student could sample: sum_b q(b) * value(b) is the bucket reverse
    KL, and sum_b q(b) * grad(b) its gradient."""
    from distill.train.losses import divergence, sampled_reverse_kl, student_buckets, teacher_buckets

    torch.manual_seed(0)
    V, k = 12, 4
    logits = torch.randn(1, V, dtype=torch.float64) * 2
    t_lp = torch.log_softmax(torch.randn(V, dtype=torch.float64) * 2, -1)
    vals, ids = t_lp.topk(k)
    vals, ids = vals[None].float(), ids[None]
    vals[0, -1] = float("-inf")  # a slot with no teacher entry: its id stays in the tail bucket
    tail = (1 - vals.exp().sum(-1)).float()
    z = logits.clone().float().requires_grad_(True)
    logp, logq = teacher_buckets(vals, tail), student_buckets(z, ids, ~torch.isneginf(vals))
    kl = divergence(logp, logq, "reverse_kl")
    (grad_kl,) = torch.autograd.grad(kl.sum(), z)
    q = torch.softmax(logits.float(), -1)[0]
    exp_value, exp_grad = torch.zeros(()), torch.zeros_like(z)
    for token in range(V):  # the student samples `token` with probability q[token]
        z.grad = None
        est = sampled_reverse_kl(z, torch.tensor([token]), ids, vals, tail, reduction="sum")
        est.backward()
        exp_value += q[token] * est.detach()
        exp_grad += q[token] * z.grad
    assert exp_value.item() == pytest.approx(kl.item(), rel=1e-5)
    torch.testing.assert_close(exp_grad, grad_kl, atol=1e-6, rtol=1e-4)


def test_on_policy_recipe_keys_are_checked(gen, tmp_path):
    tmp, p = gen
    cases = [("train.on_policy.fraction=1.5", r"train.on_policy.fraction: expected a number in \[0, 1\], got 1.5"),
             ("train.on_policy.fractoin=0.5",
              r"unknown key 'train.on_policy.fractoin' \(did you mean 'train.on_policy.fraction'"),
             ("train.on_policy.loss=forward", r"train.on_policy.loss: expected one of .*sampled_reverse_kl"),
             ("train.alpha=0", r"train.on_policy.fraction > 0 needs train.alpha > 0"),
             ("train.on_policy.loss=sampled_reverse_kl", None)]  # T = 1, sampling at 1: accepted
    for item, pattern in cases:
        if pattern is None:
            load_recipe(p, [item])
            continue
        with pytest.raises(UsageError, match=pattern):
            load_recipe(p, [item])
    with pytest.raises(UsageError,
                       match=r"set train.temperature, train.on_policy.temperature and train.on_policy.top_p "
                             r"to 1 \(got 2, 1 and 1\)"):
        load_recipe(p, ["train.on_policy.loss=sampled_reverse_kl", "train.temperature=2"])
    r = yaml.safe_load(p.read_text())
    r["task"] = {"type": "classification", "data": "builtin:default"}
    cls = tmp_path / "cls.yaml"
    cls.write_text(yaml.safe_dump(r))
    with pytest.raises(UsageError, match=r"on-policy sampling needs task.type generation, got 'classification'"):
        load_recipe(cls)
    # `distill train --teacher-url` reaches the trainer, which refuses it for an off-policy recipe
    from click.testing import CliRunner

    from distill.cli import cli

    res = CliRunner().invoke(cli, ["train", str(variant(tmp, p, "zero-url", fraction=0.0)), "--out",
                                   str(tmp_path / "x"), "--teacher-url", "http://127.0.0.1:9"])
    assert res.exit_code == 2 and "--teacher-url: the teacher is asked during training only with " \
        "train.on_policy.fraction > 0" in res.output, res.output


@pytest.mark.parametrize("on_loss", [None, "sampled_reverse_kl"])
def test_a_mixed_batch_has_no_ce_on_the_students_tokens(gen, on_loss):
    """Round.loss_sums over a batch of one cached and one student-written sequence equals a direct
    computation: CE and train.loss on the cached one, train.on_policy.loss (or train.loss) alone on the other."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from distill.train.losses import sampled_reverse_kl, sparse_kd
    from distill.train.onpolicy import Round

    tmp, p = gen
    cfg = load_recipe(p, [f"train.on_policy.loss={on_loss or 'null'}"]).train
    model = AutoModelForCausalLM.from_pretrained(cfg.student.model).eval()
    data = cache_mod.load_split(tmp / "work" / "cache", "train")
    cached = [cache_mod.example_topk(data, i) for i in range(2)]
    cached = [cache_mod.TopkExample(e.sequence.long(), e.positions.long(), e.topk_ids.long(), e.topk_logprobs.float(),
                                    e.tail_mass.float()) for e in cached]
    task = SimpleNamespace(train=cached, pad=0)
    e, n = cached[1], int(cached[1].positions[0])  # "student-written": the response reversed, same teacher rows
    written = {1: cache_mod.TopkExample(torch.cat([e.sequence[:n], e.sequence[n:].flip(0)]), e.positions, e.topk_ids,
                                        e.topk_logprobs, e.tail_mass)}
    kw = {"beta": 0.5}
    with torch.no_grad():
        kd, ce = Round(task, written, cfg).loss_sums(model, [0, 1], kw)
        ref_kd = ref_ce = 0.0
        for e, on in ((cached[0], False), (written[1], True)):
            logits = model(e.sequence[None]).logits[0, e.positions - 1]
            args = (logits, e.topk_ids, e.topk_logprobs, e.tail_mass)
            if not on:
                ref_ce += torch.nn.functional.cross_entropy(logits, e.sequence[e.positions], reduction="sum").item()
                ref_kd += sparse_kd(*args, 1.0, "jsd", reduction="sum", beta=0.5).item()
            elif on_loss:
                ref_kd += sampled_reverse_kl(logits, e.sequence[e.positions], *args[1:], reduction="sum").item()
            else:
                ref_kd += sparse_kd(*args, 1.0, "jsd", reduction="sum", beta=0.5).item()
    assert ce.item() == pytest.approx(ref_ce, rel=1e-5) and ce.item() > 0
    assert kd.item() == pytest.approx(ref_kd, rel=1e-4, abs=1e-7) and kd.item() != 0


def test_rounds_at_their_own_k_train_beside_the_caches_rows(gen, tmp_path):
    """train.on_policy.k = 16 over a cache of k = 8: the rounds hold the teacher's top 16 at the student's
    tokens, a run mixing them with the cache's rows trains, and padding an 8-wide row to 16 with filler
    leaves its loss as it was."""
    from distill.train.losses import sparse_kd
    from distill.train.onpolicy import topk_rows

    tmp, p = gen
    out = tmp_path / "k16"
    run_train(load_recipe(variant(tmp_path, p, "k16", k=16), ["train.max_steps=2"]), out=str(out))
    rs = rounds(out)
    assert rs and all(r["topk_ids"].shape[-1] == 16 for r in rs.values())
    assert json.loads((out / "training.json").read_text())["on_policy"]["k"] == 16
    data = cache_mod.load_split(tmp / "work" / "cache", "train")
    narrow = cache_mod.example_topk(data, 0)
    r0 = next(iter(rs.values()))
    wide = cache_mod.example_topk(r0, 0)
    ids, lps, tail = topk_rows([narrow, wide], "cpu")
    assert ids.shape[-1] == 16 and bool(torch.isneginf(lps[: len(narrow.positions), 8:]).all())
    torch.manual_seed(0)
    logits = torch.randn(len(narrow.positions), 49152)
    n = len(narrow.positions)
    padded = sparse_kd(logits, ids[:n].long(), lps[:n], tail[:n], 1.0, "jsd", reduction="sum", beta=0.5)
    plain = sparse_kd(logits, narrow.topk_ids.long(), narrow.topk_logprobs.float(), narrow.tail_mass.float(), 1.0,
                      "jsd", reduction="sum", beta=0.5)
    assert padded.item() == pytest.approx(plain.item(), rel=1e-5)
