#!/usr/bin/env bash
# Drafts for the SNIPS teacher's speculative decoding (issue 33; docs/results-snips.md, "Drafts"). After
# scripts/snips.sh (its teacher, its cache of the teacher's top-20 at every response token, its students):
# drafts of two sizes (4 and 10 of the teacher's 30 layers) made the ways a user can make one:
#   cut      the teacher's layers, untrained (the 10 the study's student kept; the 4 the 4-layer drafts kept)
#   seqkd    trained on the teacher's responses as text (CE alone; how drafts are made today)
#   student  the SNIPS study's token-level student (KD + CE; 10 layers only)
#   draft    trained for acceptance: the teacher's top-k alone (alpha 1, recipes/snips-draft.yaml), under
#            the divergence (tvd or forward_kl) with the longer mean accepted length on validation, chosen at
#            4 layers and then trained at 10
# Each is benched as the teacher's draft on the test split (`distill bench --draft`: exact greedy acceptance per
# proposed position, transformers' assisted generation timed against the teacher alone at each number of
# proposed tokens, outputs checked identical to the teacher's). Every stage is a plain command, skipped when its
# output exists; times in runs/snips/drafts/times.json.
#
#   bash scripts/snips-drafts.sh                       # after bash scripts/snips.sh
#   STUDY_SCALE=smoke bash scripts/snips-drafts.sh     # after STUDY_SCALE=smoke bash scripts/snips.sh
# Environment: DRAFT_EXAMPLES (test queries benched, default 35), DRAFT_VALIDATION (validation queries of the
# choice, default 70).
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${STUDY_SCALE:-full}
case $SCALE in
  full)  S=${STUDY_DIR:-runs/snips}; N=${DRAFT_EXAMPLES:-35}; NV=${DRAFT_VALIDATION:-70}; ALL=() ;;
  smoke) S=${STUDY_DIR:-runs/snips-smoke}; N=${DRAFT_EXAMPLES:-3}; NV=${DRAFT_VALIDATION:-3}
         ALL=(--set task.max_examples=120 --set task.labelled_examples=21 --set train.max_steps=2
              --set train.student.importance_examples=8 --set generate.max_new_tokens=24) ;;
  *) echo "error: STUDY_SCALE: expected full or smoke, got '$SCALE'" >&2; exit 2 ;;
esac
for f in $S/teacher/training.json $S/cache/train-00000.safetensors $S/teacher-spec.yaml $S/logs/05.log; do
  [ -e $f ] || { echo "error: $f is missing: run STUDY_SCALE=$SCALE bash scripts/snips.sh first" >&2; exit 2; }
done
W=$S/drafts
. scripts/studylib.sh
# the study's own settings (scripts/snips.sh), its teacher
AT_T=(--set workdir=$S --set task.data=$S/json/train.jsonl --set task.holdout_data=$S/json/test.jsonl
      "${ALL[@]}" --set teacher=$S/teacher-spec.yaml)
FOUR=(--set train.student.num_layers=4)
bench_draft() {  # bench_draft NAME DRAFT GAMMAS: the draft on N test queries, timed at GAMMAS (acceptance: every gamma)
  stage "$1 bench: $2 as the teacher's draft ($N test queries)" $W/bench/$1/bench.json \
    distill bench recipes/snips-draft.yaml --teacher $S/teacher --draft $2 --limit $N --gammas $3 --out $W/bench/$1 \
      "${AT_T[@]}"
}

lane_a() {
  stage "d01 4-layer draft, forward KL (alpha 1)" $W/fkl-4/training.json \
    distill train recipes/snips-draft.yaml --out $W/fkl-4 --set train.loss=forward_kl "${FOUR[@]}" "${AT_T[@]}"
  stage "d03 4-layer draft on the teacher's responses as text" $W/seqkd-4/training.json \
    distill train recipes/snips-seqkd.yaml --out $W/seqkd-4 "${FOUR[@]}" "${AT_T[@]}"
}
lane_b() {
  stage "d02 4-layer draft, TVD (alpha 1)" $W/tvd-4/training.json \
    distill train recipes/snips-draft.yaml --out $W/tvd-4 "${FOUR[@]}" "${AT_T[@]}"
}
lanes lane_a lane_b
stage "d04 the untrained cuts (the 10 layers of the study's student, the 4 of the 4-layer drafts)" $W/cut-4/config.json \
  bash -c "python scripts/save_cut.py $S/teacher --layers $(layers_of $S/logs/05.log) --out $W/cut-10 &&
           python scripts/save_cut.py $S/teacher --layers $(layers_of $W/logs/d02.log) --out $W/cut-4"

# The choice (docs/results-snips.md, written before any draft was measured): the divergence whose 4-layer draft
# has the longer mean accepted length at gamma 4 on NV validation queries; within 0.02 of each other, tvd.
for loss in fkl tvd; do
  stage "d05-$loss validation acceptance of the 4-layer $loss draft ($NV queries)" $W/val-$loss-4/bench.json \
    distill bench recipes/snips-draft.yaml --teacher $S/teacher --draft $W/$loss-4 --data $S/json/validation.jsonl \
      --limit $NV --gammas 4 --out $W/val-$loss-4 "${AT_T[@]}"
done
CHOSEN=$(python - $W <<'PY'
import json, sys
w = sys.argv[1]
acc = {loss: json.load(open(f"{w}/val-{loss}-4/bench.json"))["gammas"][0]["mean_accepted"] for loss in ("fkl", "tvd")}
chosen = "fkl" if acc["fkl"] > acc["tvd"] + 0.02 else "tvd"
json.dump({"mean_accepted_at_gamma_4": acc, "chosen": chosen}, open(f"{w}/choice.json", "w"), indent=1)
print(chosen)
PY
)
echo "the divergence chosen on validation: $CHOSEN ($W/choice.json)"
LOSS=$([ $CHOSEN = tvd ] && echo tvd || echo forward_kl)
stage "d06 10-layer draft, $LOSS (alpha 1; the divergence chosen at 4 layers)" $W/draft-10/training.json \
  distill train recipes/snips-draft.yaml --out $W/draft-10 --set train.loss=$LOSS "${AT_T[@]}"

# Timing is a whole decode per gamma (minutes each on this CPU), acceptance one draft pass for every gamma. On
# validation the 4-layer draft at gamma 4 ran at 0.78x the teacher alone (the draft's cost per token, not its
# acceptance, limits transformers here), so the small gammas are timed: 1-3 for the drafts of the targets, 2 for
# the other rows; llama.cpp, where a forward pass costs less overhead, at 1-4.
bench_draft draft-4 $W/$CHOSEN-4 1,2,3
bench_draft seqkd-4 $W/seqkd-4 1,2,3

# llama.cpp: the teacher in f16 (its batched verification gives its one-token-at-a-time output; q8_0's does not
# on every prompt, docs/results-snips.md), the drafts in q8_0 (a draft's numbers change acceptance, not output)
stage "g01 the teacher as f16 GGUF" $W/gguf/teacher.f16.gguf \
  distill export $S/teacher --quant f16 --out $W/gguf/teacher.f16.gguf --recipe recipes/snips.yaml "${AT_T[@]}"
for d in draft-4:$W/$CHOSEN-4 seqkd-4:$W/seqkd-4 draft-10:$W/draft-10 seqkd-10:$S/seqkd; do
  stage "g02-${d%%:*} the $d draft as q8_0 GGUF" $W/gguf/${d%%:*}.q8_0.gguf \
    distill export ${d#*:} --quant q8_0 --out $W/gguf/${d%%:*}.q8_0.gguf --recipe recipes/snips.yaml "${AT_T[@]}"
  stage "g03-${d%%:*} bench in llama.cpp: the $d draft ($N test queries)" $W/bench-gguf/${d%%:*}/bench.json \
    distill bench recipes/snips-draft.yaml --teacher $W/gguf/teacher.f16.gguf --draft $W/gguf/${d%%:*}.q8_0.gguf \
      --tokenizer $S/teacher --limit $N --gammas 1,2,3,4 --out $W/bench-gguf/${d%%:*} "${AT_T[@]}"
done

bench_draft draft-10 $W/draft-10 1,2,3
bench_draft seqkd-10 $S/seqkd 1,2,3
bench_draft cut-4 $W/cut-4 2
bench_draft cut-10 $W/cut-10 2
bench_draft student-10 $S/student 2
python scripts/drafts_summary.py $W
print_times
