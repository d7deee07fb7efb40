#!/usr/bin/env python
"""A teacher cut to some of its layers, saved untrained: the undistilled draft of the draft study
(scripts/snips-drafts.sh), the very layers a trained draft of the same size kept (read from its log).

    python scripts/save_cut.py runs/snips/teacher --layers 0,1,8,9,20,23,24,27,28,29 --out runs/snips/drafts/cut-10
"""
from __future__ import annotations

import argparse
from pathlib import Path

from distill.config import StudentConfig
from distill.models.loading import count_parameters, load_tokenizer
from distill.student.build import build_student, save_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", help="the teacher's model directory")
    ap.add_argument("--layers", required=True, help="the teacher layers kept, 0-based, comma-separated")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.strip("[]").split(",") if x.strip()]
    model = build_student(StudentConfig(from_teacher_layers=layers), a.teacher)
    save_model(model, load_tokenizer(a.teacher), a.out)
    print(f"{a.out}: layers {layers} of {a.teacher}, {count_parameters(model) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
