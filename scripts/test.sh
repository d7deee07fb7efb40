#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_LLAMA=1 bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
ruff check .  # the linter and the 120-column limit (pyproject.toml [tool.ruff])
python -m pytest tests "$@"
