"""Options several `distill` commands share, written once so that each means the same everywhere, and the
checks on what a user types that no module behind the CLI could make (an unset shell variable, a name that
climbs out of its directory)."""
from __future__ import annotations

import functools

import click

from distill.config import SEED_MAX
from distill.fileio import check_output_dir, check_output_file

RECIPE_RULE = ("The recipe is the first argument of every command without a MODEL argument (generate, train, bench, "
               "doctor); eval and export, whose first argument is the model, take it as --recipe RECIPE.")


class FileName(click.ParamType):
    """A value that becomes one file or directory name (eval's report directory): a separator or `..`
    would put the output somewhere else than the directory it belongs in."""

    name = "name"

    def convert(self, value, param, ctx):
        from distill.config import check_path_name
        from distill.errors import UsageError

        try:
            return check_path_name(str(value), f"{value!r}")
        except UsageError as e:
            self.fail(str(e), param, ctx)


RECIPE_PATH = click.Path(dir_okay=False)
POSITIVE = click.IntRange(min=1)
SET = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                   help="Set any recipe key, the value read as YAML and checked like the file's (repeatable), "
                        "e.g. --set train.lora.r=16 --set train.lora.target_modules=[q_proj,v_proj].")
SEED = click.option("--seed", type=int, help=f"Random seed (0 to {SEED_MAX}; checked with the recipe's).")
EVAL_NAME = click.option("--name", type=FileName(),
                         help="Name for the report directory (default: the model's directory name); a plain name.")


def out_option(help: str, file: bool = False, required: bool = False):
    """--out: where the command writes (checked by `check_out`)."""
    kind = click.Path() if file else click.Path(file_okay=False)  # a file: fileio says what a directory is
    return click.option("--out", type=kind, required=required, help=help)


def teacher_url_option(help: str):
    """--teacher-url URL (repeatable): running vLLM servers of the teacher."""
    return click.option("--teacher-url", "teacher_urls", multiple=True, metavar="URL",
                        help=help + " Repeat to spread the work over several.")


def tokenizer_option(help: str = "Tokenizer directory for .gguf models."):
    return click.option("--tokenizer", type=click.Path(file_okay=False), help=help)


def limit_option(help: str):
    return click.option("--limit", type=POSITIVE, help=help + " (seeded: the same N every time).")


def recipe_option(required: bool, help: str):
    """--recipe RECIPE, the spelling of the commands whose first argument is a MODEL (eval, export)."""
    return click.option("--recipe", "recipe", required=required, type=RECIPE_PATH, help=help)


def recipe_argument(required: bool = True):
    """RECIPE as the first argument (commands without a MODEL argument). `--recipe RECIPE`, the older
    spelling of bench and doctor, still works with a one-line deprecation warning."""

    def decorate(fn):
        @functools.wraps(fn)
        def merged(*args, recipe=None, recipe_flag=None, **kwargs):
            ctx = click.get_current_context()
            if recipe is not None and recipe_flag is not None:
                raise click.UsageError("the recipe is given twice; give it once, as the first argument", ctx)
            if recipe_flag is not None:
                click.echo(f"warning: --recipe is deprecated for `{ctx.command_path}`: give the recipe as its first "
                           f"argument ({ctx.command_path} RECIPE ...)", err=True)
                recipe = recipe_flag
            if recipe is None and required:
                raise click.UsageError("Missing argument 'RECIPE' (a recipe file, e.g. recipes/default.yaml).", ctx)
            return fn(*args, recipe=recipe, **kwargs)

        metavar = "RECIPE" if required else "[RECIPE]"  # parsed as optional so that --recipe can stand in
        merged = click.argument("recipe", required=False, type=RECIPE_PATH, metavar=metavar)(merged)
        return click.option("--recipe", "recipe_flag", type=RECIPE_PATH, hidden=True)(merged)

    return decorate


def check_out(out, kind: str | None = None, file: bool = False) -> None:
    """A given --out must not be empty (`--out $UNSET`), root-like or a user's own directory or file:
    a run would scatter its outputs there, and a later run's clean-up of its own outputs start there."""
    if out is not None:
        check_output_file(out, "--out") if file else check_output_dir(out, "--out", kind)
