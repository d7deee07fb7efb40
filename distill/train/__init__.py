"""`distill train`: an Accelerate loop minimising alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE.

D is a divergence from distill/losses.py (forward KL by default; `train.loss`). The teacher is never
in memory: its distributions come from the cache written by `distill generate` (soft labels over the
label set for classification, top-k log-probabilities + tail mass per response token for
generation). alpha = 0 with no cache is plain supervised fine-tuning.

Modules: loop (the loop and its named steps), setup (checks, student, optimizer, schedule), tasks
(classification and generation: loss terms and validation), state (the loop state and the data
position derived from it), checkpoint (save and resume), distributed (ranks, collectives,
DeepSpeed), reporting (swamp watch, best-model choice, logs and plot).
"""
from distill.train.loop import run_train

__all__ = ["run_train"]
