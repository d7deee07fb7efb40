#!/usr/bin/env python
"""Label scoring cost: the old packed layout (every label answer after the prompt) against the prefix
tree (shared answer prefixes fed once) and against a label-token student (one token per label, read at
one position), on the default task and on Banking77, in one run.

    python scripts/bench_scoring.py [--teacher teachers/smollm2-135m-instruct.yaml] [--batch-size 8]
        [--batches 2] [--dtypes float32,bfloat16] [--tasks default,banking77] [--gguf-texts 8]

For each task: prompt tokens per text, answer tokens fed per text and logits rows computed per text
(packed vs trie), then texts/s of label_logprobs under torch.no_grad on the real 135M teacher for
each layout and dtype (one warm-up batch each, then --batches timed batches of the same texts,
the two layouts interleaved), the ratio, and the largest score difference between the layouts.
Banking77's own teacher is a fine-tune of the same 135M model (same tokenizer and shape), so the base
model stands in for it; its data is read from --data (default ../shared/data/banking77, beside the
repository). The label-token rows use the same model with distill's label tokens added
(distill/models/label_tokens.py)
and time, against a forward over the prompt alone (logits at its last position): eval (label_logprobs,
no_grad) and a training step (forward + backward of the trainer's own ClassificationTask.scores_and_ce:
the prompt, the gold label token, end of turn), beside a training step of the packed and trie layouts.
GGUF rows (--gguf-texts per task, 0 for none): the model and its label-token copy written by distill's
exporter (--gguf-quant), texts/s of the old llama.cpp scorer (each label's answer evaluated after the
prompt, logits at every position; copied below as the baseline), of today's GGUFScorer on the plain
model (prefix tree, logits only where read) and of GGUFScorer on the label-token model.
Targets (issue 13): label-token eval and training step at most 1.3x the prompt-only forward / step; the
trie at least 1.4x faster than packed on Banking77; the label-token GGUF at least 10x the old GGUF scorer's
texts/s on Banking77. Figures on a shared CPU machine are noisy.
"""
from __future__ import annotations

import argparse
import os
import time
import types
from pathlib import Path

import torch
from benchlib import ROOT, add_data_flag

from distill.models.scoring import label_logprobs, trie_layout

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TASKS = {"default": "recipes/default.yaml", "banking77": "recipes/banking77.yaml"}
DATA_SETS = {"banking77": "banking77"}  # tasks whose data --data points at, by their folder under ../shared/data


def load_task_recipe(name: str, data: Path | None):
    """A task's recipe; for Banking77 its data, labels and holdout read from the folder --data names."""
    from distill.config import load_recipe

    sets = []
    if name in DATA_SETS and data is not None:
        sets = [f"task.data={data / 'train.jsonl'}", f"task.holdout_data={data / 'test.jsonl'}",
                f"task.labels_file={data / 'labels.json'}"]
    return load_recipe(ROOT / TASKS[name], sets)


# ---- OLD PACKED LAYOUT, copied from distill/scoring.py before the prefix tree (issue 13 item 2). ----
# Kept here only as the benchmark's baseline; the library no longer has it.
def old_pack_batch(prompts, label_ids, pad_id):
    """[pad | prompt | answer 1 | answer 2 | ...]: every answer packed in full after the prompt."""
    P = max(len(p) for p in prompts)
    S = P + sum(len(x) for x in label_ids)
    B = len(prompts)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    positions = torch.zeros((B, S), dtype=torch.long)
    allowed = torch.zeros((B, S, S), dtype=torch.bool)
    causal = torch.ones((S, S), dtype=torch.bool).tril()
    answers = torch.tensor([t for lab in label_ids for t in lab], dtype=torch.long)
    owner = torch.tensor([j for j, lab in enumerate(label_ids) for _ in lab], dtype=torch.long)
    pred_pos, cur = [], P
    for lab in label_ids:
        pred_pos += [P - 1] + list(range(cur, cur + len(lab) - 1))
        cur += len(lab)
    input_ids[:, P:] = answers
    for b, p in enumerate(prompts):
        start = P - len(p)
        input_ids[b, start:P] = torch.tensor(p)
        positions[b, start:P] = torch.arange(len(p))
        allowed[b, start:P, start:P] = causal[: len(p), : len(p)]
        for i in range(start):
            allowed[b, i, i] = True
        cur = P
        for lab in label_ids:
            L = len(lab)
            positions[b, cur:cur + L] = torch.arange(len(p), len(p) + L)
            allowed[b, cur:cur + L, start:P] = True
            allowed[b, cur:cur + L, cur:cur + L] = causal[:L, :L]
            cur += L
    return input_ids, allowed, positions, torch.tensor(pred_pos), answers, owner


def old_label_logprobs(model, prompts, label_ids, pad_id):
    input_ids, allowed, positions, pred_pos, answers, owner = old_pack_batch(prompts, label_ids, pad_id)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    logits = model(input_ids=input_ids.to(device), attention_mask=mask[:, None].to(device),
                   position_ids=positions.to(device), logits_to_keep=pred_pos.to(device), use_cache=False).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok_lp = logp.gather(-1, answers.to(device).expand(len(prompts), -1)[..., None]).squeeze(-1)
    out = torch.zeros((len(prompts), len(label_ids)), dtype=tok_lp.dtype, device=device)
    return out.index_add(1, owner.to(device), tok_lp)
# ---- end of the old layout ----


def task_prompts(name: str, tok, n: int, data: Path | None):
    """The first `n` texts of a task's data, encoded as distill encodes them, and the label answers."""
    from distill.data.prompts import encode_classification

    recipe = load_task_recipe(name, data)
    task = recipe.task
    labels, examples = _labels_and_rows(recipe, TASKS[name])
    enc, label_ids = encode_classification(tok, task, labels, examples[:n], max_length=recipe.task.max_length)
    return [e.prompt for e in enc], label_ids


def compare(model, prompts, label_ids, pad_id, batch_size):
    """texts/s and scores of the old layout and the trie; one warm-up batch each, then the timed batches
    interleaved (alternating which goes first), so load from other processes hits both alike."""
    fns = (old_label_logprobs, label_logprobs)
    secs, out = [0.0, 0.0], [[], []]
    with torch.no_grad():
        for fn in fns:
            fn(model, prompts[:batch_size], label_ids, pad_id)
        for n, i in enumerate(range(0, len(prompts), batch_size)):
            for k in ((0, 1) if n % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                out[k].append(fns[k](model, prompts[i:i + batch_size], label_ids, pad_id).float())
                secs[k] += time.perf_counter() - t0
    return [len(prompts) / s for s in secs], [torch.cat(o) for o in out]


def bench_task(name, tok, models, args):
    prompts, label_ids = task_prompts(name, tok, args.batch_size * args.batches, args.data)
    layout = trie_layout(label_ids)
    packed_tok = sum(len(x) for x in label_ids)
    print(f"\n{name}: {len(label_ids)} labels, {len(prompts)} texts")
    print(f"  prompt tokens per text      {sum(map(len, prompts)) / len(prompts):7.1f}")
    print(f"  answer tokens fed per text  packed {packed_tok:5d}   trie {layout.n_fed:5d}   "
          f"({packed_tok / max(1, layout.n_fed):.2f}x fewer; trie nodes {layout.n_nodes}, its leaves read, not fed)")
    print(f"  logits rows per text        packed {packed_tok:5d}   trie {layout.n_fed + 1:5d}")
    for dtype, model in models.items():
        (old_rate, new_rate), (old, new) = compare(model, prompts, label_ids, tok.pad_token_id, args.batch_size)
        same = (old.argmax(1) == new.argmax(1)).float().mean().item()
        print(f"  {dtype:9s} texts/s         packed {old_rate:7.2f}   trie {new_rate:7.2f}   "
              f"ratio {new_rate / old_rate:.2f}x   max |score diff| {(old - new).abs().max().item():.2e}   "
              f"same argmax {same:.0%}")


def _rounds(modes: dict, batches, rounds: int) -> dict:
    """Seconds per batch of each mode, the modes interleaved batch by batch (the order rotating) after one
    warm-up call each, so load from other processes hits them alike; returns {mode: [seconds per round]}."""
    names = list(modes)
    for name in names:
        modes[name](batches[0])
    out = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            modes[name](batches[r % len(batches)])
            out[name].append(time.perf_counter() - t0)
    return out


def _ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b): each round's modes ran back to back."""
    import statistics

    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def bench_label_tokens(name, tok_path, model, args):
    """The label-token student against a forward (and a training step) over the prompt alone."""
    import copy

    from distill.data.prompts import end_of_turn_id
    from distill.models.label_tokens import add_label_tokens
    from distill.models.loading import load_tokenizer
    from distill.train.tasks import ClassificationTask

    base_tok = load_tokenizer(tok_path)
    prompts_full, answers_full = task_prompts(name, base_tok, args.batch_size * args.batches, args.data)
    tok, student = load_tokenizer(tok_path), copy.deepcopy(model)
    labels = _labels(name, args.data)
    add_label_tokens(student, tok, labels)
    prompts, answers = task_prompts(name, tok, args.batch_size * args.batches, args.data)
    assert all(len(a) == 1 for a in answers) and prompts == prompts_full
    pad, B = tok.pad_token_id, args.batch_size
    batches = [list(range(i, min(len(prompts), i + B))) for i in range(0, len(prompts), B)]
    golds = torch.arange(len(prompts)) % len(labels)
    task = types.SimpleNamespace(label_tokens=[a[0] for a in answers], end_of_turn=end_of_turn_id(tok), pad=pad,
                                 label_ids=answers)

    def prompt_only(idx, grad=False):
        ps = [prompts[i] for i in idx]
        W = max(map(len, ps))
        ids = torch.tensor([[pad] * (W - len(p)) + p for p in ps])
        att = torch.tensor([[0] * (W - len(p)) + [1] * len(p) for p in ps])
        out = student(input_ids=ids, attention_mask=att, logits_to_keep=1, use_cache=False).logits
        if grad:
            torch.log_softmax(out[:, -1].float(), -1)[:, 0].sum().backward()

    def train_step(fn):
        def step(idx):
            fn(idx).sum().backward()
            student.zero_grad(set_to_none=True)
        return step

    def label_token_step(idx):
        items = [types.SimpleNamespace(prompt=prompts[i]) for i in idx]
        scores, ce = ClassificationTask.scores_and_ce(task, student, items, golds[idx])
        return ce + scores.sum() * 0

    def no_grad(fn):
        def call(idx):
            with torch.no_grad():
                fn(idx)
        return call

    times = _rounds({
        "prompt": no_grad(prompt_only),
        "eval": no_grad(lambda idx: label_logprobs(student, [prompts[i] for i in idx], answers, pad)),
        "prompt_step": lambda idx: (prompt_only(idx, grad=True), student.zero_grad(set_to_none=True)),
        "label_token_step": train_step(label_token_step),
        "trie_step": train_step(lambda idx: label_logprobs(student, [prompts[i] for i in idx], answers_full, pad)),
        "packed_step": train_step(
            lambda idx: old_label_logprobs(student, [prompts[i] for i in idx], answers_full, pad)),
    }, batches, args.rounds)
    n_prompt = sum(map(len, prompts)) / len(prompts)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"  label tokens (one per label): prompt {n_prompt:.1f} tokens + 0 fed for eval, + 2 for a training step; "
          f"{args.rounds} interleaved rounds, median ratios per round")
    print(f"  float32 eval     texts/s: prompt-only forward {B / med['prompt']:7.2f}   label-token eval "
          f"{B / med['eval']:7.2f}   cost {_ratio(times, 'eval', 'prompt'):.2f}x the prompt alone (target <= 1.3)")
    print(f"  float32 training texts/s: prompt-only step {B / med['prompt_step']:7.2f}   label-token step "
          f"{B / med['label_token_step']:7.2f}   cost {_ratio(times, 'label_token_step', 'prompt_step'):.2f}x "
          "(target <= 1.3)")
    print(f"  float32 training texts/s: trie step {B / med['trie_step']:.2f}, packed step "
          f"{B / med['packed_step']:.2f}: "
          f"packed / label-token {_ratio(times, 'packed_step', 'label_token_step'):.1f}x, "
          f"packed / trie {_ratio(times, 'packed_step', 'trie_step'):.2f}x")


# ---- OLD GGUF SCORER, copied from distill/llamacpp.py before the prefix tree (issue 13 item 4). ----
# Kept here only as the benchmark's baseline: the prompt evaluated once, then each label's answer
# evaluated after it, with logits at every position (llama-cpp-python's logits_all).
def old_gguf_scores(llm, prompts, label_ids):
    import numpy as np

    rows = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        P, row = len(prompt), []
        for lab in label_ids:
            llm.n_tokens = P
            if len(lab) > 1:
                llm.eval(lab[:-1])
            logits = np.array(llm.scores[P - 1: P - 1 + len(lab)], dtype=np.float64)
            m = logits.max(1, keepdims=True)
            logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
            row.append(sum(logp[t, tok] for t, tok in enumerate(lab)))
        rows.append(row)
    return torch.tensor(rows)
# ---- end of the old GGUF scorer ----


def bench_gguf(name, tok_path, model, args):
    """texts/s of GGUF scoring with llama.cpp: the old scorer and today's GGUFScorer (prefix tree, logits only
    where read) on the model as it is, and GGUFScorer on the same model with label tokens (one position per
    text). The GGUFs are written by distill's own exporter in --gguf-quant; the same texts for every row."""
    import copy
    import tempfile

    from distill.export.pipeline import export_gguf
    from distill.models.label_tokens import add_label_tokens
    from distill.models.llamacpp import GGUFScorer, load_gguf
    from distill.models.loading import load_tokenizer

    n = args.gguf_texts
    with tempfile.TemporaryDirectory(prefix="bench-scoring.") as tmp:
        tmp = Path(tmp)
        tok = load_tokenizer(tok_path)
        files = {}
        for kind in ("plain", "label-token"):
            m, t = copy.deepcopy(model).float(), load_tokenizer(tok_path)
            if kind == "label-token":
                add_label_tokens(m, t, _labels(name, args.data))
            m.save_pretrained(tmp / kind)
            t.save_pretrained(tmp / kind)
            files[kind] = tmp / f"{kind}.gguf"
            export_gguf(tmp / kind, files[kind], args.gguf_quant, verify=False)
            del m
        prompts, answers = task_prompts(name, tok, n, args.data)
        lt_tok = load_tokenizer(tmp / "label-token")
        lt_prompts, lt_answers = task_prompts(name, lt_tok, n, args.data)
        enc = [types.SimpleNamespace(prompt=p) for p in prompts]
        lt_enc = [types.SimpleNamespace(prompt=p) for p in lt_prompts]
        n_ctx = 64 * -(-(max(map(len, prompts)) + max(map(len, answers)) + 1) // 64)
        old_llm = load_gguf(files["plain"], n_ctx, seed=0)
        trie = GGUFScorer(str(files["plain"]), str(tmp / "plain"), n_ctx=n_ctx)
        lt = GGUFScorer(str(files["label-token"]), str(tmp / "label-token"), n_ctx=n_ctx)
        modes = {"old": lambda i: old_gguf_scores(old_llm, prompts[i:i + 1], answers),
                 "trie": lambda i: trie.scores(enc[i:i + 1], answers),
                 "label-token": lambda i: lt.scores(lt_enc[i:i + 1], lt_answers)}
        times = _rounds(modes, list(range(n)), n)
        old_all = torch.cat([old_gguf_scores(old_llm, [p], answers) for p in prompts[:2]])
        trie_all = trie.scores(enc[:2], answers).double()
        for obj in (old_llm, trie.llm, lt.llm):
            obj.close()
    rate = {k: 1 / (sorted(v)[len(v) // 2]) for k, v in times.items()}
    print(f"  GGUF {args.gguf_quant} (llama.cpp, {n} texts, interleaved, median per text): old scorer "
          f"{rate['old']:.3f} texts/s ({len(answers)} answer evals per text)   prefix tree {rate['trie']:.3f}   "
          f"label tokens {rate['label-token']:.2f}")
    print(f"  GGUF ratios: label-token / old scorer {_ratio(times, 'old', 'label-token'):.1f}x (target >= 10 on "
          f"banking77)   prefix tree / old {_ratio(times, 'old', 'trie'):.2f}x   max |score diff| old vs tree "
          f"{(old_all - trie_all).abs().max().item():.1e}")


def _labels_and_rows(recipe, src: str):
    """The task's label set (named by the recipe, else its data's classes) and its validated rows."""
    from distill.data.read import label_set, read_rows, validate_rows

    task = recipe.task
    named = label_set(task, src)
    examples = validate_rows(read_rows(task.data), task, named, task.data)
    return named or sorted({ex["label"] for ex in examples}), examples


def _labels(name: str, data: Path | None):
    return _labels_and_rows(load_task_recipe(name, data), TASKS[name])[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="teachers/smollm2-135m-instruct.yaml")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2, help="timed batches per task, layout and dtype")
    ap.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16")
    ap.add_argument("--tasks", default="default,banking77")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds of the label-token comparison")
    ap.add_argument("--gguf-texts", type=int, default=8, help="texts per GGUF row (0: no GGUF rows)")
    ap.add_argument("--gguf-quant", default="q8_0", help="the GGUF type of the compared files")
    add_data_flag(ap, "banking77", "the Banking77 folder (train.jsonl, test.jsonl, labels.json)")
    args = ap.parse_args(argv)
    args.data = args.data.resolve()  # before the chdir below
    os.chdir(ROOT)  # recipes name their data relative to the repository root
    from distill.config import load_teacher_spec
    from distill.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(load_teacher_spec(args.teacher).source)
    tok = load_tokenizer(path)
    models = {d: load_causal_lm(path, d).eval() for d in args.dtypes.split(",")}
    print(f"teacher {path}; torch threads {torch.get_num_threads()}; batch size {args.batch_size}")
    for name in args.tasks.split(","):
        bench_task(name, tok, models, args)
        bench_label_tokens(name, path, models[args.dtypes.split(",")[0]], args)
        if args.gguf_texts:
            bench_gguf(name, path, models[args.dtypes.split(",")[0]], args)


if __name__ == "__main__":
    main()
