"""Speculative decoding measured: a teacher with a draft model (`distill bench --draft`).

Two kinds of figures, each exact in its own way:
- **Acceptance** (greedy): how many of a draft's proposed tokens the teacher would accept at each
  verification step, counted directly on the teacher's own greedy output. While the draft's proposals
  match the teacher, the draft's context is the teacher's output itself, so the draft's greedy proposal at
  every prefix comes from ONE forward pass of the draft over prompt + teacher output; the count for any
  number of proposed tokens (gamma) follows from that, with no sampling and no estimate.
- **Speed**: transformers' assisted generation (`generate(assistant_model=draft)`, batch 1, as it requires)
  against the teacher alone at batch 1, tokens/s for every gamma; the best gamma is the fastest measured.
  Two .gguf files run the same measurement in llama.cpp (speculative_gguf.py).
  Greedy outputs with the draft must equal the teacher's alone on every prompt: a difference is an error,
  never a figure, so no speed-up is reported for outputs that differ.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from distill.errors import UsageError
from distill.evaluate.acceptance import GAMMAS, acceptance_stats, check_identical, counted


def parse_gammas(text: str) -> tuple[int, ...]:
    """`--gammas 1,2,4`: the numbers of proposed tokens to measure, each a positive integer."""
    try:
        gammas = sorted({int(g) for g in str(text).split(",") if g.strip()})
    except ValueError:
        gammas = []
    if not gammas or gammas[0] < 1:
        raise UsageError(f"--gammas: expected positive integers separated by commas (e.g. 1,2,4), got {text!r}")
    return tuple(gammas)


@dataclass
class Pair:
    """A teacher and its draft, loaded once, on one device; `vocab` bounds the tokens either may emit."""

    teacher: object
    draft: object
    vocab: int
    stop_ids: list[int]


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cut_at_stop(tokens: list[int], stops) -> list[int]:
    """Tokens up to and including the first stop token: what the teacher decodes (and verifies)."""
    for j, t in enumerate(tokens):
        if t in stops:
            return tokens[:j + 1]
    return tokens


def greedy_one(model, prompt: list[int], max_new_tokens: int, stop_ids: list[int], vocab: int | None = None,
               draft=None, gamma: int | None = None) -> list[int]:
    """One greedy response at batch 1 (with the KV cache), through transformers' assisted generation when a
    draft is given; the stop token kept, since the teacher decodes it like any other token."""
    import torch

    rows = model.get_output_embeddings().weight.shape[0]
    kwargs = {"suppress_tokens": list(range(vocab, rows))} if vocab and vocab < rows else {}
    if draft is not None:
        # the assistant reads its own generation config: exactly gamma proposals per step, no early stop
        draft.generation_config.num_assistant_tokens = gamma
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0
        kwargs.update(assistant_model=draft, num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant")
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=None,
                             eos_token_id=list(stop_ids) or None, pad_token_id=stop_ids[0] if stop_ids else 0,
                             **kwargs)
    return _cut_at_stop(out[0, len(prompt):].tolist(), set(stop_ids))


def timed_decode(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], vocab: int | None = None,
                 draft=None, gamma: int | None = None) -> tuple[list[list[int]], float]:
    """Greedy responses to every prompt at batch 1 and the seconds they took together."""
    outputs, start = [], time.perf_counter()
    for p in prompts:
        outputs.append(greedy_one(model, p, max_new_tokens, stop_ids, vocab, draft, gamma))
    _sync()
    return outputs, time.perf_counter() - start


def draft_matches(draft, prompts: list[list[int]], outputs: list[list[int]], vocab: int | None = None,
                  batch_size: int = 8) -> list[list[bool]]:
    """match[t]: whether the draft's greedy token after prompt + output[:t] is output[t]. One forward pass of
    the draft per sequence (right-padded batches: causal attention keeps padding out of earlier positions)."""
    import torch

    result: list[list[bool]] = []
    for b in range(0, len(prompts), batch_size):
        seqs = [p + o for p, o in zip(prompts[b:b + batch_size], outputs[b:b + batch_size])]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            att[i, :len(s)] = 1
        with torch.no_grad():
            logits = draft(input_ids=ids.to(draft.device), attention_mask=att.to(draft.device)).logits
        if vocab:
            logits = logits[..., :vocab]
        best = logits.argmax(-1).cpu()
        for i, (p, o) in enumerate(zip(prompts[b:b + batch_size], outputs[b:b + batch_size])):
            guess = best[i, len(p) - 1:len(p) - 1 + len(o)].tolist()
            result.append([g == t for g, t in zip(guess, o)])
    return result


def acceptance(teacher, draft, prompts: list[list[int]], gamma, max_new_tokens: int, stop_ids: list[int],
               vocab: int | None = None, outputs: list[list[int]] | None = None) -> dict:
    """Exact greedy acceptance of the draft by the teacher for one gamma or a list of them: the teacher's
    greedy responses (decoded here unless given), one draft pass over each, the steps counted."""
    gammas = [gamma] if isinstance(gamma, int) else list(gamma)
    if outputs is None:
        outputs = [greedy_one(teacher, p, max_new_tokens, stop_ids, vocab) for p in prompts]
    matches = draft_matches(draft, prompts, outputs, vocab)
    return {"outputs": outputs, "matches": matches, "by_gamma": {g: acceptance_stats(matches, g) for g in gammas}}


def model_size(model) -> dict:
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "layers": getattr(model.config, "num_hidden_layers", None)}


def speculative_figures(pair: Pair, prompts: list[list[int]], max_new_tokens: int, gammas=GAMMAS) -> dict:
    """The bench's figures: the teacher alone (timed, batch 1), acceptance for every gamma from its outputs,
    assisted generation timed for every gamma with outputs checked, the best gamma by measured tokens/s."""
    t, d, stops, vocab = pair.teacher, pair.draft, pair.stop_ids, pair.vocab
    warm = prompts[:1]
    timed_decode(t, warm, max_new_tokens, stops, vocab)
    alone, alone_s = timed_decode(t, prompts, max_new_tokens, stops, vocab)
    acc = acceptance(t, d, prompts, counted(gammas), max_new_tokens, stops, vocab, outputs=alone)
    tokens = sum(len(o) for o in alone)
    rows = []
    for g in gammas:
        timed_decode(t, warm, max_new_tokens, stops, vocab, d, g)
        assisted, seconds = timed_decode(t, prompts, max_new_tokens, stops, vocab, d, g)
        check_identical(alone, assisted, g)
        rows.append({**acc["by_gamma"][g], "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
                     "speedup": alone_s / max(seconds, 1e-9), "outputs_identical": True})
    best = max(rows, key=lambda r: r["tokens_per_s"])
    return {"n": len(prompts), "tokens": tokens, "runtime": "transformers", "device": str(t.device),
            "teacher_size": model_size(t), "draft_size": model_size(d),
            "alone": {"seconds": alone_s, "tokens_per_s": tokens / max(alone_s, 1e-9)},
            "gammas": rows, "best_gamma": best["gamma"], "best_speedup": best["speedup"],
            "acceptance": acc["by_gamma"],
            "outputs": alone}


def load_pair(teacher_ref: str, draft_ref: str, tok, dtype: str = "float32") -> Pair:
    """Teacher and draft on one device; a draft whose tokenizer differs from the teacher's is refused
    (assisted generation compares token ids)."""
    from distill.data.prompts import stop_ids
    from distill.evaluate.generation_eval import model_source
    from distill.models.loading import load_model, load_tokenizer, tokenizer_hash

    teacher, _ = load_model(model_source(teacher_ref), dtype)
    draft, draft_tok_dir = load_model(model_source(draft_ref), dtype)
    own = any((Path(draft_tok_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if own and tokenizer_hash(load_tokenizer(draft_tok_dir)) != tokenizer_hash(tok):
        raise UsageError(f"--draft {draft_ref}: its tokenizer differs from the teacher's; a draft must share the "
                         "teacher's vocabulary (a smaller model of its family, or a cut of the teacher)")
    device = _device()
    return Pair(teacher.to(device).eval(), draft.to(device).eval(), len(tok), stop_ids(tok))


def markdown_table(report: dict) -> str:
    """The printed table: one row per gamma, the teacher alone first."""
    d = report["draft_size"]
    lines = [f"Speculative decoding: {report['n']} prompts, greedy, batch 1, {report['runtime']} on "
             f"{report['device']}; draft {d['parameters'] / 1e6:.1f}M parameters, {d['layers']} layers. "
             f"Outputs with the draft identical to the teacher's on every prompt.", "",
             "| gamma | acceptance per position | mean accepted | tokens/forward | teacher forwards | tok/s | "
             "speed-up |", "|---|---|---|---|---|---|---|",
             f"| teacher alone | — | — | 1.00 | {report['tokens']} | {report['alone']['tokens_per_s']:.1f} | 1.00× |"]
    timed = {r["gamma"]: r for r in report["gammas"]}
    counted_only = {int(g): a for g, a in report.get("acceptance", {}).items() if int(g) not in timed}
    for g in sorted({*timed, *counted_only}):  # every gamma in order, the untimed ones with acceptance alone
        r = timed.get(g) or counted_only[g]
        per = " ".join("—" if a is None else f"{a:.2f}" for a in r["acceptance_per_position"])
        mark = " (best)" if g == report["best_gamma"] else "" if g in timed else " (not timed)"
        speed = f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}×" if g in timed else "— | —"
        lines.append(f"| {g}{mark} | {per} | {r['mean_accepted']:.2f} | {r['tokens_per_forward']:.2f} | "
                     f"{r['teacher_forwards']} | {speed} |")
    return "\n".join(lines) + "\n"


def acceptance_chart(report: dict) -> bytes:
    """Acceptance per proposed position, one line per gamma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["gammas"]:
        xs = [j + 1 for j, a in enumerate(r["acceptance_per_position"]) if a is not None]
        ys = [a for a in r["acceptance_per_position"] if a is not None]
        ax.plot(xs, ys, marker="o", label=f"gamma {r['gamma']} ({r['speedup']:.2f}×)")
    ax.set_xlabel("proposed position (given the earlier ones accepted)")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    from distill.evaluate.confusion import png_bytes

    return png_bytes(fig)


def run_draft_bench(recipe, teacher_ref: str, draft_ref: str, data: str | None = None, limit: int | None = None,
                    out: str | None = None, tokenizer: str | None = None, gammas=GAMMAS) -> dict:
    """`distill bench RECIPE --teacher T --draft D`: the recipe's holdout prompts (built as eval builds them),
    figures for every gamma, bench.json, bench.md and bench.png (acceptance) written as one unit."""
    from distill.data.prompts import generation_prompt
    from distill.evaluate.evaluation import check_report_dir, eval_examples
    from distill.evaluate.generation_eval import load_tokenizer_for
    from distill.fileio import check_output_dir, write_file_set

    if recipe.task.type != "generation":
        raise UsageError(f"--draft: speculative decoding needs a generation task; {recipe.path or 'the recipe'} "
                         f"is {recipe.task.type}")
    ggufs = [str(ref).endswith(".gguf") for ref in (teacher_ref, draft_ref)]
    if any(ggufs) and not all(ggufs):
        raise UsageError("--draft: teacher and draft must both be model directories (transformers' assisted "
                         f"generation) or both .gguf files (llama.cpp); got --teacher {teacher_ref} and --draft "
                         f"{draft_ref}")
    if out is not None:
        check_output_dir(out, "--out", "bench")
    out_dir = Path(out or recipe.workdir_path / "bench-draft")
    files = ("bench.json", "bench.md", "bench.png")
    check_report_dir(out_dir, files)
    examples, _ = eval_examples(recipe, "holdout", data, limit)
    tok = load_tokenizer_for(teacher_ref, tokenizer)
    task = recipe.task
    prompts = [generation_prompt(tok, task, ex, task.max_length) for ex in examples]
    max_new = max(max(1, min(recipe.generate.max_new_tokens, task.max_length - len(p))) for p in prompts)
    if all(ggufs):
        from distill.data.prompts import stop_ids
        from distill.evaluate.speculative_gguf import gguf_figures

        figures = gguf_figures(teacher_ref, draft_ref, prompts, max_new, stop_ids(tok), list(gammas))
    else:
        figures = speculative_figures(load_pair(teacher_ref, draft_ref, tok), prompts, max_new, gammas)
    report = {"task": "speculative", "teacher": str(teacher_ref), "draft": str(draft_ref), "split": data or "holdout",
              "max_new_tokens": max_new, **figures}
    report["outputs"] = [tok.decode(o, skip_special_tokens=True) for o in report["outputs"]]
    write_file_set(out_dir, {"bench.json": json.dumps(report, indent=1), "bench.md": markdown_table(report),
                             "bench.png": acceptance_chart(report)})
    report["out_dir"] = str(out_dir)
    return report
