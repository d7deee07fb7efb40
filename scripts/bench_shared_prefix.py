"""Label scoring with the batch's shared prompt prefix run once, against every row running it: texts/s
of each, measured in one run, alternating, and the largest score difference; without gradients (evaluation,
soft labels) and in a training step (forward and backward of the scores).

    python scripts/bench_shared_prefix.py --model runs/banking77/teacher     # after stage 02 of banking77.sh

Reads the first --texts training texts of recipes/banking77.yaml's data, batches of 16 (each of about
one length, as evaluation and soft-label generation batch them), the label tokens' answers.
"""
import argparse
import json
import time

import torch

from distill.config import load_recipe
from distill.data import prompts
from distill.data.read import label_set
from distill.models import loading as models
from distill.models import scoring
from distill.models.label_tokens import label_token_ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/banking77/teacher", help="a model trained with label tokens")
    ap.add_argument("--recipe", default="recipes/banking77.yaml")
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    r = load_recipe(a.recipe)
    tok = models.load_tokenizer(a.model)
    model = models.load_causal_lm(a.model, "float32").eval()
    labels = label_set(r.task, r.task.data)
    rows = [json.loads(line)[r.task.text_field] for line in open(r.task.data)][:a.texts]
    batch = sorted((prompts.prompt_ids(tok, r.task, None, t) for t in rows), key=len)
    answers = [[t] for t in label_token_ids(tok, labels)]
    print(f"{len(batch)} prompts, mean {sum(map(len, batch)) / len(batch):.1f} tokens; shared by a batch of 16: "
          f"{scoring.shared_prefix_len(model, batch[:16], min(map(len, batch[:16])) - 1)}")
    for grad in (False, True):
        rates, ref = {"once": [], "every row": []}, None
        for _ in range(a.rounds):
            for mode in ("every row", "once"):
                scoring.MIN_SHARED_PREFIX = 4 if mode == "once" else 10 ** 9
                t0 = time.perf_counter()
                with torch.set_grad_enabled(grad):
                    got = []
                    for b in range(0, len(batch), 16):
                        scores = scoring.label_logprobs(model, batch[b:b + 16], answers, tok.pad_token_id)
                        if grad:
                            model.zero_grad()
                            scores.logsumexp(-1).sum().backward()
                            scores = model.model.layers[0].self_attn.q_proj.weight.grad.flatten()[:1000]
                        got.append(scores.detach())
                got = torch.cat(got)
                rates[mode].append(len(batch) / (time.perf_counter() - t0))
                ref = got if ref is None else ref
                diff = (got - ref).abs().max().item()
        scoring.MIN_SHARED_PREFIX = 4
        what = "training step (forward + backward)" if grad else "scoring without gradients"
        print(f"{what}:")
        for mode, v in rates.items():
            print(f"  prefix run {mode:<9}: {max(v):6.2f} texts/s (best of {len(v)})")
        print(f"  speed-up {max(rates['once']) / max(rates['every row']):.2f}x; largest difference "
              f"{diff:.2e} ({'a weight gradient' if grad else 'scores'})")


if __name__ == "__main__":
    main()
