#!/usr/bin/env bash
# The main job on the built-in default task, from a fresh clone:
#   baseline (zero-shot teacher) -> fine-tune the teacher (LoRA, alpha=0) -> eval teacher
#   -> generate soft labels -> distil an 8-layer student -> eval student -> summary.
# Each step is skipped when its output is already there, so a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
W=runs/default
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start ))s)"; }

step "1/6 baseline: the untrained teacher, zero-shot, on the holdout"
[ -f $W/eval/teacher-zero-shot/report.json ] || \
  distill eval teachers/smollm2-135m-instruct.yaml --recipe recipes/default.yaml --name teacher-zero-shot

step "2/6 fine-tune the teacher (LoRA, alpha=0, merged)"
[ -f $W/teacher/training.json ] || distill train recipes/default-teacher.yaml --out $W/teacher

step "3/6 evaluate the fine-tuned teacher on the holdout"
[ -f $W/eval/teacher/report.json ] || distill eval $W/teacher --recipe recipes/default.yaml --name teacher

step "4/6 generate soft labels with the teacher"
distill generate recipes/default.yaml

step "5/6 distil the student"
[ -f $W/student/training.json ] || distill train recipes/default.yaml --out $W/student

step "6/6 evaluate the student on the holdout"
[ -f $W/eval/student/report.json ] || distill eval $W/student --recipe recipes/default.yaml --name student

step "summary"
python - "$W" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
rows = []
for name in ("teacher-zero-shot", "teacher", "student"):
    r = json.loads((w / "eval" / name / "report.json").read_text())
    rows.append((name, r["layers"], r["parameters"], r["accuracy"], r["macro_f1"]))
print(f"{'model':<20}{'layers':>7}{'params':>13}{'accuracy':>10}{'macro-F1':>10}")
for n, l, p, a, f in rows:
    print(f"{n:<20}{l:>7}{p:>13,}{a:>10.4f}{f:>10.4f}")
t, s = rows[1][4], rows[2][4]
print(f"\nteacher holdout macro-F1 {t:.4f} | student holdout macro-F1 {s:.4f} | gap {100 * (t - s):+.1f} points")
print(f"artifacts: teacher {w}/teacher, cache {w}/cache, student {w}/student, reports {w}/eval/*/")
PY
echo "total $(( $(date +%s) - start ))s"
