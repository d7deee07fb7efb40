"""Errors the CLI turns into one clear line and an exit status, never a traceback."""


class DistillError(Exception):
    """A failure while doing the work (exit status 1)."""

    exit_code = 1


class UsageError(DistillError):
    """Bad input from the user: a recipe key, a path, a data row (exit status 2)."""

    exit_code = 2


def where(path, line=None, key=None) -> str:
    """Format a location such as `data.jsonl:12` or `recipe.yaml: train.lr`."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if key is not None:
        loc += f": {key}"
    return loc
