#!/usr/bin/env python
"""Label scoring cost: the old packed layout (every label answer after the prompt) against the prefix
tree (shared answer prefixes fed once), on the default task and on Banking77, in one run.

    python scripts/bench_scoring.py [--teacher teachers/smollm2-135m-instruct.yaml] [--batch-size 8]
        [--batches 2] [--dtypes float32,bfloat16] [--tasks default,banking77]

For each task: prompt tokens per text, answer tokens fed per text and logits rows computed per text
(packed vs trie), then texts/s of label_logprobs under torch.no_grad on the real 135M teacher for
each layout and dtype (one warm-up batch each, then --batches timed batches of the same texts,
the two layouts interleaved), the ratio, and the largest score difference between the layouts. Banking77's own teacher is a
fine-tune of the same 135M model (same tokenizer and shape), so the base model stands in for it.
Figures on a shared CPU machine are noisy.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from distill.scoring import label_logprobs, trie_layout  # noqa: E402

TASKS = {"default": "recipes/default.yaml", "banking77": "recipes/banking77.yaml"}


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


def task_prompts(recipe_path: str, tok, n: int):
    """The first `n` texts of a recipe's data, encoded as distill encodes them, and the label answers."""
    from distill.config import load_recipe
    from distill.data import label_set, read_rows, validate_rows
    from distill.prompts import encode_classification

    recipe = load_recipe(ROOT / recipe_path)
    task = recipe.task
    examples = validate_rows(read_rows(task.data), task, label_set(task, recipe_path), task.data)
    labels = label_set(task, recipe_path) or sorted({ex["label"] for ex in examples})
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
    prompts, label_ids = task_prompts(TASKS[name], tok, args.batch_size * args.batches)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="teachers/smollm2-135m-instruct.yaml")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2, help="timed batches per task, layout and dtype")
    ap.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16")
    ap.add_argument("--tasks", default="default,banking77")
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # recipes name their data relative to the repository root
    from distill.config import load_teacher_spec
    from distill.models import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(load_teacher_spec(args.teacher).source)
    tok = load_tokenizer(path)
    models = {d: load_causal_lm(path, d).eval() for d in args.dtypes.split(",")}
    print(f"teacher {path}; torch threads {torch.get_num_threads()}; batch size {args.batch_size}")
    for name in args.tasks.split(","):
        bench_task(name, tok, models, args)


if __name__ == "__main__":
    main()
