#!/usr/bin/env python
"""distill against TRL's GKD trainer (issue 16.3): one student, one teacher, one batch and sequence
length, trained the same number of steps four ways in one run, each in its own child process:

  distill-off   `distill train` (run_train), train.on_policy.fraction 0: KD from the top-k cache
  trl-gkd-0     trl GKDTrainer, lmbda 0: the teacher's forward pass every step, dense divergence
  distill-on    `distill train`, fraction 1: the student writes every response, the teacher scores
                it through distill's transformers backend
  trl-gkd-1     trl GKDTrainer, lmbda 1: the student writes every response, the teacher's forward pass

Task: Banking77 customer messages (read by path) with replies written by the teacher (distill generate,
the recipe of scripts/study_onpolicy.py, 20% of the messages held out as validation). Student: the teacher cut
to --layers evenly spaced layers, built once and saved, so every run starts from the same weights
(distill through train.student.model, TRL from the same directory). Both trainers see the same token
ids (TRL's own ChatML collator, fed the cache's input_ids and a completion_mask), the same divergence
(distill's train.loss jsd with jsd_beta = GKD's beta; forward_kl = beta 0, reverse_kl = beta 1), AdamW
(fused), the same learning rate, cosine schedule, warm-up, clipping, fp32 student, bf16 teacher,
batch, steps and on-policy sampling (temperature 1, top-p 1, --new-tokens). What differs is each
trainer's own design: distill's divergence is over the teacher's top-k + a tail bucket, TRL's over the
whole vocabulary; distill's logits are computed only at response positions.

Per run: the median of its step times, wall-clock and the process's CPU time (distill: step_seconds and
step_cpu_seconds of its train_log.jsonl, the trainer's own clock over each step, the round's sampling and
scoring included; TRL: on_step_begin to on_step_end), its peak RSS (the child's, read when training
returns, before the held-out scoring), and the held-out KL after the last step: the mean per
target token of KL(teacher || student) over the teacher's top-k buckets (T = 1) on the validation
split's teacher-written responses (study_onpolicy.token_kl; never trained on, and distill's one
evaluation, at the end of its run, selects nothing). Then the ratios against the issue's targets:
distill's off-policy step >= 1.5x faster than TRL at lambda 0, its on-policy step no slower than TRL's
at lambda 1, at equal or lower held-out KL.

TRL is installed for this benchmark only, outside the project's venv:
    pip install --no-deps --target .peers trl==1.16.0
    python scripts/bench_peers.py --work /tmp/peers       # defaults: 96 messages, 12 steps of batch 4
Prints the settings, load averages and a markdown table; writes it with every run's JSON to WORK/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import ROOT, load_avg, peak_rss_mib, versions
from study_onpolicy import study_args

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

PEERS = ROOT / ".peers"
TRL_VERSION = "1.16.0"  # its GKDTrainer (trl.experimental.gkd) imports with transformers 5.19 / accelerate 1.15
INSTALL = f"pip install --no-deps --target {PEERS} trl=={TRL_VERSION}"
RUNS = ("distill-off", "trl-gkd-0", "distill-on", "trl-gkd-1")  # pairs back to back
LAMBDA = {"distill-off": 0.0, "trl-gkd-0": 0.0, "distill-on": 1.0, "trl-gkd-1": 1.0}
GKD_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}  # jsd: jsd_beta (the same generalised JSD)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    study_args(ap, examples=96, steps=12, batch=4, layers=4, new_tokens=24)
    ap.add_argument("--loss", default="jsd", choices=("jsd", "forward_kl", "reverse_kl"))
    ap.add_argument("--beta", type=float, default=0.5, help="jsd_beta / GKD beta (with --loss jsd)")
    ap.add_argument("--on-k", type=int, help="train.on_policy.k: the teacher's top-k at the student's own tokens "
                    "(default: the cache's 20)")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def import_trl():
    """TRL from .peers (never the project's venv); a clear error with the install command otherwise."""
    if not (PEERS / "trl").is_dir():
        sys.exit(f"bench_peers: TRL is not installed in {PEERS}. Install it for this benchmark only:\n    {INSTALL}")
    sys.path.insert(0, str(PEERS))
    try:
        import trl
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as e:
        sys.exit(f"bench_peers: TRL in {PEERS} does not import with this environment ({e}); reinstall it:\n"
                 f"    rm -rf {PEERS} && {INSTALL}")
    return trl, GKDConfig, GKDTrainer


# ---------------------------------------------------------------------------------------------
# the task: study_onpolicy's recipe, the student built once


def paths(a) -> dict:
    w = a.work
    return {"base": w / "base.yaml", "student": w / "student-init"}


def prepare(a) -> tuple[Path, dict]:
    """The recipe, the cache (distill generate, resumed when already there) and the starting student."""
    import study_onpolicy as study
    import yaml

    from distill.cache.generate import run_generate
    from distill.config import StudentConfig, load_recipe, resolve_teacher
    from distill.models.loading import count_parameters, load_tokenizer, resolve_model_path
    from distill.student.build import build_student, save_model

    ns = argparse.Namespace(data=a.data, examples=a.examples, seed=a.seed, new_tokens=a.new_tokens, batch=a.batch,
                            steps=a.steps, layers=a.layers, loss=a.loss, on_loss=a.loss, lr=5e-4)
    base = study.write_recipe(ns, a.work)
    r = yaml.safe_load(base.read_text())
    r["generate"]["backend"] = "transformers"
    r["task"]["split"].update(validation=0.2, holdout=0.1)  # validation: the held-out responses scored here
    r["train"]["jsd_beta"] = a.beta  # train.loss: write_recipe took --loss
    if a.on_k:
        r["train"]["on_policy"]["k"] = a.on_k
        spec = yaml.safe_load(Path(r["teacher"]).read_text())
        if a.on_k > spec.get("max_logprobs", 64):  # the spec's cap on k (vLLM's --max-logprobs), raised here
            spec["max_logprobs"] = a.on_k
            r["teacher"] = str(a.work / "teacher-spec.yaml")
            Path(r["teacher"]).write_text(yaml.safe_dump(spec))
    teacher_path = resolve_model_path(resolve_teacher(r["teacher"]).source)
    student_dir = paths(a)["student"]
    model = build_student(StudentConfig(num_layers=a.layers), teacher_path)
    save_model(model, load_tokenizer(teacher_path), student_dir)
    r["train"]["student"] = {"model": str(student_dir)}
    base.write_text(yaml.safe_dump(r))
    t = time.time()
    cache = run_generate(load_recipe(base), backend="transformers")
    info = {"teacher_path": teacher_path, "cache": str(cache), "generate_s": round(time.time() - t, 1),
            "student_parameters": count_parameters(model), "student_layers": model.config.num_hidden_layers}
    return base, info


def held_out(cache) -> list:
    """The validation split's examples: never trained on (distill's one evaluation, at the end, picks nothing)."""
    from distill.cache import store as cache_mod

    data = cache_mod.load_split(cache, "validation")
    return [cache_mod.example_topk(data, i) for i in range(data["index"].numel())]


def heldout_kl(model, cache, pad) -> float:
    import study_onpolicy as study

    model.eval()
    return study.token_kl(model, held_out(cache), pad)


# ---------------------------------------------------------------------------------------------
# the children: one run each, its memory its own


def child_distill(a, name: str) -> dict:
    import study_onpolicy as study

    from distill.config import load_recipe
    from distill.models.loading import load_causal_lm, load_tokenizer
    from distill.train import run_train

    recipe = study.mode_recipe(paths(a)["base"], "off" if LAMBDA[name] == 0 else "on")
    t = time.time()
    out = run_train(load_recipe(recipe), out=str(a.work / f"student-{name}"))
    wall = time.time() - t
    rss = peak_rss_mib()
    info = json.loads((out / "training.json").read_text())
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "step_seconds" in r]
    times, cpu = [r["step_seconds"] for r in steps], [r["step_cpu_seconds"] for r in steps]  # the trainer's clock
    best = (info.get("best") or {}).get("step")
    if best != info["steps"]:
        raise SystemExit(f"bench_peers: {out}: the saved weights are step {best}'s, not the last step's "
                         f"({info['steps']}); use more --examples so the run has one evaluation, at its end")
    res = {"run": name, "recipe": str(recipe), "step_s": times, "cpu_s": cpu, "peak_rss_mib": rss, "wall_s": wall,
           "steps": info["steps"]}
    if "on_policy" in info:
        op = info["on_policy"]
        res.update(sample_s=op["sample_s"] / info["steps"], score_s=op["score_s"] / info["steps"],
                   backend=op["backend"])
    tok = load_tokenizer(str(out))
    res["kl"] = heldout_kl(load_causal_lm(str(out)), cache_dir(a), tok.pad_token_id)
    return res


def cache_dir(a) -> Path:
    from distill.config import load_recipe

    return load_recipe(paths(a)["base"]).workdir_path / "cache"


def trl_dataset(a, tok):
    """The cache's training sequences as TRL rows: the chat-formatted prompt, the token ids and a
    completion_mask over the response (TRL's ChatML collator reads these instead of tokenizing)."""
    from datasets import Dataset

    from distill.cache import store as cache_mod

    data = cache_mod.load_split(cache_dir(a), "train")
    rows = []
    for i in range(data["index"].numel()):
        e = cache_mod.example_topk(data, i)
        seq, pos = e.sequence.tolist(), e.positions.tolist()
        if pos != list(range(pos[0], len(seq))):
            raise SystemExit(f"bench_peers: training example {i}: its targets are not the sequence's tail")
        rows.append({"prompt": tok.decode(seq[:pos[0]]), "input_ids": seq,
                     "completion_mask": [0] * pos[0] + [1] * (len(seq) - pos[0])})
    return Dataset.from_list(rows)


def gkd_settings(a, recipe) -> dict:
    """GKDConfig's arguments matched to the distill recipe (TRL's SFT defaults that differ set back)."""
    import torch

    cfg = recipe.train
    return dict(lmbda=None, beta=GKD_BETA.get(cfg.loss, cfg.jsd_beta), temperature=cfg.on_policy.temperature,
                max_new_tokens=cfg.on_policy.max_new_tokens, max_length=recipe.task.max_length,
                per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
                max_steps=cfg.max_steps, learning_rate=cfg.lr, lr_scheduler_type=cfg.schedule,
                warmup_steps=int(cfg.warmup_ratio * cfg.max_steps), weight_decay=cfg.weight_decay,
                max_grad_norm=cfg.max_grad_norm, optim="adamw_torch_fused", seed=cfg.seed, bf16=False, fp16=False,
                gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), save_strategy="no",
                eval_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)


def child_trl(a, name: str) -> dict:
    from transformers import TrainerCallback

    from distill.config import load_recipe
    from distill.data.prompts import stop_ids
    from distill.models.loading import load_causal_lm, load_tokenizer

    _, GKDConfig, GKDTrainer = import_trl()
    recipe = load_recipe(paths(a)["base"])
    if recipe.train.loss not in ("jsd", *GKD_BETA):
        raise SystemExit(f"bench_peers: GKD has no counterpart of train.loss {recipe.train.loss}")
    teacher_path = resolve_teacher_path(recipe)
    student_dir = str(paths(a)["student"])
    tok = load_tokenizer(student_dir)
    student = load_causal_lm(student_dir)  # fp32, as distill trains it
    student.generation_config.eos_token_id = stop_ids(tok)  # the stop tokens distill's rounds use
    student.generation_config.pad_token_id = tok.pad_token_id
    teacher = load_causal_lm(teacher_path, teacher_dtype(recipe))  # the dtype distill's transformers backend uses

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.cpu, self.t, self.c = [], [], None, None

        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)
            self.cpu.append(time.process_time() - self.c)

    clock = StepClock()
    settings = gkd_settings(a, recipe)
    settings["lmbda"] = LAMBDA[name]
    args = GKDConfig(output_dir=str(a.work / f"student-{name}"), **settings)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=trl_dataset(a, tok),
                         processing_class=tok, callbacks=[clock])
    t = time.time()
    trainer.train()
    wall = time.time() - t
    rss = peak_rss_mib()
    steps = trainer.state.global_step
    kl = heldout_kl(trainer.model, cache_dir(a), tok.pad_token_id)
    return {"run": name, "step_s": clock.times, "cpu_s": clock.cpu, "peak_rss_mib": rss, "wall_s": wall,
            "steps": steps, "kl": kl, "gkd": dict(settings)}


def resolve_teacher_path(recipe) -> str:
    from distill.config import resolve_teacher
    from distill.models.loading import resolve_model_path

    return resolve_model_path(resolve_teacher(recipe.teacher).source)


def teacher_dtype(recipe) -> str:
    from distill.config import resolve_teacher

    return resolve_teacher(recipe.teacher).dtype  # what distill's transformers backend loads it in


def child(a) -> None:
    res = (child_distill if a.child.startswith("distill") else child_trl)(a, a.child)
    (a.work / f"result-{a.child}.json").write_text(json.dumps(res, indent=1))


# ---------------------------------------------------------------------------------------------
# the parent: prepare once, run each in its own process, report


def main():
    a = parse_args()
    if a.child:
        return child(a)
    runs = [r for r in a.runs.split(",") if r]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        sys.exit(f"bench_peers: --runs: unknown {', '.join(bad)}; expected some of {', '.join(RUNS)}")
    if any(r.startswith("trl") for r in runs):
        import_trl()  # fail before the teacher writes anything
    a.work.mkdir(parents=True, exist_ok=True)
    lines = [f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", f"load average at start: {load_avg()}"]
    print("\n".join(lines), flush=True)
    t = time.time()
    base, info = prepare(a)
    lines.append(f"prepared in {time.time() - t:.0f} s (distill generate {info['generate_s']:.0f} s), load average "
                 f"{load_avg()}")
    from distill.config import load_recipe
    from distill.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(paths(a)["student"]))
    start_kl = heldout_kl(load_causal_lm(str(paths(a)["student"])), info["cache"], tok.pad_token_id)
    n_hold = len(held_out(info["cache"]))
    results = {}
    for name in runs:
        before = load_avg()
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--child", name]
        print(f"== {name}: load average {before}", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode:
            sys.exit(f"bench_peers: the {name} run failed (exit {proc.returncode}); its command: {' '.join(cmd)}")
        results[name] = json.loads((a.work / f"result-{name}.json").read_text())
        results[name]["load"] = f"{before} -> {load_avg()}"
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k not in ('step_s', 'cpu_s', 'gkd')})}",
              flush=True)
    text = report(a, load_recipe(base), info, start_kl, n_hold, results, lines)
    (a.work / "results.md").write_text(text)
    print(text)


def report(a, recipe, info, start_kl, n_hold, results, lines) -> str:
    cfg = recipe.train
    div = (f"jsd beta {cfg.jsd_beta}" if cfg.loss == "jsd" else cfg.loss)
    gkd = gkd_settings(a, recipe)
    v = {**versions("accelerate", "datasets"), "trl": TRL_VERSION}
    lines += [
        f"versions: {', '.join(f'{k} {x}' for k, x in v.items())}",
        f"teacher: {recipe.teacher} ({info['teacher_path']}, {teacher_dtype(recipe)}); student: "
        f"{info['student_layers']} of its layers, {info['student_parameters'] / 1e6:.1f}M parameters, fp32, from "
        f"{paths(a)['student']}",
        f"task: {a.examples} Banking77 messages from {a.data}, teacher-written replies (at most {a.new_tokens} tokens, "
        f"T {recipe.generate.temperature}, top-p {recipe.generate.top_p}), top-{recipe.generate.k} cache "
        f"{info['cache']}; max_length {recipe.task.max_length}",
        f"training: {cfg.max_steps} steps of batch {cfg.batch_size}, AdamW lr {cfg.lr}, {cfg.schedule} schedule, "
        f"warm-up {int(cfg.warmup_ratio * cfg.max_steps)} steps, clip {cfg.max_grad_norm}, seed {cfg.seed}; on-policy "
        f"sampling T {cfg.on_policy.temperature}, top-p {cfg.on_policy.top_p}, at most {cfg.on_policy.max_new_tokens} "
        "tokens",
        f"divergence compared: {div} (distill: train.loss over the teacher's top-{recipe.generate.k} + tail bucket, "
        f"alpha {cfg.alpha}; TRL GKD: beta {gkd['beta']} over the full vocabulary)",
        f"distill: run_train on {paths(a)['base'].parent}/off.yaml and on.yaml (train.on_policy.fraction 0 / 1, "
        f"teacher backend {recipe.generate.backend})",
        "TRL: trl.experimental.gkd.GKDTrainer, GKDConfig(" + ", ".join(f"{k}={x!r}" for k, x in gkd.items()
                                                                     if k != "lmbda") + ", lmbda=0 / 1)",
        f"held-out KL: KL(teacher || student) per target token over the top-{recipe.generate.k} buckets, T = 1, on "
        f"the {n_hold} validation responses the teacher wrote (never trained on); student at start: {start_kl:.4f}",
        f"load average at the end: {load_avg()}", "",
        f"| run | λ | s/step, median (min-max) | CPU s/step, median | peak RSS, MiB | held-out KL after "
        f"{cfg.max_steps} steps | run wall s | load average (before -> after) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    med, cpu = {}, {}
    for name, r in results.items():
        st = r["step_s"]
        med[name], cpu[name] = statistics.median(st), statistics.median(r["cpu_s"])
        extra = f"; mean sampling {r['sample_s']:.2f}, scoring {r['score_s']:.2f}" if "sample_s" in r else ""
        lines.append(f"| {name} | {LAMBDA[name]:g} | {med[name]:.2f} ({min(st):.2f}-{max(st):.2f}{extra}) | "
                     f"{cpu[name]:.2f} | {r['peak_rss_mib']:.0f} | {r['kl']:.4f} | {r['wall_s']:.0f} | {r['load']} |")
    lines += ["", "Step times are wall-clock on a shared machine; CPU s/step (this process's CPU time over the step, "
              "all its threads) is less sensitive to other processes' load. Ratios: TRL's over distill's."]
    for ours, theirs, target, what in (
            ("distill-off", "trl-gkd-0", 1.5, "off-policy (λ 0): distill at least 1.5x faster"),
            ("distill-on", "trl-gkd-1", 1.0, "on-policy (λ 1): distill no slower")):
        if ours in results and theirs in results:
            x, xc = med[theirs] / med[ours], cpu[theirs] / cpu[ours]
            kl_ok = results[ours]["kl"] <= results[theirs]["kl"]
            lines.append(f"- {what}: median step {x:.2f}x (CPU time {xc:.2f}x), target {target:g}x: "
                         f"{'met' if x >= target else 'NOT met'} ({'met' if xc >= target else 'NOT met'} in CPU time); "
                         f"held-out KL {results[ours]['kl']:.4f} vs "
                         f"{results[theirs]['kl']:.4f}: {'equal or lower' if kl_ok else 'HIGHER'}; peak RSS "
                         f"{results[ours]['peak_rss_mib'] / results[theirs]['peak_rss_mib']:.2f}x TRL's")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
