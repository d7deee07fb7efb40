#!/usr/bin/env bash
# The Banking77 study with three teachers (docs/results.md, "Three teachers"; issue 34): the study's stages
# 01-05 (scripts/banking77.sh: zero-shot baseline, the teacher, its soft labels, heal texts, the healed
# student), two more teachers trained by the teacher's recipe with train.seed 1 and 2, their soft labels in
# one cache beside the first teacher's (copied, not rescored), the healed student distilled on the three
# teachers' mixture and the control (the healed student fine-tuned on the labelled budget alone), each over
# the seeds in SEEDS, the single-teacher student at seed 0, and every model and the teachers' ensemble scored
# by `distill eval` on the whole test split; last, teacher-written texts (`distill write-texts`) added to the
# single-teacher student's pool. Resumable and timed as banking77.sh is (W/times.json).
#
#   bash scripts/banking77-teachers.sh                      # sized for this project's 2 CPU cores
#   STUDY_SCALE=smoke bash scripts/banking77-teachers.sh    # every stage on a few texts: proves the chain
# Environment: STUDY_SCALE (full | smoke), STUDY_DIR (default runs/banking77, or runs/banking77-smoke),
# SEEDS (default "0 1 2"), TEST_EXAMPLES (default all 3,080), WRITTEN (teacher-written texts, default 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${STUDY_SCALE:-full}
case $SCALE in
  full) W=${STUDY_DIR:-runs/banking77}; TEST=${TEST_EXAMPLES:-all}; WRITTEN=${WRITTEN:-1000}; CLS=() ;;
  smoke)
    W=${STUDY_DIR:-runs/banking77-smoke}; TEST=${TEST_EXAMPLES:-16}; WRITTEN=${WRITTEN:-8}
    CLS=(--set task.max_examples=154 --set task.labelled_examples=40 --set train.eval_examples=8
         --set train.max_steps=2 --set train.student.importance_examples=8) ;;
  *) echo "error: STUDY_SCALE: expected full or smoke, got '$SCALE'" >&2; exit 2 ;;
esac
SEEDS=${SEEDS:-"0 1 2"}
LIMIT=(); [ "$TEST" = all ] || LIMIT=(--limit $TEST)

STUDY_SCALE=$SCALE STUDY_DIR=$W UNTIL=05 bash scripts/banking77.sh   # stages 01-05 (skipped when done)
. scripts/studylib.sh

# Teacher specs and recipe settings for this work directory (the committed ones name runs/banking77)
mkdir -p $W/specs
for n in 0 1 2; do
  src=$W/teacher; [ $n = 0 ] || src=$W/teacher-$n
  name=banking77-teacher; [ $n = 0 ] || name=banking77-teacher-$n
  sed -e "s#^name: .*#name: $name#" -e "s#^source: .*#source: $src#" teachers/banking77-teacher.yaml > $W/specs/$name.yaml
done
AT=(--set workdir=$W --set teacher=$W/specs/banking77-teacher.yaml --set train.student.model=$W/healed)
ENS=(--set "teachers=[{spec: $W/specs/banking77-teacher.yaml}, {spec: $W/specs/banking77-teacher-1.yaml},
     {spec: $W/specs/banking77-teacher-2.yaml}]")

teacher() {  # (the teacher's recipe fine-tunes its own `teacher:`, SmolLM2-135M-Instruct)
  stage "21 teacher $1: the teacher's recipe, train.seed $1" $W/teacher-$1/training.json \
    distill train recipes/banking77-teacher.yaml --out $W/teacher-$1 --seed $1 --set workdir=$W "${CLS[@]}"
}
lane_teacher_1() { teacher 1; }
lane_teacher_2() { teacher 2; }
lanes lane_teacher_1 lane_teacher_2
# the first teacher's soft labels (stage 03) are its cache in the ensemble's: copied, never rescored
if [ ! -e $W/cache-ensemble/teachers/banking77-teacher ]; then
  mkdir -p $W/cache-ensemble/teachers && cp -r $W/cache $W/cache-ensemble/teachers/banking77-teacher.tmp &&
    mv $W/cache-ensemble/teachers/banking77-teacher.tmp $W/cache-ensemble/teachers/banking77-teacher
fi
stage "22 soft labels of teachers 1 and 2 (teacher 0's copied)" $W/cache-ensemble.done \
  done_after $W/cache-ensemble.done distill generate recipes/banking77-ensemble.yaml --out $W/cache-ensemble \
    "${AT[@]}" "${ENS[@]}" "${CLS[@]}"

# students: the ensemble's and the control's over the seeds, in two lanes of about equal length (an
# ensemble student takes about twice a control's time)
ens_student() {
  stage "23 ensemble student, seed $1" $W/student-ensemble-s$1/training.json \
    distill train recipes/banking77-ensemble.yaml --cache $W/cache-ensemble --out $W/student-ensemble-s$1 \
      --seed $1 "${AT[@]}" "${ENS[@]}" "${CLS[@]}"
}
control() {
  stage "24 control, seed $1" $W/control-s$1/training.json \
    distill train recipes/banking77-control.yaml --out $W/control-s$1 --seed $1 "${AT[@]}" "${CLS[@]}"
}
lane_a() { local i=0; for s in $SEEDS; do if [ $((i % 2)) = 0 ]; then ens_student $s; else control $s; fi; i=$((i + 1)); done; }
lane_b() { local i=0; for s in $SEEDS; do if [ $((i % 2)) = 0 ]; then control $s; else ens_student $s; fi; i=$((i + 1)); done; }
lanes lane_a lane_b

# every model on the test split; the teachers' ensemble (the mean of their probabilities) from their
# predictions (scripts/teachers_summary.py; `distill eval T0 T1 T2` scores it directly, stage 26 at the end)
ev() {  # ev NAME MODEL...
  local name=$1; shift
  stage "26 eval $name ($TEST test texts)" $W/eval-teachers/$name/report.json \
    distill eval "$@" --recipe recipes/banking77.yaml --name $name --out $W/eval-teachers/$name "${LIMIT[@]}" \
      "${AT[@]}" "${CLS[@]}"
}
ev teacher-0 $W/teacher; ev teacher-1 $W/teacher-1; ev teacher-2 $W/teacher-2
for s in $SEEDS; do ev student-ensemble-s$s $W/student-ensemble-s$s; ev control-s$s $W/control-s$s; done
python scripts/teachers_summary.py $W "$SEEDS" | tee $W/eval-teachers/summary.md

# after the main rows: the single-teacher student at seed 0; teacher-written texts (SmolLM2-135M-Instruct,
# in float32, writes WRITTEN new messages from five labelled texts of one intent each; the first teacher
# scores them with every training text; the single-teacher student at seed 0 learns from both, every
# written text: task.written_share unset); the ensemble scored directly by `distill eval T0 T1 T2`
stage "25 single-teacher student, seed 0" $W/student-s0/training.json \
  distill train recipes/banking77-healed.yaml --out $W/student-s0 --seed 0 "${AT[@]}" "${CLS[@]}"
ev student-s0 $W/student-s0
python scripts/teachers_summary.py $W "$SEEDS" | tee $W/eval-teachers/summary.md
sed -e "s#^name: .*#name: writer#" -e "s#^dtype: .*#dtype: float32#" teachers/smollm2-135m-instruct.yaml > $W/specs/writer.yaml
WR=(--set task.written_data=$W/written/texts.jsonl)
stage "27 teacher-written texts ($WRITTEN)" $W/written.done \
  done_after $W/written.done distill write-texts recipes/banking77.yaml --teacher $W/specs/writer.yaml \
    --count $WRITTEN "${AT[@]}" "${CLS[@]}"
stage "28 soft labels of the training texts and the written ones (teacher 0)" $W/cache-written.done \
  done_after $W/cache-written.done distill generate recipes/banking77-healed.yaml --out $W/cache-written \
    "${AT[@]}" "${WR[@]}" "${CLS[@]}"
stage "29 single-teacher student with the written texts, seed 0" $W/student-written-s0/training.json \
  distill train recipes/banking77-healed.yaml --cache $W/cache-written --out $W/student-written-s0 --seed 0 \
    "${AT[@]}" "${WR[@]}" "${CLS[@]}"
ev student-written-s0 $W/student-written-s0
ev ensemble $W/teacher $W/teacher-1 $W/teacher-2
python scripts/teachers_summary.py $W "$SEEDS" | tee $W/eval-teachers/summary.md
print_times
