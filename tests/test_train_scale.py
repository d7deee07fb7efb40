"""Student training at scale: multi-process parity (DDP, DeepSpeed ZeRO-2) with real `accelerate
launch` runs of 2 CPU processes, resume after an interruption, token-level distillation, the loss
family from recipe keys, schedules, early stopping, student options, and refusals."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import GEN_ROWS as SHARED_GEN_ROWS
from conftest import ROOT, make_tiny_untied, sigint_default, write_class_data, write_recipe

from distill.cache import store as cache_mod
from distill.cache.generate import run_generate
from distill.config import load_recipe
from distill.errors import UsageError
from distill.train import run_train

# Tolerance of the multi-process runs against the single-process run: the same global batch, the
# same math; only the order of floating-point sums differs (gloo all-reduce, 1 vs 2 threads).
# Measured differences are about 1e-6 relative; we allow 1e-4 relative (+1e-5 absolute).
PARITY_RTOL, PARITY_ATOL = 1e-4, 1e-5

GEN_ROWS = SHARED_GEN_ROWS + [
    {"prompt": "Sound a cat makes?", "response": "A cat says meow."},
    {"prompt": "First month of the year?", "response": "January comes first."},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    bindir = str(Path(sys.executable).parent)  # `accelerate` and `distill` of this environment
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT),
               PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("LOCAL_RANK", None)
    return env


def launch(config: str, *args, timeout=600):
    """A real `accelerate launch` of 2 processes on this CPU-only machine."""
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "recipes/accelerate" / config),
           "--num_processes", "2", "--main_process_port", str(_free_port()), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def log_of(out: Path):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def steps_of(out: Path):
    return [r for r in log_of(out) if "loss" in r]



@pytest.fixture(scope="module")
def cls(tmp_path_factory, smollm2_dir):
    """A 2-layer random teacher, its soft-label cache, and a recipe for a 1-layer student."""
    tmp = tmp_path_factory.mktemp("scale")
    model = make_tiny_untied(tmp / "model", smollm2_dir, layers=2, seed=3, head_std=0.4)
    data = write_class_data(tmp / "d.jsonl")
    # 21 examples, global batch 4 in micro-batches, accumulation 2: the last batch of each epoch holds
    # one example, so one of two processes gets none (it must still take part in the all-reduce)
    recipe = write_recipe(tmp / "r.yaml", data, tmp / "work", model, student={"num_layers": 1}, epochs=2,
                          grad_accum=2, train_examples=21, lr=2e-3, warmup_ratio=0.2, checkpoint_every=2)
    run_generate(load_recipe(recipe), backend="transformers")
    return tmp, recipe


def _recipe_variant(tmp: Path, base: Path, name: str, **train) -> Path:
    r = yaml.safe_load(base.read_text())
    r["train"].update(train)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


# -------------------------------------------------------------------------------------------------
# multi-process parity


def test_ddp_and_zero2_match_single_process_and_save_a_model_that_evaluates(cls):
    tmp, recipe = cls
    single = run_train(load_recipe(recipe), out=str(tmp / "single"))
    ddp = tmp / "ddp"
    launch("ddp.yaml", "-m", "distill", "train", recipe, "--out", ddp)
    # ZeRO-2 through the console entry point, interrupted after 3 optimizer steps and resumed
    z2 = tmp / "zero2"
    launch("zero2.yaml", "--no_python", "distill", "train", recipe, "--out", z2, "--stop-after-steps", "3")
    assert not (z2 / "training.json").exists() and (z2 / "checkpoints" / "step-00000003").is_dir()
    launch("zero2.yaml", "--no_python", "distill", "train", recipe, "--out", z2, "--resume")

    ref = steps_of(single)
    assert len(ref) == 6  # 2 epochs x 6 batches / accumulation 2
    for out, kind in ((ddp, "MULTI_CPU"), (z2, "DEEPSPEED")):
        info = json.loads((out / "training.json").read_text())
        assert info["world_size"] == 2 and info["distributed"] == kind
        got = steps_of(out)
        assert [r["step"] for r in got] == [r["step"] for r in ref]
        for key in ("loss", "kd", "ce", "lr"):
            torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in ref]),
                                       rtol=PARITY_RTOL, atol=PARITY_ATOL, msg=f"{out.name}: {key}")
        evs = [r for r in log_of(out) if "val_loss" in r]
        ref_evs = [r for r in log_of(single) if "val_loss" in r]
        torch.testing.assert_close(torch.tensor([r["val_loss"] for r in evs]),
                                   torch.tensor([r["val_loss"] for r in ref_evs]),
                                   rtol=PARITY_RTOL, atol=PARITY_ATOL)
    assert json.loads((z2 / "training.json").read_text())["resumed_from"].endswith("step-00000003")
    assert json.loads((z2 / "training.json").read_text())["zero_stage"] == 2
    # the saved student (a plain HF directory) loads and evaluates, and its predictions match single-process
    from distill.evaluate.evaluation import run_eval

    reports = {n: run_eval(str(d), load_recipe(recipe), split="holdout", out=str(tmp / "eval" / n))
               for n, d in (("single", single), ("ddp", ddp), ("zero2", z2))}
    assert reports["ddp"]["n"] == reports["single"]["n"] > 0
    preds = {n: [json.loads(x)["predicted"] for x in (tmp / "eval" / n / "predictions.jsonl").read_text().splitlines()]
             for n in reports}
    assert preds["ddp"] == preds["single"] == preds["zero2"]
    # checkpoints: the last two kept, complete (no temporary directories left)
    names = sorted(p.name for p in (ddp / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006"]


# -------------------------------------------------------------------------------------------------
# resume


def _trainable(ck: Path):
    from safetensors.torch import load_file

    return load_file(str(ck / "trainable.safetensors"))


def _assert_same_run(a: Path, b: Path, tol=1e-6):
    wa, wb = _trainable(a / "checkpoints" / "step-00000006"), _trainable(b / "checkpoints" / "step-00000006")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, f"weights differ by {worst}"
    la, lb = steps_of(a), steps_of(b)
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=tol, abs=tol)
    from safetensors.torch import load_file

    ma, mb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert max((ma[k] - mb[k]).abs().max().item() for k in ma) <= tol
    return worst


@pytest.fixture(scope="module")
def lora_recipe(cls):
    tmp, recipe = cls
    # LoRA with dropout: resuming must restore the RNG too, or the dropout masks (and weights) differ
    r = _recipe_variant(tmp, recipe, "lora", checkpoint_every=1, epochs=2, train_examples=12, grad_accum=1,
                        lora={"r": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["q_proj", "v_proj"]})
    full = run_train(load_recipe(r), out=str(tmp / "lora-full"))
    return r, full


def test_stopped_then_resumed_run_equals_the_uninterrupted_run(cls, lora_recipe):
    tmp, _ = cls
    r, full = lora_recipe
    out = tmp / "lora-stop"
    run_train(load_recipe(r), out=str(out), stop_after_steps=4)
    assert not (out / "training.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    run_train(load_recipe(r), out=str(out), resume=True)
    worst = _assert_same_run(full, out)
    assert worst == 0.0  # bitwise on CPU
    info = json.loads((out / "training.json").read_text())
    assert info["resumed_from"].endswith("step-00000004") and info["steps"] == 6


def test_sigkill_after_a_checkpoint_then_resume_equals_the_uninterrupted_run(cls, lora_recipe):
    tmp, _ = cls
    r, full = lora_recipe
    out = tmp / "lora-kill"
    cmd = [sys.executable, "-m", "distill", "train", str(r), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if ((out / "checkpoints").is_dir()
                    and any(p.name.startswith("step-") for p in (out / "checkpoints").iterdir())):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "training.json").exists()
    run_train(load_recipe(r), out=str(out), resume=True)
    assert _assert_same_run(full, out) <= 1e-6
    assert json.loads((out / "training.json").read_text())["resumed_from"]


# Kill points inside the writes themselves (DISTILL_TEST_PAUSE holds the run there until the signal):
# a checkpoint written but not yet renamed into place (the 3rd of 6), the best model written but not
# yet moved into OUT (end of epoch 1), and two moments picked at random: a random step's checkpoint
# appearing plus a random delay of up to 50 ms (a step of this tiny run takes about 100 ms).
RNG_KILL = __import__("random").Random(20261128)
KILL_POINTS = [("checkpoint_written:60:3", signal.SIGKILL), ("model_written:60:1", signal.SIGKILL),
               ("checkpoint_written:60:3", signal.SIGTERM), ("model_written:60:1", signal.SIGINT),
               (f"random:{RNG_KILL.randint(1, 4)}:{RNG_KILL.uniform(0.0, 0.05):.3f}", signal.SIGKILL),
               (f"random:{RNG_KILL.randint(1, 4)}:{RNG_KILL.uniform(0.0, 0.05):.3f}", signal.SIGKILL)]


def _paused(out: Path, point: str) -> bool:
    if point.startswith("checkpoint_written"):
        return any((d / "trainer_state.json").is_file() for d in (out / "checkpoints").glob(".tmp-step-*"))
    if point.startswith("model_written"):
        return (out / ".tmp-model" / "tokenizer_config.json").is_file()
    return (out / "checkpoints" / f"step-{int(point.split(':')[1]):08d}").is_dir()  # random: after step N


@pytest.mark.parametrize("point,sig", KILL_POINTS,
                         ids=[f"{p.split(':')[0]}-{s.name}-{i}" for i, (p, s) in enumerate(KILL_POINTS)])
def test_killed_mid_write_then_resumed_equals_the_uninterrupted_run(cls, lora_recipe, point, sig):
    tmp, _ = cls
    r, full = lora_recipe
    out = tmp / f"lora-{point.split(':')[0]}-{sig.name}-{abs(hash(point)) % 1000}"
    env = _env()
    if not point.startswith("random"):
        env["DISTILL_TEST_PAUSE"] = point
    proc = subprocess.Popen([sys.executable, "-m", "distill", "train", str(r), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=sigint_default)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not _paused(out, point):
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read()[-2000:]
        if point.startswith("random"):
            time.sleep(float(point.split(":")[2]))
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig != signal.SIGKILL:  # Ctrl-C / SIGTERM: a clean stop that says how to continue, partial copies removed
        assert rc == 130 and "interrupted" in err and "Traceback" not in err, (rc, err[-2000:])
        assert not list(out.rglob(".tmp-*")), list(out.rglob(".tmp-*"))
    assert not (out / "training.json").exists()
    for ck in (out / "checkpoints").glob("step-*"):  # every checkpoint that was published is whole
        assert (ck / "state.pt").is_file() and (ck / "trainable.safetensors").is_file()
    run_train(load_recipe(r), out=str(out), resume=True)
    assert _assert_same_run(full, out) <= 1e-6
    assert not list(out.rglob(".tmp-*")), "a resumed run clears what a killed one left half-written"


def test_checkpoint_on_a_full_disk_stops_cleanly_and_resumes(cls, small_disk):
    """Full fine-tuning (weights + Adam state in every checkpoint) on a tmpfs with room for about
    one and a half checkpoints: the second one cannot be written."""
    tmp, recipe = cls
    r = _recipe_variant(tmp, recipe, "full-disk", checkpoint_every=1, epochs=1, train_examples=12, grad_accum=1)
    ref = run_train(load_recipe(r), out=str(tmp / "full-disk-ref"))
    ck = sorted((ref / "checkpoints").glob("step-*"))[-1]
    ck_bytes = sum(f.stat().st_size for f in ck.rglob("*") if f.is_file())
    model_bytes = (ref / "model.safetensors").stat().st_size
    size_kb = (int(1.5 * ck_bytes) + model_bytes // 2) // 1024
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(small_disk)],
                       capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {m.stderr.strip()}")
    out = small_disk / "student"
    p = subprocess.run([sys.executable, "-m", "distill", "train", str(r), "--out", str(out)],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    assert "no space left" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    kept = sorted(d.name for d in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-00000001"], kept
    assert not list(out.rglob(".tmp-*")), "the partial checkpoint is removed"
    before = _trainable(out / "checkpoints" / "step-00000001")
    subprocess.run(["mount", "-o", f"remount,size={4 * size_kb + 4 * model_bytes // 1024}k", str(small_disk)],
                   check=True)
    p = subprocess.run([sys.executable, "-m", "distill", "train", str(r), "--out", str(out), "--resume"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stderr and before.keys() == _trainable(out / "checkpoints" / "step-00000003").keys()
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [x["loss"] for x in steps_of(ref)] == pytest.approx([x["loss"] for x in steps_of(out)], rel=1e-6)


def test_resume_refuses_a_checkpoint_of_other_settings(cls, lora_recipe):
    tmp, _ = cls
    r, full = lora_recipe
    other = _recipe_variant(tmp, r, "lora-other", lr=5e-3)
    with pytest.raises(UsageError, match=r"train\.lr: checkpoint 0\.002, now 0\.005"):
        run_train(load_recipe(other), out=str(full), resume=True)


def test_a_labelled_subset_takes_the_cached_rows_of_its_own_examples(cls):
    """train.train_examples picks a stratified sample; the teacher's soft labels used for it must be the
    cached rows of those same examples (a first-N slice of the cache would silently misalign them)."""
    from distill.config import resolve_teacher
    from distill.data.splits import prepare_splits
    from distill.models.loading import load_tokenizer, resolve_model_path
    from distill.student.build import build_student
    from distill.train.tasks import ClassificationTask

    tmp, recipe = cls
    r = load_recipe(_recipe_variant(tmp, recipe, "subset", train_examples=7, eval_examples=3))
    splits = prepare_splits(r.task, r.workdir)
    base = resolve_model_path(resolve_teacher(r.teacher).source)
    task = ClassificationTask(r, splits, load_tokenizer(base), build_student(r.train.student, base),
                              r.workdir_path / "cache")
    cached = cache_mod.load_split(r.workdir_path / "cache", "train", len(splits.train))["label_logprobs"]
    labels = splits.labels
    assert len(task.train) == 7 and len({int(g) for g in task.gold}) == len(labels)  # every class kept
    from distill.data.sampling import subset_indices

    idx = subset_indices(splits.train, 7, r.task.split.seed)
    torch.testing.assert_close(task.teacher, cached[idx], atol=0.0, rtol=0.0)
    assert [labels.index(splits.train[i]["label"]) for i in idx] == task.gold.tolist()
    assert not torch.equal(task.teacher, cached[:7])


# -------------------------------------------------------------------------------------------------
# token-level distillation (generation)


@pytest.fixture(scope="module")
def gen(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("gen")
    model = make_tiny_untied(tmp / "model", smollm2_dir, layers=2, seed=5, head_std=0.4)
    student = make_tiny_untied(tmp / "student-init", smollm2_dir, layers=1, seed=6, head_std=0.4)
    data = tmp / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    r = {"workdir": str(tmp / "work"), "teacher": model,
         "task": {"type": "generation", "data": str(data), "split": {"validation": 0.2, "holdout": 0.2},
                  "max_length": 64},
         "generate": {"k": 8, "batch_size": 4, "shard_size": 4},
         "train": {"alpha": 0.5, "temperature": 2.0, "epochs": 2, "lr": 2e-3, "batch_size": 4,
                   "loss": "jsd", "jsd_beta": 0.3, "student": {"model": student}}}
    p = tmp / "gen.yaml"
    p.write_text(yaml.safe_dump(r))
    run_generate(load_recipe(p), backend="transformers")
    return tmp, p


def test_token_level_loss_uses_the_cached_distribution_at_t_minus_1(gen):
    """The trainer's KD and CE sums for one example equal a dense reference from a plain forward pass."""
    from distill.data.splits import prepare_splits
    from distill.models.loading import load_tokenizer
    from distill.train.losses import divergence, teacher_buckets
    from distill.train.tasks import GenerationTask

    tmp, p = gen
    recipe = load_recipe(p)
    from distill.student.build import build_student

    model = build_student(recipe.train.student, recipe.teacher).eval()
    tok = load_tokenizer(recipe.teacher)
    splits = prepare_splits(recipe.task, recipe.workdir)
    task = GenerationTask(recipe, splits, tok, model, tmp / "work" / "cache")
    kw = {"beta": 0.3}
    with torch.no_grad():
        kd, ce = task.loss_sums(model, [0, 2], kw)
        ref_kd = ref_ce = 0.0
        data = cache_mod.load_split(tmp / "work" / "cache", "train")
        for i in (0, 2):
            e = cache_mod.example_topk(data, i)
            ids, pos, top_ids, top_lp, tail = e.sequence, e.positions, e.topk_ids, e.topk_logprobs, e.tail_mass
            logits = model(ids[None].long()).logits[0].float()
            for r, t in enumerate(pos.tolist()):
                logq_full = torch.log_softmax(logits[t - 1], -1)  # the logits at t-1 predict token t
                logq_top = logq_full[top_ids[r].long()]
                logq = torch.cat([logq_top, torch.log1p(-logq_top.exp().sum())[None]])
                logq = torch.log_softmax(logq / 2.0, -1)  # T = 2 on the k+1 buckets, as for the teacher
                logp = teacher_buckets(top_lp[r][None], tail[r][None], 2.0)[0]
                ref_kd += divergence(logp[None], logq[None], "jsd", beta=0.3).item()
                ref_ce -= torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
    assert kd.item() == pytest.approx(ref_kd, rel=1e-4)
    assert ce.item() == pytest.approx(ref_ce, rel=1e-5)
    assert kd.item() > 0.01


def test_generation_distillation_and_sft(gen):
    tmp, p = gen
    out = run_train(load_recipe(p), out=str(tmp / "student"))
    info = json.loads((out / "training.json").read_text())
    assert info["task_type"] == "generation" and info["loss"] == "jsd" and info["loss_params"] == {"beta": 0.3}
    assert info["best_metric"] == "val_loss"
    steps, evs = steps_of(out), [r for r in log_of(out) if "val_loss" in r]
    assert all(r["kd"] > 0 and r["ce"] > 0 for r in steps)
    assert len(evs) == 2 and all("val_kd" in e and "val_f1" not in e for e in evs)
    assert info["best"]["val_loss"] == min(e["val_loss"] for e in evs)
    assert (out / "config.json").is_file() and (out / "training.png").is_file()
    # alpha = 0 and no cache: supervised fine-tuning on prompt -> response
    sft = _recipe_variant(tmp, p, "sft", alpha=0.0)
    out2 = run_train(load_recipe(sft), out=str(tmp / "sft"), cache=str(tmp / "no-cache-here"))
    steps2 = steps_of(out2)
    assert all(r["kd"] == 0 for r in steps2)
    assert steps2[0]["ce"] == pytest.approx(steps[0]["ce"], rel=1e-5)  # same first batch, same model
    # a soft-label (classification) cache is refused for a generation recipe, with both named
    soft = tmp / "work" / "cache-cls"
    soft.mkdir(parents=True, exist_ok=True)
    m = cache_mod.read_manifest(tmp / "work" / "cache")
    m.kind = "soft_labels"
    cache_mod.write_manifest(soft, m)
    with pytest.raises(UsageError, match=r"cache-cls: a soft_labels cache, but task.type 'generation' in .*gen.yaml"):
        run_train(load_recipe(p), out=str(tmp / "never"), cache=str(soft))


def test_generation_under_zero3_matches_single_process(gen, monkeypatch):
    """Token-level KD with uneven token counts per process (7 examples, batch 4: shares of 2+2 and 2+1
    sequences of different lengths) under DeepSpeed ZeRO-3 (parameters partitioned, gathered to save).
    The cache streams in an order of one share per process (train/data.py): the single process draws
    the order of two (and reads both shares), so both runs see the same batches."""
    from safetensors.torch import load_file

    from distill.train.data import SHARES_ENV

    monkeypatch.setenv(SHARES_ENV, "2")
    tmp, p = gen
    r = _recipe_variant(tmp, p, "gen7", train_examples=7, loss="reverse_kl")
    single = run_train(load_recipe(r), out=str(tmp / "gen7-single"))
    z3 = tmp / "gen7-zero3"
    launch("zero3.yaml", "-m", "distill", "train", r, "--out", z3)
    info = json.loads((z3 / "training.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    a, b = log_of(single), log_of(z3)
    assert len(a) == len(b) == 6  # 2 steps + 1 evaluation, twice
    for x, y in zip(a, b):
        for key in ("loss", "kd", "ce", "val_loss", "val_kd"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=PARITY_RTOL, abs=PARITY_ATOL), key
    ws, wz = load_file(str(single / "model.safetensors")), load_file(str(z3 / "model.safetensors"))
    assert ws.keys() == wz.keys()
    assert max((ws[k] - wz[k]).abs().max().item() for k in ws) < 1e-4


# -------------------------------------------------------------------------------------------------
# losses from recipe keys, swamping, schedules, early stopping


@pytest.mark.parametrize("loss,extra", [("reverse_kl", {}), ("skew_forward_kl", {"skew_lambda": 0.2}), ("tvd", {})])
def test_recipe_loss_key_reaches_the_first_step(cls, loss, extra):
    """The first logged KD equals the chosen divergence of the first batch, computed by hand."""
    from distill.data.prompts import encode_classification
    from distill.data.splits import prepare_splits
    from distill.models.loading import load_tokenizer
    from distill.models.scoring import label_logprobs
    from distill.train.losses import soft_label_kd

    tmp, recipe = cls
    r = _recipe_variant(tmp, recipe, f"loss-{loss}", loss=loss, max_steps=1, grad_accum=1, **extra)
    out = run_train(load_recipe(r), out=str(tmp / f"loss-{loss}"))
    first = steps_of(out)[0]
    rec = load_recipe(r)
    tok = load_tokenizer(rec.teacher)
    from distill.student.build import build_student

    model = build_student(rec.train.student, rec.teacher).eval()
    splits = prepare_splits(rec.task, rec.workdir)
    from distill.models.label_tokens import add_label_tokens

    add_label_tokens(model, tok, splits.labels)  # as the trainer does: the student answers with label tokens
    from distill.data.sampling import subset_indices

    subset = subset_indices(splits.train, 21, rec.task.split.seed)  # train.train_examples: 21, stratified
    enc, label_ids = encode_classification(tok, rec.task, splits.labels, [splits.train[i] for i in subset],
                                           rec.task.max_length)
    idx = torch.randperm(21, generator=torch.Generator().manual_seed(rec.train.seed)).tolist()[:4]
    teacher = cache_mod.load_split(tmp / "work" / "cache", "train")["label_logprobs"][subset]
    with torch.no_grad():
        scores = label_logprobs(model, [enc[i].prompt for i in idx], label_ids, tok.pad_token_id)
    kw = {"lam": extra["skew_lambda"]} if "skew_lambda" in extra else {}
    ref = soft_label_kd(scores, teacher[idx], 2.0, loss, **kw).item()
    assert first["kd"] == pytest.approx(ref, rel=1e-4)
    assert json.loads((out / "training.json").read_text())["loss"] == loss


def test_swamped_term_is_warned_and_early_stopping_stops(cls, caplog):
    tmp, recipe = cls
    # lr 1e-30 (0 is refused): updates below float32's resolution leave the weights exactly as they are, so
    # nothing improves and patience 1 stops after the second evaluation; alpha 0.001 makes the KD term tiny
    r = _recipe_variant(tmp, recipe, "swamp", alpha=0.001, lr=1e-30, epochs=5, grad_accum=1, swamp_steps=3,
                        swamp_fraction=0.05, early_stopping_patience=1, early_stopping_metric="val_loss",
                        schedule="linear", checkpoint_every=0)
    with caplog.at_level("WARNING", logger="distill"):
        out = run_train(load_recipe(r), out=str(tmp / "swamp"))
    info = json.loads((out / "training.json").read_text())
    assert info["stopped_early"] and "val_loss" in info["stopped_early"]
    assert info["steps"] == 12 < info["total_steps"] == 30  # two epochs of 6 batches, of five planned
    assert any("distillation term alpha*T^2*KD" in m for m in info["warnings"])
    assert "distillation term" in caplog.text


def test_schedules():
    from distill.train.setup import make_schedule

    def lrs(kind):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        s = make_schedule(opt, 2, 10, kind)
        out = []
        for _ in range(10):
            out.append(s.get_last_lr()[0])
            opt.step()
            s.step()
        return out

    assert lrs("linear") == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    assert lrs("cosine")[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs("cosine")[6] == pytest.approx(0.5)
    assert lrs("constant") == pytest.approx([0.5] + [1.0] * 9)


# -------------------------------------------------------------------------------------------------
# student options


def test_gradient_checkpointing_and_bf16_on_cpu(cls, monkeypatch):
    from safetensors.torch import load_file

    import distill.models.scoring as scoring

    # a checkpointed run feeds every row whole (its layers keep no cache): so does the plain one here, or
    # the two differ by the float rounding of a shared prompt prefix (2.9e-6 in this test), not by checkpointing
    monkeypatch.setattr(scoring, "MIN_SHARED_PREFIX", 10 ** 9)
    tmp, recipe = cls
    outs = {}
    for name, extra in (("plain", {}), ("gc", {"gradient_checkpointing": True}), ("bf16", {"mixed_precision": "bf16"})):
        r = _recipe_variant(tmp, recipe, f"opt-{name}", max_steps=2, grad_accum=1, checkpoint_every=0, **extra)
        outs[name] = run_train(load_recipe(r), out=str(tmp / f"opt-{name}"))
    w = {n: load_file(str(next((o / "checkpoints").iterdir()) / "trainable.safetensors")) for n, o in outs.items()}
    # gradient checkpointing recomputes the same activations: the same weights
    assert max((w["plain"][k] - w["gc"][k]).abs().max().item() for k in w["plain"]) < 1e-6
    # bf16 autocast on CPU trains: finite losses close to fp32's
    lp, lb = steps_of(outs["plain"]), steps_of(outs["bf16"])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lb)
    assert lb[0]["loss"] == pytest.approx(lp[0]["loss"], rel=0.05)
    assert json.loads((outs["bf16"] / "training.json").read_text())["mixed_precision"] == "bf16"


def test_refusals_name_the_key(cls):
    tmp, recipe = cls
    cases = [
        ({"student": {"num_layers": 1, "quantization": "4bit"}, "lora": {"r": 4}},
         r"train\.student\.quantization: 4bit \(QLoRA\) needs a CUDA GPU"),
        ({"student": {"num_layers": 1, "quantization": "4bit"}}, r"QLoRA needs train\.lora"),
        ({"mixed_precision": "fp16"}, r"train\.mixed_precision: fp16 needs a CUDA GPU; on CPU use bf16"),
        ({"loss": "kl"}, r"train\.loss: expected one of forward_kl"),
        ({"loss": "jsd", "jsd_beta": 1.5}, r"train\.jsd_beta: expected a number in \[0, 1\]"),
        ({"schedule": "step"}, r"train\.schedule: expected one of cosine, linear, constant"),
        ({"early_stopping_metric": "bleu"}, r"train\.early_stopping_metric"),
    ]
    for i, (train, pattern) in enumerate(cases):
        r = _recipe_variant(tmp, recipe, f"bad{i}", **train)
        with pytest.raises(UsageError, match=pattern) as e:
            run_train(load_recipe(r), out=str(tmp / "never"))
        assert f"bad{i}.yaml" in str(e.value)
    assert not (tmp / "never").exists()
    # through the CLI: exit status 2, one line, no traceback
    r = _recipe_variant(tmp, recipe, "badcli", mixed_precision="fp16")
    p = subprocess.run([sys.executable, "-m", "distill", "train", str(r)], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert p.returncode == 2 and "fp16 needs a CUDA GPU" in p.stderr and "Traceback" not in p.stderr


def test_accelerate_cpu_flag_single_process_is_flagged():
    from distill.train.distributed import single_process_cpu_launch_note

    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert "single process" in single_process_cpu_launch_note(env)
    assert single_process_cpu_launch_note({**env, "LOCAL_RANK": "0", "WORLD_SIZE": "2"}) is None
    assert single_process_cpu_launch_note({}) is None


def test_qlora_save_path_rebuilds_a_dense_merged_student(cls):
    """What a QLoRA run saves (no GPU here, so on a plain LoRA student): the base reloaded without
    quantization, cut alike, the trained adapter loaded, merged: same outputs as the trained model."""
    from distill.config import LoraConfig, StudentConfig
    from distill.student.build import add_lora, build_student, dense_lora_copy

    tmp, recipe = cls
    base = load_recipe(recipe).teacher
    scfg, lcfg = StudentConfig(num_layers=1), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    trained = add_lora(build_student(scfg, base), lcfg).eval()
    with torch.no_grad():  # stand-in for training: non-zero adapter weights
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    merged = dense_lora_copy(trained, scfg, lcfg, base).merge_and_unload().eval()
    ids = torch.tensor([[1, 20, 300, 4000, 17]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-4)
    assert merged.config.num_hidden_layers == 1 and not hasattr(merged, "peft_config")


def _other_family_student(out: Path, texts: list[str]) -> str:
    """A tiny Mistral with its own BPE tokenizer (no chat template): nothing shared with SmolLM2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                        sliding_window=None, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_a_student_of_another_tokenizer_trains_from_a_soft_label_cache(cls):
    """Soft labels are a distribution over label names: a student of another family and tokenizer learns
    from the SmolLM2-tokenizer cache (the data fingerprint and label set still must match)."""
    from conftest import CLASS_ROWS

    from distill.models.loading import load_tokenizer, tokenizer_hash

    tmp, recipe = cls
    texts = [t for t, _ in CLASS_ROWS] + ["billing delivery login Classify the message. Answer with one of:"]
    student = _other_family_student(tmp / "mistral-student", texts * 4)
    manifest = cache_mod.read_manifest(tmp / "work" / "cache")
    assert manifest.kind == "soft_labels" and manifest.tokenizer_hash != tokenizer_hash(load_tokenizer(student))
    r = _recipe_variant(tmp, recipe, "other-tok", alpha=1.0, max_steps=3, grad_accum=1, student={"model": student})
    out = run_train(load_recipe(r), out=str(tmp / "other-tok"))
    steps = steps_of(out)
    assert len(steps) == 3 and all(s["kd"] > 0 for s in steps)
    assert json.loads((out / "training.json").read_text())["best"]["val_kd"] > 0


def test_tensorboard_events_hold_the_loss_terms_and_the_model_card_gets_the_holdout_f1(cls):
    """train.report_to: [tensorboard] logs KD and CE per step through accelerate's tracker; the model
    directory's README.md names the teacher, and `distill eval` adds its holdout macro-F1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distill.evaluate.evaluation import run_eval

    tmp, recipe = cls
    r = _recipe_variant(tmp, recipe, "tb", report_to=["tensorboard"], max_steps=3, grad_accum=1)
    out = run_train(load_recipe(r), out=str(tmp / "tb"))
    run_dir = out / "logs" / load_recipe(r).name  # accelerate's tensorboard tracker: one directory per run name
    assert list(run_dir.glob("events.out.tfevents.*")), sorted(str(p) for p in out.rglob("*"))
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    assert {"train/kd", "train/ce", "train/loss", "eval/val_f1"} <= set(ea.Tags()["scalars"])
    logged = steps_of(out)
    assert [e.value for e in ea.Scalars("train/kd")] == pytest.approx([s["kd"] for s in logged], rel=1e-6)
    assert [e.value for e in ea.Scalars("train/ce")] == pytest.approx([s["ce"] for s in logged], rel=1e-6)
    card = (out / "README.md").read_text()
    assert f"| teacher | {load_recipe(r).teacher} |" in card and "base_model:" in card
    report = run_eval(str(out), load_recipe(r), split="holdout", out=str(tmp / "tb-eval"))
    card = (out / "README.md").read_text()
    assert f"| holdout | {report['n']} | {report['accuracy']:.4f} | {report['macro_f1']:.4f} |" in card
