#!/usr/bin/env bash
# The SNIPS study (docs/results.md, issue 32): token-level distillation on a structured-output task, text -> JSON.
# Measure first (the untrained SmolLM2-135M-Instruct zero- and few-shot, the format in the instruction), a
# teacher fine-tuned on a labelled budget (50 queries per intent, every weight), the teacher writing the
# responses of the unlabelled pool with its top-k at every response token, and a student of 10 of its 30
# layers (cut by importance) distilled on them, against the same student fine-tuned on the labelled budget
# only (the control) and trained on the teacher-written responses as text (sequence-level KD), and the
# student's q4_k_m GGUF; all benched on the whole official test split (700 queries). Every stage is a plain
# `distill` command, skipped when its output exists, so an interrupted run continues; each stage's wall and
# CPU time go to WORKDIR/times.json, its output to WORKDIR/logs/.
#
#   bash scripts/snips.sh                       # the study, sized for this project's 2 CPU cores
#   STUDY_SCALE=smoke bash scripts/snips.sh     # every stage on a few queries (runs/snips-smoke): proves the chain
# Environment: STUDY_SCALE (full | smoke | large), STUDY_DIR (default runs/snips, runs/snips-smoke or
# runs/snips-large), DATA (a folder with train/validation/test .jsonl rows of text, intent and slots; default
# ../shared/data/snips), TEST_EXAMPLES (bench a sample of N test queries; default all), ZERO_SHOT_EXAMPLES
# (test queries for the untrained model's rows, default 140).
#
# Larger, on a GPU (`STUDY_SCALE=large`, runs/snips-large; not run on this project's CPU machine): every one
# of the 13,084 training queries in the pool, the teacher's responses written by the vLLM engine
# (scripts/setup.sh installs vllm there; generate.backend auto picks it), bf16 training, up to 4 epochs with
# early stopping. Another slot-filling set with the same row shape: DATA=path and task.instruction in
# recipes/snips.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/snips}
[ -f $DATA/train.jsonl ] && [ -f $DATA/test.jsonl ] || {
  echo "error: SNIPS not found in $DATA (train.jsonl, test.jsonl with text, intent, slots); set DATA" >&2; exit 2; }

SCALE=${STUDY_SCALE:-full}
case $SCALE in
  full)
    W=${STUDY_DIR:-runs/snips}; TEST=${TEST_EXAMPLES:-all}; ZS=${ZERO_SHOT_EXAMPLES:-140}; ALL=() ;;
  large)
    W=${STUDY_DIR:-runs/snips-large}; TEST=${TEST_EXAMPLES:-all}; ZS=${ZERO_SHOT_EXAMPLES:-700}
    ALL=(--set task.max_examples=null --set task.split.validation=0.05 --set train.mixed_precision=bf16
         --set train.epochs=4 --set train.early_stopping_patience=1) ;;
  smoke)  # 120 queries read (96 train, 24 validation), 21 labelled, 2 steps a training stage
    W=${STUDY_DIR:-runs/snips-smoke}; TEST=${TEST_EXAMPLES:-8}; ZS=${ZERO_SHOT_EXAMPLES:-2}
    ALL=(--set task.max_examples=120 --set task.labelled_examples=21 --set train.max_steps=2
         --set train.student.importance_examples=8 --set generate.max_new_tokens=24) ;;
  *) echo "error: STUDY_SCALE: expected full, smoke or large, got '$SCALE'" >&2; exit 2 ;;
esac
. scripts/studylib.sh
LIMIT=(); [ "$TEST" = all ] || LIMIT=(--limit $TEST)
# The recipes name runs/snips; another work directory is passed to every command with --set.
PATHS=(--set workdir=$W --set task.data=$W/json/train.jsonl --set task.holdout_data=$W/json/test.jsonl)
TEACHER_SPEC=$W/teacher-spec.yaml
sed "s#^source: .*#source: $W/teacher#" teachers/snips-teacher.yaml > $TEACHER_SPEC
AT=("${PATHS[@]}" "${ALL[@]}")                          # recipes with their own teacher (zero-shot, teacher)
AT_T=("${AT[@]}" --set teacher=$TEACHER_SPEC)           # recipes taught by the fine-tuned teacher
BATCH=(--batch-size 128)                                # greedy decoding batch (transformers on CPU)

stage "00 data: SNIPS rows as prompt/response JSON" $W/json/test.jsonl \
  python scripts/slots_to_json.py --data $DATA --out $W/json
stage "01 the untrained model, zero-shot ($ZS test queries)" $W/eval/zero-shot/report.json \
  distill eval teachers/smollm2-135m-instruct.yaml --recipe recipes/snips-zero-shot.yaml --name zero-shot \
    --limit $ZS --out $W/eval/zero-shot "${BATCH[@]}" "${AT[@]}"
stage "02 the untrained model, 7-shot (one example per intent; $ZS test queries)" $W/eval/few-shot/report.json \
  distill eval teachers/smollm2-135m-instruct.yaml --recipe recipes/snips-zero-shot.yaml --name few-shot \
    --shots 7 --limit $ZS --out $W/eval/few-shot "${BATCH[@]}" "${AT[@]}" --set task.max_length=640
stage "03 teacher: full fine-tune on the labelled budget (alpha = 0)" $W/teacher/training.json \
  distill train recipes/snips-teacher.yaml --out $W/teacher "${AT[@]}"
stage "04 the teacher writes the pool's responses, top-k at every response token" $W/generate.done \
  done_after $W/generate.done distill generate recipes/snips.yaml "${AT_T[@]}"
lane_student() {
  stage "05 student: token-level KD on the whole pool" $W/student/training.json \
    distill train recipes/snips.yaml --out $W/student "${AT_T[@]}"
}
lane_others() {
  stage "06 sequence-level KD: the student on the teacher-written responses as text" $W/seqkd/training.json \
    distill train recipes/snips-seqkd.yaml --out $W/seqkd "${AT_T[@]}"
  stage "07 control: the student fine-tuned on the labelled budget only" $W/control/training.json \
    distill train recipes/snips-control.yaml --out $W/control "${AT_T[@]}"
}
lanes lane_student lane_others
stage "08 export the student to q4_k_m GGUF" $W/gguf/student.q4_k_m.gguf \
  distill export $W/student --quant q4_k_m --out $W/gguf/student.q4_k_m.gguf --recipe recipes/snips.yaml "${AT_T[@]}"
stage "09 the student's report on the test split" $W/eval/student/report.json \
  distill eval $W/student --recipe recipes/snips.yaml --name student --out $W/eval/student "${BATCH[@]}" \
    "${LIMIT[@]}" "${AT_T[@]}"
stage "10 bench on the test split ($TEST queries)" $W/bench-$TEST/bench.json \
  distill bench --recipe recipes/snips.yaml --teacher $W/teacher --student $W/student --student $W/seqkd \
    --student $W/control --student $W/gguf/student.q4_k_m.gguf --tokenizer $W/student "${BATCH[@]}" \
    --latency-examples 16 "${LIMIT[@]}" --out $W/bench-$TEST "${AT_T[@]}"

for r in zero-shot few-shot student; do
  python - $W/eval/$r/report.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['name']:<10} ({r['n']} test queries): exact match {r['exact_match']:.4f}, valid JSON {r['valid_json']:.4f}, "
      f"intent accuracy {r['class']['accuracy']:.4f}, slot F1 {r['field_micro_without_class']['f1']:.4f}")
PY
done
cat $W/bench-$TEST/bench.md
print_times
