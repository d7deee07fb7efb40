#!/usr/bin/env python
"""Teacher throughput per backend and the compact cache's size and error, in one run on the same data
and model.

    python scripts/bench_generate.py [--teacher teachers/smollm2-135m-instruct.yaml] [--examples 48]
        [--k 20] [--backends transformers,vllm,server] [--gen-examples 16] [--max-new-tokens 32]
        [--out bench_generate.json]

1. Scoring (token-level KD on given responses): the same prompt+response sequences go through each
   backend: transformers (plain forward), the vLLM engine (prompt_logprobs) and a vLLM OpenAI server
   started for the run (`distill serve-teacher`'s ServedTeacher, queried by the server backend).
   Reported: tokens/s (all sequence tokens), and how far each backend's top k is from transformers'.
2. Teacher-written responses (sequence-level KD): each backend samples --max-new-tokens for
   --gen-examples prompts and captures the top k in the same pass; generated tokens/s.
3. Cache size: the transformers top-128 of step 1 (the exact numbers, before any encoding) is
   stored with the cache codec for k in {8, 20, 64, 128}: bytes per target token (the top-k block
   alone, and the whole shard with token ids and offsets), against the plain layout, and the mean /
   max KL between the stored and the exact top-k distribution (k + 1 buckets: top k and tail, as the
   loss sees them), at T = 1 and T = 2.

Data: customer messages of the built-in task as prompts, each with a support reply assembled from
an opener, one of three replies for its intent and a closer as the response. Figures on a shared CPU
machine are noisy; vLLM start-up time is not counted.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import time
from pathlib import Path

from benchlib import ROOT, versions

OPENERS = ["Thanks for reaching out.", "Hi, and sorry for the trouble.", "Hello!", "Thank you for your message.",
           "I can help with that."]
REPLIES = {
    "billing": ["I have checked your account and will correct the charge today.",
                "The duplicate payment has been reversed; it can take three days to show.",
                "Could you send me the last four digits of the card so I can find the charge?"],
    "delivery": ["Your parcel is on its way and the tracking should update within a day.",
                 "The courier has a delay in your area; I have asked them to prioritise your order.",
                 "I have opened an investigation with the carrier and will email you tomorrow."],
    "refund": ["I have started your refund, and the money should reach your card in five days.",
               "Your return arrived and the refund was approved this morning.",
               "I can see a partial refund; I have sent the missing amount now."],
    "login": ["Please use the reset link I just sent and then sign in again.",
              "I have unlocked your account, so you can try again now.",
              "Make sure the app is updated, then request a new code from the sign-in page."],
    "cancel": ["I have cancelled it for you, and you will not be charged again.",
               "Your plan will end at the close of this billing period.",
               "The order was stopped before it shipped, so nothing more is needed."],
    "technical": ["Please update the app and restart your device; if it persists, reply here.",
                  "That sounds like a faulty unit, so I will send a replacement.",
                  "Could you tell me which version of the app you are using?"],
    "address": ["I have updated the address on your account and on any open orders.",
                "The parcel is already in transit, but I asked the courier to redirect it.",
                "Your new address is saved; please check the postcode on your profile."],
    "praise": ["We are glad you are happy with it, and I will pass this on to the team.",
               "That made our day, thank you for taking the time to write.",
               "Thanks so much, enjoy your purchase!"],
}
CLOSERS = ["", " Have a great day!", " Let me know if there is anything else.", " Best regards."]
SYSTEM = "You are a friendly customer support agent. Reply in one or two sentences."


def build_data(tok, n: int):
    from distill.config import TaskConfig
    from distill.data import builtin_task
    from distill.data.prompts import answer_ids, prompt_ids

    task = TaskConfig(type="generation", instruction=SYSTEM)
    rows = builtin_task.make_examples(n_per_label=max(1, (n + 7) // 8))[:n]
    rng = random.Random(0)
    seqs, positions, prompts = [], [], []
    for r in rows:
        p = prompt_ids(tok, task, None, r["text"])
        reply = f"{rng.choice(OPENERS)} {rng.choice(REPLIES[r['label']])}{rng.choice(CLOSERS)}"
        a = answer_ids(tok, task, None, reply)
        seqs.append(p + a)
        positions.append(list(range(len(p), len(p) + len(a))))
        prompts.append(p)
    return seqs, positions, prompts


def run_scoring(engine, seqs, positions, k, batch):
    out, t0 = [], time.perf_counter()
    for i in range(0, len(seqs), batch):
        out += engine.topk(seqs[i:i + batch], positions[i:i + batch], k)
    return out, time.perf_counter() - t0


def run_generation(engine, prompts, k, sampling, batch):
    out, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        seeds = [sampling.seed + i + j for j in range(len(prompts[i:i + batch]))]
        out += engine.generate_topk(prompts[i:i + batch], k, sampling, seeds)
    return out, time.perf_counter() - t0


def agreement(ref, got):
    """Mean |log-prob difference| over tokens both top-k rows hold, and the share of equal top-1 ids."""
    import torch

    diffs, top1, n = [], 0, 0
    for (ri, rv, _), (gi, gv, _) in zip(ref, got):
        for r in range(ri.shape[0]):
            a = dict(zip(ri[r].tolist(), rv[r].tolist()))
            b = dict(zip(gi[r].tolist(), gv[r].tolist()))
            diffs += [abs(a[t] - b[t]) for t in set(a) & set(b) if a[t] > -1e30 and b[t] > -1e30]
            top1 += int(ri[r, 0] == gi[r, 0])
            n += 1
    return {"mean_abs_logprob_diff": float(torch.tensor(diffs).mean()) if diffs else None,
            "top1_agreement": top1 / max(1, n)}


def compression(ref, seqs, positions, vocab_rows, ks, bits=None):
    import torch
    from safetensors.torch import save

    from distill.cache import store as cache_mod
    from distill.cache import topk_codec

    ids = torch.cat([r[0] for r in ref])
    vals = torch.cat([r[1] for r in ref])
    n = ids.shape[0]
    out = {}
    for k in ks:
        if k > ids.shape[1]:
            continue
        tail = (1 - vals[:, :k].double().exp().sum(-1)).clamp_min(0).float()
        rows, start = [], 0
        for s, p in zip(seqs, positions):
            rows.append(cache_mod.TopkExample(s, p, ids[start:start + len(p), :k], vals[start:start + len(p), :k],
                                              tail[start:start + len(p)]))
            start += len(p)
        plain = cache_mod.pack_topk(rows, 0)
        m = cache_mod.Manifest(kind="topk", teacher="", tokenizer_hash="", vocab_size=vocab_rows, k=k,
                               data_fingerprint="", labels=None, max_length=0,
                               codec={**cache_mod.DEFAULT_CODEC, **({"bits": bits} if bits else {})})
        t0 = time.perf_counter()
        enc = cache_mod.encode_topk(plain, m)
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        dec = cache_mod.decode_topk(enc)
        t_dec = time.perf_counter() - t0
        topk_keys = [key for key in enc if key.startswith("tk_")]
        kl1 = topk_codec.bucket_kl(plain["topk_ids"], plain["topk_logprobs"], plain["tail_mass"],
                                   dec["topk_ids"], dec["topk_logprobs"], dec["tail_mass"])
        kl2 = topk_codec.bucket_kl(plain["topk_ids"], plain["topk_logprobs"], plain["tail_mass"],
                                   dec["topk_ids"], dec["topk_logprobs"], dec["tail_mass"], temperature=2.0)
        out[k] = {
            "positions": n,
            "bytes_per_token_topk": sum(enc[x].numel() * enc[x].element_size() for x in topk_keys) / n,
            "bytes_per_token_shard": len(save({a: b.contiguous() for a, b in enc.items()})) / n,
            "plain_bytes_per_token_shard": len(save({a: b.contiguous() for a, b in plain.items()})) / n,
            "kl_mean": float(kl1.mean()), "kl_max": float(kl1.max()),
            "kl_mean_T2": float(kl2.mean()),
            "top1_kept": float((dec["topk_ids"][:, 0] == plain["topk_ids"][:, 0]).float().mean()),
            "encode_s": round(t_enc, 3), "decode_s": round(t_dec, 3),
        }
    return out


def time_backend(label, teacher, start_s, seqs, positions, prompts, sampling, args, ref) -> dict:
    """Scoring and generation rates of one started backend (after a warm-up), and its agreement with
    the transformers reference."""
    n_tokens = sum(map(len, seqs))
    run_scoring(teacher, seqs[:2], positions[:2], args.k, args.batch)
    got, secs = run_scoring(teacher, seqs, positions, args.k, args.batch)
    gen, gsecs = run_generation(teacher, prompts, args.k, sampling, args.batch)
    r = {"score_tok_s": n_tokens / secs, "generate_tok_s": sum(len(g.response) for g in gen) / gsecs,
         "startup_s": start_s, **agreement(ref, got)}
    print(f"{label}: scoring {r['score_tok_s']:.0f} tok/s, generating {r['generate_tok_s']:.1f} tok/s "
          f"(start-up {start_s:.0f} s); vs transformers: {agreement(ref, got)}", flush=True)
    return r


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=str(ROOT / "teachers" / "smollm2-135m-instruct.yaml"))
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--k", type=int, default=20, help="top-k for the throughput runs")
    ap.add_argument("--backends", default="transformers,vllm,server")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--gen-examples", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--ks", default="8,20,64,128", help="k values for the size / error table")
    ap.add_argument("--bits", type=int, help="bits per stored log-probability (default: the codec's)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for the transformers backend (0: torch's default). On a busy machine 1 can be "
                         "much faster than 2: OpenMP threads spin-wait for each other")
    ap.add_argument("--out", default="bench_generate.json")
    return ap.parse_args()


def time_engines(backends, spec, model_path, tok, rows, kmax, seqs, positions, prompts, sampling, args, ref) -> dict:
    """Rates of the vLLM engine and of a vLLM server started for the run, each against `ref`."""
    results = {}
    if "vllm" in backends:
        from distill.teacher.vllm_engine import VLLMTeacher

        t0 = time.perf_counter()
        eng = VLLMTeacher(model_path, spec, args.k, vocab_limit=len(tok), vocab_rows=rows)
        results["vllm"] = time_backend("vllm engine", eng, time.perf_counter() - t0, seqs, positions, prompts,
                                       sampling, args, ref)
        eng.close()
        del eng
        gc.collect()

    if "server" in backends:
        from distill.teacher.launch import ServedTeacher
        from distill.teacher.remote import ServerTeacher

        t0 = time.perf_counter()
        with ServedTeacher(spec, model_path=model_path, max_logprobs=kmax,
                           log_file=Path(args.out).with_suffix(".server.log")) as srv:
            cli = ServerTeacher(spec, tok, args.k, vocab_rows=rows, urls=[srv.url], model_path=model_path)
            results["server"] = time_backend("vllm server", cli, time.perf_counter() - t0, seqs, positions, prompts,
                                             sampling, args, ref)
            cli.close()
    return results


def print_default_ratio(results: dict, spec) -> None:
    """What `auto` picks here, against the fastest backend measured in this run."""
    from distill.teacher.backend import pick_backend

    default = pick_backend("auto", spec)
    for what in ("score_tok_s", "generate_tok_s"):
        best = max(results, key=lambda b: results[b][what])
        if default in results:
            ratio = results[default][what] / results[best][what]
            print(f"default backend here: {default}; {what}: {ratio:.2f} of the fastest ({best})"
                  f"{'' if ratio >= 0.9 else ' -- more than 10% slower'}", flush=True)


def print_cache_table(report: dict) -> None:
    print(f"\ncache (codec {report['codec']}): bytes per target token and reconstruction error")
    print(f"{'k':>4} {'top-k B/tok':>11} {'shard B/tok':>11} {'plain B/tok':>11} {'KL mean':>9} {'KL max':>9} "
          f"{'KL T=2':>9}")
    for k, r in report["cache"].items():
        print(f"{k:>4} {r['bytes_per_token_topk']:>11.1f} {r['bytes_per_token_shard']:>11.1f} "
              f"{r['plain_bytes_per_token_shard']:>11.1f} {r['kl_mean']:>9.1e} {r['kl_max']:>9.1e} "
              f"{r['kl_mean_T2']:>9.1e}")


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from distill.cache import store as cache_mod
    from distill.config import resolve_teacher
    from distill.data.prompts import stop_ids
    from distill.models.loading import load_tokenizer, model_vocab_rows, resolve_model_path
    from distill.teacher.common import Sampling
    from distill.teacher.hf import HFTeacher

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = resolve_teacher(args.teacher)
    model_path = resolve_model_path(spec.source)
    tok = load_tokenizer(model_path)
    rows = model_vocab_rows(model_path)
    ks = [int(x) for x in args.ks.split(",")]
    kmax = max(ks + [args.k])
    spec.max_logprobs = max(spec.max_logprobs, kmax)
    seqs, positions, prompts = build_data(tok, args.examples)
    prompts = prompts[: args.gen_examples]
    n_tokens = sum(map(len, seqs))
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, seed=0, stop_ids=stop_ids(tok))
    report = {"model": spec.source, "examples": len(seqs), "sequence_tokens": n_tokens,
              "target_tokens": sum(map(len, positions)), "k": args.k, "threads": torch.get_num_threads(),
              "backends": {}, "versions": versions()}
    print(f"{spec.source}: {len(seqs)} sequences, {n_tokens} tokens ({report['target_tokens']} targets); "
          f"top-{args.k}; {torch.get_num_threads()} threads", flush=True)

    # transformers: the reference, and the exact top-128 for the size table
    hf = HFTeacher(model_path, dtype=spec.dtype, vocab_limit=len(tok))
    run_scoring(hf, seqs[:2], positions[:2], args.k, args.batch)  # warm-up
    ref_full, secs = run_scoring(hf, seqs, positions, kmax, args.batch)
    ref = [(i[:, : args.k], v[:, : args.k], t) for i, v, t in ref_full]
    results = {}
    backends = [b for b in args.backends.split(",") if b]
    if "transformers" in backends:
        _, secs = run_scoring(hf, seqs, positions, args.k, args.batch)
        gen, gsecs = run_generation(hf, prompts, args.k, sampling, args.batch)
        results["transformers"] = {"score_tok_s": n_tokens / secs,
                                   "generate_tok_s": sum(len(g.response) for g in gen) / gsecs}
        print(f"transformers: scoring {n_tokens / secs:.0f} tok/s, generating "
              f"{results['transformers']['generate_tok_s']:.1f} tok/s", flush=True)
    hf.close()
    del hf
    gc.collect()

    results.update(time_engines(backends, spec, model_path, tok, rows, kmax, seqs, positions, prompts, sampling, args,
                                ref))
    report["backends"] = results
    if results:
        print_default_ratio(results, spec)

    report["cache"] = compression(ref_full, seqs, positions, rows, ks, args.bits)
    report["codec"] = {**cache_mod.DEFAULT_CODEC, **({"bits": args.bits} if args.bits else {})}
    print_cache_table(report)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
