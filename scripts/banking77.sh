#!/usr/bin/env bash
# The Banking77 study (docs/results.md, issue 14): zero-shot baseline, a teacher fine-tuned on a labelled
# budget (25 texts per intent, every weight fine-tuned), and a student half its size built by importance, healed and distilled on
# the teacher's soft labels of every training text, against the same student fine-tuned on the labelled
# texts only (the control), two ablations without healing (the same layers; evenly spaced layers) and the
# student's q4_k_m GGUF,
# all benched on the whole official test split (3,080 texts). Every stage is a plain `distill` command;
# each is skipped when its output exists, so an interrupted run continues. Each stage's wall time and
# command go to WORKDIR/times.json, its output to WORKDIR/logs/. The four students (stages 06, 07, 09, 10)
# train in two lanes side by side, one thread each, which a 2-core machine does in 0.85x the time.
#
#   bash scripts/banking77.sh                       # the study, sized for this project's 2 CPU cores
#   STUDY_SCALE=smoke bash scripts/banking77.sh     # every stage on a few texts (runs/banking77-smoke):
#                                                   # proves the chain, measures nothing
# Environment: STUDY_SCALE (full | smoke | large), STUDY_DIR (the work directory; default runs/banking77, or
# runs/banking77-smoke), TEST_EXAMPLES (bench a stratified sample of N test texts; default all of them),
# ZERO_SHOT_EXAMPLES (test texts for the zero-shot baseline, default 77: its prompt lists the 77 intents,
# ~15x the cost of the others'), UNTIL=05 (stop after stage 05).
#
# Larger, on a GPU: `STUDY_SCALE=large bash scripts/banking77.sh` (runs/banking77-large; not run on this
# project's CPU machine). scripts/setup.sh installs vllm there and `distill generate` uses the vLLM
# engine. Every training text is already read at full scale; large also heals on the whole training
# split instead of 2,000 of its texts, trains up to 6 epochs with early stopping (patience 2) in bf16, and
# scores the zero-shot baseline on the whole test split. A training stage scales out to N GPUs with
# `accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes N -m distill train RECIPE
# --out DIR` (same --set options). Whatever the scale, settings are chosen on the validation split.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/banking77
[ -f $DATA/train.jsonl ] && [ -f $DATA/test.jsonl ] && [ -f $DATA/labels.json ] || {
  echo "error: Banking77 not found in $DATA (train.jsonl, test.jsonl, labels.json); edit task.data," \
       "task.holdout_data and task.labels_file in recipes/banking77.yaml to point at your copy" >&2; exit 2; }

SCALE=${STUDY_SCALE:-full}
case $SCALE in
  full)
    W=${STUDY_DIR:-runs/banking77}; TEST=${TEST_EXAMPLES:-all}; ZS=${ZERO_SHOT_EXAMPLES:-77}
    CLS=(); HEAL=(); BENCH=() ;;
  large)  # a GPU machine: see the header
    W=${STUDY_DIR:-runs/banking77-large}; TEST=${TEST_EXAMPLES:-all}; ZS=${ZERO_SHOT_EXAMPLES:-3080}
    CLS=(--set train.epochs=6 --set train.early_stopping_patience=2 --set train.mixed_precision=bf16)
    HEAL=(--set task.max_examples=null --set train.epochs=3 --set train.early_stopping_patience=1
          --set train.mixed_precision=bf16)
    BENCH=() ;;
  smoke)  # 154 texts read (89 train, 65 validation), 40 labelled, 48 heal texts, 2 steps a training stage
    W=${STUDY_DIR:-runs/banking77-smoke}; TEST=${TEST_EXAMPLES:-16}; ZS=${ZERO_SHOT_EXAMPLES:-2}
    CLS=(--set task.max_examples=154 --set task.labelled_examples=40 --set train.eval_examples=8
         --set train.max_steps=2 --set train.student.importance_examples=8)
    HEAL=(--set task.max_examples=48 --set train.max_steps=2 --set train.student.importance_examples=8)
    BENCH=(--set task.max_examples=154 --latency-examples 4) ;;
  *) echo "error: STUDY_SCALE: expected full, smoke or large, got '$SCALE'" >&2; exit 2 ;;
esac
mkdir -p $W/logs
LIMIT=(); [ "$TEST" = all ] || LIMIT=(--limit $TEST)
# The recipes name runs/banking77; another work directory is passed to every command with --set.
TEACHER_SPEC=teachers/banking77-teacher.yaml
AT=(); AT_T=(); AT_HEALED=(); AT_HEAL=()
if [ "$W" != runs/banking77 ]; then
  TEACHER_SPEC=$W/teacher-spec.yaml
  sed "s#^source: .*#source: $W/teacher#" teachers/banking77-teacher.yaml > $TEACHER_SPEC
  AT=(--set workdir=$W)                                   # recipes with their own teacher (zero-shot, teacher)
  AT_T=(--set workdir=$W --set teacher=$TEACHER_SPEC)     # recipes taught by the fine-tuned teacher
  AT_HEALED=(--set train.student.model=$W/healed)
  AT_HEAL=(--set workdir=$W/heal --set task.data=$W/data/train.jsonl --set teacher=$TEACHER_SPEC)
fi
. scripts/studylib.sh

stage "01 zero-shot baseline ($ZS test texts)" $W/eval/zero-shot/report.json \
  distill eval teachers/smollm2-135m-instruct.yaml --recipe recipes/banking77-zero-shot.yaml \
    --name teacher-zero-shot --limit $ZS --out $W/eval/zero-shot "${AT[@]}" "${CLS[@]}"
stage "02 teacher: full fine-tune, alpha = 0, on the labelled budget" $W/teacher/training.json \
  distill train recipes/banking77-teacher.yaml --out $W/teacher "${AT[@]}" "${CLS[@]}"
stage "03 soft labels: the teacher on every training and validation text" $W/generate.done \
  done_after $W/generate.done distill generate recipes/banking77.yaml "${AT_T[@]}" "${CLS[@]}"
[ -f $W/data/train.jsonl ] || { echo "error: $W/data/train.jsonl (the training split the heal texts come from) is missing" >&2; exit 1; }
stage "04 heal texts: the teacher's top-k on the training split's texts" $W/heal-generate.done \
  done_after $W/heal-generate.done distill generate recipes/banking77-heal.yaml "${AT_HEAL[@]}" "${HEAL[@]}"
stage "05 heal the student cut by importance (10 of 30 layers)" $W/healed/training.json \
  distill train recipes/banking77-heal.yaml --out $W/healed "${AT_HEAL[@]}" "${HEAL[@]}"
# UNTIL=05: stop here (scripts/banking77-teachers.sh needs stages 02-05 only)
[ "${UNTIL:-}" != 05 ] || { print_times; exit 0; }
# ablation without healing: the very layers stage 05 kept (its log), distilled without healing
LAYERS=$(layers_of $W/logs/05.log) || {
  echo "error: $W/logs/05.log does not name the layers the heal stage kept; remove $W/healed and run again" >&2; exit 1; }
# The four students are independent of each other: two lanes of two, side by side (lanes above)
lane_student() {
  stage "06 distil the healed student (KD on every text, CE on the labelled budget)" $W/student/training.json \
    distill train recipes/banking77-healed.yaml --out $W/student "${AT_T[@]}" "${AT_HEALED[@]}" "${CLS[@]}"
  stage "09 ablation without healing: the same layers, distilled directly" $W/student-no-heal/training.json \
    distill train recipes/banking77-importance.yaml --out $W/student-no-heal "${AT_T[@]}" "${CLS[@]}" \
      --set train.student.layer_selection=even --set train.student.num_layers=null \
      --set "train.student.from_teacher_layers=$LAYERS"
}
lane_control() {
  stage "10 ablation with 10 evenly spaced layers, distilled directly" $W/student-even/training.json \
    distill train recipes/banking77-even.yaml --out $W/student-even "${AT_T[@]}" "${CLS[@]}"
  stage "07 control: the healed student fine-tuned on the labelled budget only" $W/control/training.json \
    distill train recipes/banking77-control.yaml --out $W/control "${AT_T[@]}" "${AT_HEALED[@]}" "${CLS[@]}"
}
lanes lane_student lane_control
stage "08 export the student to q4_k_m GGUF" $W/gguf/student.q4_k_m.gguf \
  distill export $W/student --quant q4_k_m --out $W/gguf/student.q4_k_m.gguf \
    --recipe recipes/banking77-healed.yaml "${AT_T[@]}" "${AT_HEALED[@]}" "${CLS[@]}"
stage "11 bench on the test split ($TEST texts)" $W/bench-$TEST/bench.json \
  distill bench --recipe recipes/banking77.yaml --teacher $W/teacher --student $W/student --student $W/control \
    --student $W/student-no-heal --student $W/student-even --student $W/gguf/student.q4_k_m.gguf \
    --tokenizer $W/student "${LIMIT[@]}" --out $W/bench-$TEST "${AT_T[@]}" "${BENCH[@]}"

echo; echo "== zero-shot baseline ($ZS test texts):"
python - $W/eval/zero-shot/report.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}")
PY
cat $W/bench-$TEST/bench.md
print_times
