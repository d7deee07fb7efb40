"""A confusion matrix as CSV and as a picture: the files an eval report set holds beside report.json."""
from __future__ import annotations

import csv
import io

import numpy as np


def confusion_csv(cm, labels) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["true \\ predicted"] + labels)
    for lab, row in zip(labels, cm):
        w.writerow([lab] + list(row))
    return buf.getvalue()


def confusion_png(cm, labels, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    n = len(labels)
    size = max(5, min(24, 0.35 * n + 3))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center",
                  fontsize=8 if n <= 20 else 5)
    ax.set_yticks(range(n), labels, fontsize=8 if n <= 20 else 5)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    return png_bytes(fig)


def png_bytes(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes, the figure closed: reports write plots as one file set."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
