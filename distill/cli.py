"""The `distill` command line: one subcommand per stage, each a thin layer over its module."""
from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
import typing
from pathlib import Path

import click

from distill.cli_options import (
    EVAL_NAME,
    POSITIVE,
    RECIPE_RULE,
    SEED,
    SET,
    check_out,
    limit_option,
    out_option,
    recipe_argument,
    recipe_option,
    teacher_url_option,
    tokenizer_option,
)
from distill.config import Backend, Loss, load_recipe
from distill.errors import UsageError, describe
from distill.evaluate.acceptance import GAMMAS
from distill.models.loading import allow_remote_code


def friendly_errors(fn):
    """Turn any exception into one line on stderr and exit 2 (usage) or 1 (failure); a traceback only
    with `distill --debug` or DISTILL_DEBUG=1. Unexpected errors are reported as internal errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _sigterm_interrupts()
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo(f"interrupted; {interrupt_advice()}", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the CLI boundary: every error becomes one line
            if _debug():
                traceback.print_exc()
            code, line = describe(e)
            click.echo(f"error: {line}", err=True)
            sys.exit(code)

    return wrapper


# What to run after Ctrl-C or SIGTERM: always a command that continues or redoes the work, never one that
# throws finished work away.
INTERRUPT_ADVICE = {
    "generate": "run the same command again to resume (finished shards are kept)",
    "eval": "run the same command again to evaluate afresh",
    "export": "run the same command again to export afresh",
    "bench": "run the same command again to measure afresh",
    "doctor": "run the same command again",
}


def interrupt_advice() -> str:
    """The resuming command for this command. A train without --resume starts afresh and removes the
    checkpoints of the interrupted run, so its advice is the same command with --resume."""
    ctx = click.get_current_context(silent=True)
    name = ctx.command.name if ctx else None
    if name == "train":
        if ctx.params.get("resume"):
            return "run the same command again (with its --resume) to continue from the newest checkpoint"
        return "add --resume to the same command to continue from the newest checkpoint"
    return INTERRUPT_ADVICE.get(name, "run the same command again")


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return os.environ.get("DISTILL_DEBUG") == "1" or bool(ctx and ctx.find_root().params.get("debug"))


def _sigterm_interrupts() -> None:
    """SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: temporary files are removed and
    the run stops where the same command resumes, instead of dying mid-write."""
    import signal
    import threading

    def on_term(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)


@click.group("distill", epilog=RECIPE_RULE + " `distill COMMAND --help` documents every option.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option("--debug", is_flag=True, help="Print the traceback of an error (also: DISTILL_DEBUG=1).")
@click.option("--trust-remote-code", is_flag=True, envvar="DISTILL_TRUST_REMOTE_CODE",
              help="Let a model directory's own Python code (config.json auto_map) run when it is loaded; "
                   "off by default because that code runs with your rights (also: DISTILL_TRUST_REMOTE_CODE=1).")
@click.version_option(package_name="distill")
def cli(verbose, debug, trust_remote_code):
    """Distill a large teacher model into a small student: generate -> train -> eval -> export -> bench.

    \b
    Examples:
      # the main job on the built-in task: fine-tune the teacher, cache its answers, distil an 8-layer student
      distill train recipes/default-teacher.yaml --out runs/default/teacher
      distill generate recipes/default.yaml && distill train recipes/default.yaml
      # evaluate a model (here the teacher before fine-tuning) on the recipe's holdout split
      distill eval teachers/smollm2-135m-instruct.yaml --recipe recipes/default.yaml --name teacher-zero-shot
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    allow_remote_code(trust_remote_code)  # set either way: one process may run several commands (tests)


@cli.command()
@recipe_argument()
@click.option("--teacher", help="Teacher spec (YAML), model directory, hub id or server URL; default: the recipe's.")
@click.option("--backend", type=click.Choice(typing.get_args(Backend)), help="Teacher backend.")
@out_option("Cache directory (default: WORKDIR/cache).")
@click.option("--k", type=POSITIVE, help="Top-k log-probabilities per position (token-level tasks).")
@click.option("--batch-size", type=POSITIVE, help="Examples per teacher call.")
@teacher_url_option("A running vLLM server of the teacher (`distill serve-teacher`).")
@click.option("--worker", metavar="I/N", callback=lambda ctx, param, v: _worker(v),
              help="Be worker I of N sharing --out (machines on one filesystem): write only shards I mod N; "
                   "finish with a run without --worker, which checks and completes the cache.")
@click.option("--teacher-name", help="A recipe of several teachers (`teachers:`): run this one alone.")
@SET
@friendly_errors
def generate(recipe, teacher, backend, out, k, batch_size, teacher_urls, worker, teacher_name, sets):
    """Run the teacher over the train and validation splits of RECIPE and cache its distributions.

    Classification: soft labels (the teacher's log-probability of every label). Generation: top-k
    log-probabilities at every response position plus the tail mass; rows without a response get one
    written by the teacher (generate.responses). Re-running resumes.
    """
    from distill.cache.generate import run_generate

    check_out(out, "cache")
    r = load_recipe(recipe, sets, {"generate.batch_size": batch_size})
    if r.teachers and teacher is None:  # each teacher into CACHE/teachers/NAME
        from distill.cache.ensemble import run_generate_teachers

        path = run_generate_teachers(r, teacher_name, backend=backend, out=out, k=k,
                                     urls=list(teacher_urls) or None, worker=worker)
    elif teacher_name is not None:
        raise UsageError("--teacher-name: picks one of a recipe's several teachers (`teachers:`)")
    else:
        path = run_generate(r, teacher=teacher, backend=backend, out=out, k=k, urls=list(teacher_urls) or None,
                            worker=worker)
    click.echo(f"teacher cache: {path}" + (f" (worker {worker[0]}/{worker[1]}: its shards)" if worker else ""))


def _worker(value: str | None) -> tuple[int, int] | None:
    """--worker I/N -> (I, N), 0 <= I < N."""
    if value is None:
        return None
    i, _, n = value.partition("/")
    if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise click.BadParameter(f"{value!r}: expected I/N with 0 <= I < N, e.g. 0/2", param_hint="--worker")
    return int(i), int(n)


@cli.command("write-texts")
@recipe_argument()
@click.option("--teacher", help="Model that writes (spec, directory, hub id); default: the recipe's teacher.")
@click.option("--backend", type=click.Choice(typing.get_args(Backend)), help="Teacher backend.")
@click.option("--count", type=POSITIVE, help="Texts to keep (write_texts.count).")
@teacher_url_option("A running vLLM server of the model that writes.")
@SET
@friendly_errors
def write_texts(recipe, teacher, backend, count, teacher_urls, sets):
    """Have the teacher write new unlabelled texts for RECIPE's task into WORKDIR/written/texts.jsonl.

    Prompts hold write_texts.instruction and a few seeded training texts; a text is kept once cleaned and
    unlike every other and every split's (the holdout above all). Set task.written_data to the file to add
    them to the unlabelled pool. Re-running continues; the same seed gives the same texts.
    """
    from distill.cache.write_texts import run_write_texts

    r = load_recipe(recipe, sets, {"write_texts.count": count})
    path = run_write_texts(r, teacher=teacher, backend=backend, urls=list(teacher_urls) or None)
    click.echo(f"written texts: {path}")


@cli.command("serve-teacher")
@click.argument("teacher_spec")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@friendly_errors
def serve_teacher(teacher_spec, port, host):
    """Serve TEACHER_SPEC (a teacher YAML or model directory) with vLLM's OpenAI server for `generate --teacher-url`.

    Passes max_logprobs, tensor/data parallel sizes, dtype, max_model_len and GPU memory use from the
    spec; prints the URL once GET /health answers; Ctrl-C or SIGTERM stops the server and its workers.
    """
    from distill.config import resolve_teacher
    from distill.teacher.launch import serve_forever

    spec = resolve_teacher(teacher_spec)
    if not spec.source:
        raise UsageError(f"{teacher_spec}: nothing to serve; expected a teacher spec with `source:` or a model "
                         "directory (a server URL is already served: give it to generate --teacher-url)")
    serve_forever(spec, port, host, echo=click.echo)


@cli.command()
@recipe_argument()
@click.option("--cache", type=click.Path(file_okay=False), help="Teacher cache (default: WORKDIR/cache).")
@out_option("Model directory to write (default: WORKDIR/student).")
@click.option("--init-from", help="Model to build the student from (default: the recipe's teacher).")
@click.option("--alpha", type=float, help="Weight of the distillation term (0 = supervised fine-tuning only).")
@click.option("--temperature", type=float, help="Distillation temperature T.")
@click.option("--epochs", type=float, help="Epochs over the training split (fractions allowed).")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--batch-size", type=int, help="Global batch size (split over processes).")
@click.option("--num-layers", type=int, help="Keep this many teacher layers, evenly spaced.")
@click.option("--train-examples", type=int,
              help="Train on a stratified, seeded sample of N training examples (generation tasks: the first N).")
@SEED
@click.option("--loss", type=click.Choice(typing.get_args(Loss)),
              help="Divergence of the distillation term (train.loss).")
@click.option("--max-steps", type=int, help="Cap on optimizer steps (the schedule is fitted to it).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT/checkpoints (without it, "
                                             "train starts afresh and removes the checkpoints of an earlier run).")
@click.option("--stop-after-steps", type=POSITIVE,
              help="Stop after N optimizer steps with a checkpoint, schedule unchanged (continue with --resume).")
@teacher_url_option("On-policy training (train.on_policy.fraction > 0): a vLLM server of the teacher that scores "
                    "the student's samples.")
@SET
@friendly_errors
def train(recipe, cache, out, init_from, alpha, temperature, epochs, lr, batch_size, num_layers, train_examples, seed,
          loss, max_steps, resume, stop_after_steps, teacher_urls, sets):
    """Train a student of RECIPE from the teacher cache: alpha*T^2*D + (1-alpha)*CE, best epoch saved.

    D is train.loss (forward KL by default). Multi-process: `accelerate launch --config_file
    recipes/accelerate/ddp.yaml --num_processes N -m distill train RECIPE` (or zero2.yaml, zero3.yaml).
    """
    from distill.train import run_train

    check_out(out, "model")  # '' (an unset variable), root-like, a user's directory (train/setup checks the default)
    options = {"train.alpha": alpha, "train.temperature": temperature, "train.epochs": epochs, "train.lr": lr,
               "train.batch_size": batch_size, "train.student.num_layers": num_layers,
               "train.train_examples": train_examples, "train.seed": seed, "train.loss": loss,
               "train.max_steps": max_steps}
    r = load_recipe(recipe, sets, options)
    path = run_train(r, cache=cache, out=out, init_from=init_from, resume=resume, stop_after_steps=stop_after_steps,
                     teacher_urls=list(teacher_urls) or None)
    if os.environ.get("RANK", "0") == "0":  # one line from a multi-process run
        click.echo(f"model: {path}")


@cli.command("eval")
@click.argument("model", nargs=-1, required=True)
@recipe_option(True, "Recipe whose task (labels, instruction, splits) defines the evaluation.")
@click.option("--split", default="holdout", show_default=True, type=click.Choice(["holdout", "validation", "train"]))
@click.option("--data", type=click.Path(dir_okay=False), help="Score this file instead of a split.")
@click.option("--shots", default=0, show_default=True, type=click.IntRange(min=0),
              help="Few-shot examples from the training split (baseline mode).")
@EVAL_NAME
@out_option("Report directory (default: WORKDIR/eval/NAME for the holdout; NAME-train, NAME-validation, "
            "NAME-<data file stem>, with -Nshot and -limitN added, for the others).")
@click.option("--batch-size", default=16, show_default=True, type=POSITIVE, help="Examples scored per batch.")
@limit_option("Score a sample of N examples, stratified by label for classification")
@tokenizer_option("Tokenizer directory for a .gguf MODEL (default: the GGUF's own directory if it has one, else "
                  "the tokenizer inside the GGUF).")
@click.option("--backend", default="transformers", show_default=True, type=click.Choice(["transformers", "vllm"]),
              help="Generation tasks: the runtime that decodes a model directory (a .gguf decodes in llama.cpp).")
@SET
@friendly_errors
def eval_cmd(model, recipe, split, data, shots, name, out, batch_size, limit, tokenizer, backend, sets):
    """Evaluate MODEL (directory, hub id, teacher spec, or .gguf run by llama.cpp) on a holdout. Several
    MODELs (classification) are scored as their ensemble: the mean of their label probabilities.

    Classification scores every label and writes report.json (accuracy, per-class precision/recall/F1,
    macro and weighted F1), the confusion matrix as PNG and CSV, and predictions.jsonl. Generation decodes
    every prompt greedily and writes report.json (exact match; for task.output json the valid-JSON rate,
    field-level F1 and the task.class_field's accuracy, per-class F1 and confusion matrix; for text chrF)
    and predictions.jsonl (prompt, reference, output).
    """
    if any(m.endswith(".gguf") for m in model):  # llama.cpp's OpenMP threads must sleep, not spin, beside torch
        from distill.models.llamacpp import passive_openmp

        passive_openmp()
    from distill.evaluate.evaluation import format_report, run_eval

    check_out(out, "eval")
    r = load_recipe(recipe, sets)
    report = run_eval(list(model), r, split=split, data=data, shots=shots, out=out, name=name,
                      batch_size=batch_size, limit=limit, tokenizer=tokenizer, backend=backend)
    click.echo(format_report(report, list(report.get("per_class", ()))))


@cli.command("export")
@click.argument("model_dir", type=click.Path())
@click.option("--format", "fmt", default="gguf", show_default=True, type=click.Choice(["gguf"]), help="Output format.")
@click.option("--quant", default="q4_k_m", show_default=True, type=click.Choice(["f16", "q8_0", "q4_0", "q4_k_m"]),
              help="Weight type (q4_k_m needs llama-cpp-python).")
@out_option("GGUF file to write.", file=True, required=True)
@click.option("--verify-with", default="auto", show_default=True,
              type=click.Choice(["auto", "llama_cpp", "transformers"]),
              help="Runtime that reloads the file to compare logits (auto: llama.cpp when installed).")
@click.option("--no-verify", is_flag=True, help="Skip the logit comparison with the source model.")
@recipe_option(False, "Recipe whose training split calibrates q4_k_m (default: the one in MODEL_DIR/training.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@SET
@friendly_errors
def export_cmd(model_dir, fmt, quant, out, verify_with, no_verify, recipe, as_json, sets):
    """Export MODEL_DIR (a model directory or a LoRA adapter, merged into its base) to GGUF for llama.cpp.

    The written file is reloaded and its logits compared with the source model at every position of a
    few probe prompts; an export below the quant's expected agreement fails and leaves no file.
    """
    import json

    from distill.export.pipeline import check_out_outside_source, export_gguf, format_export_report

    if sets and not recipe:
        raise UsageError("--set changes the recipe given with --recipe; add --recipe RECIPE")
    check_out_outside_source(Path(out), Path(model_dir))  # the more telling refusal first
    check_out(out, file=True)
    r = load_recipe(recipe, sets) if recipe else None
    report = export_gguf(model_dir, out, quant=quant, verify=False if no_verify else verify_with, recipe=r)
    click.echo(json.dumps(report, indent=2) if as_json else format_export_report(report))


@cli.command()
@recipe_argument()
@click.option("--teacher", required=True, help="Teacher: model directory, hub id, teacher spec or .gguf.")
@click.option("--student", "students", multiple=True, help="Student (repeatable): directory or .gguf.")
@click.option("--draft", help="Instead of students: a draft model for the teacher's speculative decoding "
                              "(acceptance per position, tokens/s alone and with it at the best number of proposed "
                              "tokens; outputs checked identical): a model directory (transformers' assisted "
                              "generation) or, with a .gguf teacher, a .gguf (llama.cpp). Generation tasks; "
                              "default --out WORKDIR/bench-draft.")
@click.option("--gammas", default=",".join(map(str, GAMMAS)), show_default=True,
              help="With --draft: the numbers of proposed tokens timed (comma-separated); the best is the fastest "
                   "of them. Acceptance is counted at these and at the default's (one draft pass for all).")
@click.option("--data", type=click.Path(dir_okay=False), help="Holdout file (default: the recipe's holdout split).")
@click.option("--batch-size", default=16, show_default=True, type=POSITIVE,
              help="Batch size for the throughput figure.")
@click.option("--latency-examples", default=32, show_default=True, type=POSITIVE,
              help="Examples timed one by one for latency.")
@limit_option("Use a sample of N holdout examples, stratified by label for classification")
@tokenizer_option()
@out_option("Output directory (default: WORKDIR/bench).")
@SET
@friendly_errors
def bench(recipe, teacher, students, draft, gammas, data, batch_size, latency_examples, limit, tokenizer, out, sets):
    """Teacher vs students on the holdout of RECIPE: quality, agreement, size, latency, throughput, memory.

    Writes bench.md (table), bench.json and bench.png (quality vs latency). With --draft: the teacher's
    speculative decoding with that draft (bench.png: acceptance per proposed position).
    """
    if bool(students) == bool(draft):
        raise UsageError("give --student (repeatable) or --draft, one of the two: `distill bench RECIPE --teacher T "
                         "--student S` or `distill bench RECIPE --teacher T --draft D`")
    if draft:
        from distill.models.llamacpp import passive_openmp

        passive_openmp()
        from distill.evaluate.speculative import parse_gammas, run_draft_bench

        check_out(out, "bench")
        report = run_draft_bench(load_recipe(recipe, sets), teacher, draft, data=data, limit=limit, out=out,
                                 tokenizer=tokenizer, gammas=parse_gammas(gammas))
        click.echo(Path(report["out_dir"], "bench.md").read_text())
        click.echo(f"written to {report['out_dir']} (bench.md, bench.json, bench.png)")
        return
    from distill.models.llamacpp import passive_openmp

    passive_openmp()  # inherited by the per-model processes
    from distill.evaluate.bench import run_bench

    check_out(out, "bench")
    r = load_recipe(recipe, sets)
    report = run_bench(r, teacher, list(students), data=data, batch_size=batch_size,
                       latency_examples=latency_examples, limit=limit, out=out, tokenizer=tokenizer)
    click.echo((Path(report["out_dir"]) / "bench.md").read_text())
    click.echo(f"written to {report['out_dir']} (bench.md, bench.json, bench.png)")


@cli.command()
@recipe_argument(required=False)
@click.option("--teacher", help="Teacher spec, model directory or server URL (default: the recipe's).")
@click.option("--cache", type=click.Path(file_okay=False),
              help="Teacher cache to check (default: the recipe's, if any).")
@click.option("--student", help="Student model whose tokenizer must match the cache.")
@click.option("--no-estimate", is_flag=True, help="Skip timing the teacher for the generate estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@SET
@friendly_errors
def doctor(recipe, teacher, cache, student, no_estimate, as_json, sets):
    """Check the environment, a teacher, a RECIPE (optional) and a cache; estimate disk and time for generate.

    Exits 1 when any check fails.
    """
    from distill.doctor import format_rows, rows_json, run_doctor

    if sets and not recipe:
        raise UsageError("--set changes a recipe, and none is given; add it as the first argument: "
                         "distill doctor RECIPE --set KEY=VALUE")
    checked = load_recipe(recipe, sets) if sets else recipe  # without --set, a bad recipe is a failed check
    rows, ok = run_doctor(checked, teacher, cache, student, estimate=not no_estimate)
    click.echo(rows_json(rows) if as_json else format_rows(rows))
    if not ok:
        sys.exit(1)


def main():
    cli(prog_name="distill")
