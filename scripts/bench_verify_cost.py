#!/usr/bin/env python
"""What a speculative teacher pays to verify: llama.cpp's time to evaluate n new tokens in one pass after a
60-token context, n = 1, 2, 3, 5 (best of 5 each). Where n tokens cost n times one token the forward pass is
compute-bound and verifying a draft's proposals in one batch saves nothing (docs/results-snips.md, Drafts).

    python scripts/bench_verify_cost.py runs/snips/drafts/gguf/teacher.f16.gguf --threads 1
"""
from __future__ import annotations

import argparse
import time

from distill.evaluate import speculative_gguf as sg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    llm = sg.load(a.gguf, 512, a.threads, logits_all=True)
    context = list(range(100, 160))
    for n in (1, 2, 3, 5):
        best = float("inf")
        for _ in range(5):
            llm.reset()
            llm.eval(context)
            start = time.perf_counter()
            llm.eval(list(range(200, 200 + n)))
            best = min(best, time.perf_counter() - start)
        print(f"{a.gguf}, {a.threads} thread(s): {n} token(s) in one pass {best * 1000:.1f} ms, "
              f"{best * 1000 / n:.1f} ms a token")


if __name__ == "__main__":
    main()
