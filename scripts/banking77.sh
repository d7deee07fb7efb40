#!/usr/bin/env bash
# The Banking77 study (docs/results.md): teacher vs distilled student vs fine-tuned-only student,
# on real data, sized for 2 CPU cores. Every step is a plain `distill` command; each is skipped when
# its output exists, so an interrupted run continues. Stage wall times go to runs/banking77/times.json.
#
#   bash scripts/banking77.sh            # after scripts/setup.sh (run_default.sh and test.sh call it)
#   TEST_EXAMPLES=3080 bash scripts/banking77.sh   # the whole official test split (about 45 min more here)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/banking77
[ -f $DATA/train.jsonl ] && [ -f $DATA/test.jsonl ] && [ -f $DATA/labels.json ] || {
  echo "error: Banking77 not found in $DATA (train.jsonl, test.jsonl, labels.json); edit task.data," \
       "task.holdout_data and task.labels_file in recipes/banking77.yaml to point at your copy" >&2; exit 2; }
bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
W=runs/banking77
TEST=${TEST_EXAMPLES:-385}     # stratified sample of the 3,080-example official test split: 5 per intent
mkdir -p $W
T=$W/times.json
[ -f $T ] || echo '{}' > $T
stage() {  # stage NAME OUTPUT COMMAND...: run unless OUTPUT exists; record its wall time
  local name=$1 out=$2; shift 2
  if [ -e "$out" ]; then echo "== $name: done ($out)"; return; fi
  echo; echo "== $name: $*"
  local t0=$(date +%s)
  "$@"
  python - "$T" "$name" "$(( $(date +%s) - t0 ))" <<'PY'
import json, sys
p, name, s = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = json.load(open(p)); d[name] = s; open(p, "w").write(json.dumps(d, indent=1))
PY
}

stage "1 zero-shot baseline (77 test examples)" $W/eval/teacher-zero-shot-limit77/report.json \
  distill eval teachers/smollm2-135m-instruct.yaml --recipe recipes/banking77-zero-shot.yaml --name teacher-zero-shot --limit 77
stage "2 fine-tune the teacher (LoRA, 385 labelled)" $W/teacher/training.json \
  distill train recipes/banking77-teacher.yaml --out $W/teacher
stage "3 soft labels from the teacher" $W/generate.done \
  bash -c "distill generate recipes/banking77.yaml && touch $W/generate.done"
stage "4 distil the student (8 layers)" $W/student/training.json \
  distill train recipes/banking77.yaml --out $W/student
stage "5 control: the same student, fine-tuned on the labelled subset" $W/control/training.json \
  distill train recipes/banking77-control.yaml --out $W/control
stage "6 export the student to q4_k_m GGUF" $W/gguf/student.q4_k_m.gguf \
  distill export $W/student --quant q4_k_m --out $W/gguf/student.q4_k_m.gguf
stage "7 bench on the test split ($TEST examples)" $W/bench-$TEST/bench.json \
  distill bench --recipe recipes/banking77.yaml --teacher $W/teacher --student $W/student --student $W/control \
    --student $W/gguf/student.q4_k_m.gguf --tokenizer $W/student --limit $TEST --out $W/bench-$TEST
cat $W/bench-$TEST/bench.md
python - "$T" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d.items():
    print(f"{k:<70}{v:>7d} s")
print(f"{'total':<70}{sum(d.values()):>7d} s")
PY
