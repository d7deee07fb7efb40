"""A generation study (issue 16.2): replies to Banking77 customer messages written by the teacher
(SmolLM2-135M-Instruct), one student (the teacher cut to --layers evenly spaced layers), four ways of
training it for the same number of steps:

  sft     CE on the teacher's responses (alpha 1e-6: the cache supplies the same sequences, KD ~ off)
  off     token-level KD from the cache (alpha 1, --loss over the top-k buckets)
  on      train.on_policy.fraction 1: every response sampled by the student, scored by the teacher
  mixed   train.on_policy.fraction 0.5

Measured on the validation split's prompts (held out from training; each run has a single evaluation,
at its end, so validation picks nothing within a run; the default divergences were chosen after a
first round on these same prompts: docs/results.md): the student's token-level KL(teacher || student)
on the teacher-written responses (top-k buckets, T = 1), the teacher's mean per-token log-likelihood of the
student's own greedy responses, their mean length and repeated-3-gram share, and each mode's training
seconds per step (training.json's seconds over its steps, the final evaluation included; on-policy rows
also give the student's sampling and the teacher's scoring per step). The starting student and the
teacher itself are scored as reference rows.

Run at full size on 2 quiet CPU cores: about 16 minutes (docs/results.md, "Generation study").
The divergences are --loss (teacher-written responses, default forward KL) and --on-loss (the student's
own samples, default reverse KL); `--loss jsd --on-loss jsd` is the first round of that study.

    python scripts/study_onpolicy.py --work /tmp/study            # defaults: 320 messages, 40 steps
Prints a markdown table and writes it, with the settings and stage times, to WORK/results.md.
The Banking77 file is read by path (--data, by default ../shared/data/banking77/train.jsonl); only a
seeded sample of its texts is written, as prompts, under --work.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import yaml
from benchlib import ROOT, add_data_flag

from distill.cache import store as cache_mod
from distill.cache.generate import run_generate
from distill.config import OnPolicyConfig, load_recipe, resolve_teacher
from distill.data.prompts import stop_ids
from distill.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from distill.train import run_train
from distill.train.losses import sparse_kd
from distill.train.onpolicy import sample_responses

TEACHER = "teachers/smollm2-135m-instruct.yaml"
MAX_LENGTH = 256  # prompt + response tokens; the longest Banking77 message's prompt is over 128
INSTRUCTION = "You are a support agent of an online bank. Reply to the customer's message in one or two sentences."
MODES = {"sft": {"alpha": 1e-6}, "off": {}, "on": {"on_policy": {"fraction": 1.0}},
         "mixed": {"on_policy": {"fraction": 0.5}}}


def study_args(ap: argparse.ArgumentParser, examples: int, steps: int, batch: int, layers: int, new_tokens: int):
    """The study's work folder, data and size; scripts/bench_peers.py trains on the same recipe."""
    ap.add_argument("--work", required=True, type=Path)
    add_data_flag(ap, "banking77/train.jsonl", "the Banking77 training file whose messages are the prompts")
    for flag, default, text in (("--examples", examples, "Banking77 messages sampled (train/validation/holdout)"),
                                ("--steps", steps, "optimizer steps"), ("--batch", batch, "batch size"),
                                ("--layers", layers, "teacher layers the student keeps (of 30)"),
                                ("--new-tokens", new_tokens, "response length cap (teacher and student)")):
        ap.add_argument(flag, type=int, default=default, help=text)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    study_args(ap, examples=320, steps=40, batch=8, layers=10, new_tokens=40)
    ap.add_argument("--modes", default="sft,off,on,mixed")
    ap.add_argument("--loss", default="forward_kl", help="train.loss: the divergence on teacher-written responses")
    ap.add_argument("--on-loss", default="reverse_kl", help="train.on_policy.loss: on the student's own samples")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def write_recipe(a, work: Path) -> Path:
    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines() if x.strip()]
    random.Random(a.seed).shuffle(rows)
    data = work / "messages.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["text"]}) + "\n" for r in rows[: a.examples]))
    r = {"name": "onpolicy-study", "workdir": str(work / "run"), "teacher": str(ROOT / TEACHER),
         "task": {"type": "generation", "data": str(data), "instruction": INSTRUCTION, "max_length": MAX_LENGTH,
                  "split": {"validation": 0.1, "holdout": 0.2, "seed": a.seed}},
         "generate": {"k": 20, "batch_size": 16, "shard_size": 64, "responses": "teacher",
                      "max_new_tokens": a.new_tokens, "temperature": 0.7, "top_p": 0.9, "seed": a.seed},
         "train": {"alpha": 1.0, "temperature": 1.0, "loss": a.loss, "jsd_beta": 0.5, "lr": a.lr,
                   "batch_size": a.batch, "epochs": 100, "max_steps": a.steps, "warmup_ratio": 0.05,
                   "seed": a.seed, "keep_checkpoints": 0, "student": {"num_layers": a.layers},
                   "on_policy": {"fraction": 0.0, "max_new_tokens": a.new_tokens, "loss": a.on_loss}}}
    p = work / "base.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def mode_recipe(base: Path, mode: str) -> Path:
    r = yaml.safe_load(base.read_text())
    extra = dict(MODES[mode])
    r["train"]["on_policy"].update(extra.pop("on_policy", {}))
    r["train"].update(extra)
    p = base.with_name(f"{mode}.yaml")
    p.write_text(yaml.safe_dump(r))
    return p


@torch.no_grad()
def token_kl(model, examples, pad) -> float:
    """Mean KL(teacher || student) per target token over cached teacher-written responses, T = 1."""
    from distill.models.scoring import target_logits

    total = n = 0.0
    for i in range(0, len(examples), 8):
        items = examples[i:i + 8]
        logits = target_logits(model, [e.sequence.long() for e in items], [e.positions.long() for e in items], pad)
        ids, lps, tail = (torch.cat([getattr(e, f) for e in items]) for f in ("topk_ids", "topk_logprobs", "tail_mass"))
        total += sparse_kd(logits, ids.long(), lps.float(), tail.float(), 1.0, "forward_kl", reduction="sum").item()
        n += logits.shape[0]
    return total / max(n, 1)


@torch.no_grad()
def teacher_loglik(teacher, prompts, responses) -> float:
    """The teacher's mean log-probability per token of the given responses after their prompts."""
    total = n = 0.0
    for p, r in zip(prompts, responses):
        if not r:
            continue
        ids = torch.tensor([p + r])
        logp = torch.log_softmax(teacher(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)
        total += logp.gather(1, torch.tensor(r)[:, None]).sum().item()
        n += len(r)
    return total / max(n, 1)


def repetition(resp: list[int]) -> float:
    grams = [tuple(resp[i:i + 3]) for i in range(len(resp) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def score(model, teacher, tok, val, a) -> dict:
    """The held-out figures of one model."""
    model.eval()
    prompts = [e.sequence[: int(e.positions[0])].tolist() for e in val]
    greedy = OnPolicyConfig(temperature=0.0, max_new_tokens=a.new_tokens)
    responses = []
    for i in range(0, len(prompts), 8):
        chunk = prompts[i:i + 8]
        responses += sample_responses(model, chunk, [MAX_LENGTH - len(p) for p in chunk], greedy, stop_ids(tok),
                                      tok.pad_token_id, len(tok), seed=0)
    return {"kl": token_kl(model, val, tok.pad_token_id), "teacher_ll": teacher_loglik(teacher, prompts, responses),
            "length": sum(map(len, responses)) / len(responses),
            "rep3": sum(map(repetition, responses)) / len(responses),
            "example": tok.decode(responses[0], skip_special_tokens=True)}


def main():
    a = parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    times, rows = {}, {}
    base = write_recipe(a, a.work)
    t = time.time()
    cache = run_generate(load_recipe(base), backend="transformers")
    times["teacher writes and scores the responses"] = time.time() - t
    recipe = load_recipe(base)
    teacher_path = resolve_model_path(resolve_teacher(recipe.teacher).source)
    tok = load_tokenizer(teacher_path)
    teacher = load_causal_lm(teacher_path).eval()
    data = cache_mod.load_split(cache, "validation")
    val = [cache_mod.example_topk(data, i) for i in range(data["index"].numel())]
    from distill.student.build import build_student

    t = time.time()
    rows["teacher"] = score(teacher, teacher, tok, val, a)
    rows["student at start"] = score(build_student(recipe.train.student, teacher_path), teacher, tok, val, a)
    times["scoring the reference rows"] = time.time() - t
    for mode in a.modes.split(","):
        t = time.time()
        out = run_train(load_recipe(mode_recipe(base, mode)), out=str(a.work / f"student-{mode}"))
        info = json.loads((out / "training.json").read_text())
        times[f"train {mode}"] = time.time() - t
        row = score(load_causal_lm(str(out)), teacher, tok, val, a)
        row["s_per_step"] = info["seconds"] / max(1, info["steps"])
        if "on_policy" in info:
            op = info["on_policy"]
            row["sample_s"], row["score_s"] = op["sample_s"] / info["steps"], op["score_s"] / info["steps"]
        rows[mode] = row
        print(mode, json.dumps(row), flush=True)
    report(a, rows, times, len(val))


def report(a, rows, times, n_val):
    lines = [f"Held-out: {n_val} validation prompts. {a.steps} steps of batch {a.batch}; student: {a.layers} of the "
             f"teacher's 30 layers; responses at most {a.new_tokens} tokens; seed {a.seed}.", "",
             "| model | KL(teacher‖student) per token, teacher-written responses | teacher log-lik per token of the "
             "student's greedy responses | length | repeated 3-grams | s/step (sampling, scoring) |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, r in rows.items():
        cost = f"{r['s_per_step']:.2f}" if "s_per_step" in r else ""
        if "sample_s" in r:
            cost += f" ({r['sample_s']:.2f}, {r['score_s']:.2f})"
        lines.append(f"| {name} | {r['kl']:.3f} | {r['teacher_ll']:.3f} | {r['length']:.1f} | {r['rep3']:.3f} "
                     f"| {cost} |")
    lines += ["", "Stage times: " + "; ".join(f"{k} {v:.0f} s" for k, v in times.items()), "",
              "First held-out reply of each model:", ""]
    lines += [f"- {name}: {r['example']!r}" for name, r in rows.items()]
    text = "\n".join(lines) + "\n"
    (a.work / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
