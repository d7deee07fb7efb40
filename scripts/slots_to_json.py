"""Slot-filling rows (`text`, `intent`, `slots: [{slot, value}]`, as SNIPS and ATIS are published) as a
generation task: prompt = the text, response = one compact JSON object, the same format for every model.

    {"intent": "PlayMusic", "slots": {"artist": "westbam", "service": "google music"}}

A slot that occurs twice in a text keeps both values, as a list in text order. Rows are written to
OUT/<split>.jsonl with the ids of the source lines; the source files are only read.

usage: python scripts/slots_to_json.py --data ../shared/data/snips --out runs/snips/json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def response(row: dict) -> str:
    slots: dict[str, str | list[str]] = {}
    for s in row.get("slots", []):
        name, value = s["slot"], s["value"]
        if name in slots:
            old = slots[name]
            slots[name] = (old if isinstance(old, list) else [old]) + [value]
        else:
            slots[name] = value
    return json.dumps({"intent": row["intent"], "slots": slots}, ensure_ascii=False, separators=(", ", ": "))


def convert(src: Path, dst: Path) -> int:
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    dst.write_text("".join(json.dumps({"prompt": r["text"], "response": response(r), "intent": r["intent"]},
                                      ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="folder with train/validation/test .jsonl")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        src = a.data / f"{split}.jsonl"
        if src.is_file():
            print(f"{split}: {convert(src, a.out / f'{split}.jsonl')} rows -> {a.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
