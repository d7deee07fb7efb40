#!/usr/bin/env bash
# On a machine with a CUDA GPU, prove in under 10 minutes that distill runs there:
#   1. torch sees the GPU; `distill doctor` passes on the default recipe;
#   2. the main job (scripts/run_default.sh: baseline, teacher fine-tune, soft labels, student, evals) on the
#      GPU, with the vLLM engine writing the soft labels (generate.backend auto picks it on a GPU);
#   3. vLLM generation: the teacher writes greedy responses through the vLLM engine for 64 prompts of a
#      generation task (the built-in texts, each answered with its intent) and the same prompts through
#      transformers: tokens/s of each and how many outputs agree (greedy decoding: all, up to float noise);
#   4. a 2-process training step: `accelerate launch` with recipes/accelerate/ddp.yaml, 2 optimizer steps,
#      one process per GPU on NCCL (two GPUs), or on a one-GPU machine two processes on its CPU cores
#      (gloo: NCCL refuses two ranks on one device), said in the output.
# Each part has its own time limit; the script stops at the first failure and prints what passed.
#   bash scripts/gpu_check.sh               # GPU_CHECK_DIR (default runs/gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${GPU_CHECK_DIR:-runs/gpu-check}
mkdir -p $W
start=$(date +%s)
part() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

part "0 set-up (scripts/setup.sh: the GPU stack where nvidia-smi sees a GPU)"
bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
nvidia-smi -L
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')"
python -c "import vllm; print('vllm', vllm.__version__)"

part "1 distill doctor"
distill doctor recipes/default.yaml

part "2 the main job on the GPU (scripts/run_default.sh)"
timeout 300 bash scripts/run_default.sh

part "3 vLLM generation against transformers (64 prompts, greedy)"
python - $W <<'PY'
import json, sys
from pathlib import Path
from distill.data.builtin_task import make_examples
out = Path(sys.argv[1]) / "gen.jsonl"
rows = make_examples()
out.write_text("".join(json.dumps({"prompt": r["text"], "response": r["label"]}) + "\n" for r in rows[:64]))
print(f"{len(rows[:64])} prompts -> {out}")
PY
timeout 240 python scripts/bench_decode.py --data $W/gen.jsonl --examples 64 --max-new-tokens 32 \
  --runtimes vllm,transformers:64 --out $W/bench_decode.json

part "4 a 2-process training step (accelerate launch, DDP)"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
  echo "two processes, one GPU each, on NCCL"
  timeout 180 accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 -m distill train \
    recipes/default.yaml --out $W/ddp --set train.max_steps=2 --set workdir=runs/default
else
  echo "one GPU: two processes on the CPU cores (gloo), since NCCL refuses two ranks on one device"
  CUDA_VISIBLE_DEVICES= timeout 240 accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 \
    -m distill train recipes/default.yaml --out $W/ddp --set train.max_steps=2 --set workdir=runs/default
fi
python -c "import json; d = json.load(open('$W/ddp/training.json')); assert d['world_size'] == 2, d['world_size']; print('2-process run: world size', d['world_size'])"

echo; echo "gpu_check: every part passed in $(( $(date +%s) - start )) s"
