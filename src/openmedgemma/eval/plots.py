"""PNG plots of results (matplotlib, Agg backend): confusion matrices and ROC curves."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusions(confusions: list[dict], path: Path) -> Path:
    """One panel per {"title", "rows", "cols", "matrix"}; counts written in the cells."""
    plt = _pyplot()
    n = len(confusions)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 4 * rows), squeeze=False)
    for ax, conf in zip(axes.flat, confusions):
        matrix = conf["matrix"]
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(conf["cols"])), conf["cols"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(conf["rows"])), conf["rows"], fontsize=8)
        ax.set_xlabel("answer")
        ax.set_ylabel("reference")
        ax.set_title(conf["title"], fontsize=9)
        peak = max((max(r) for r in matrix), default=0) or 1
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(
                    j,
                    i,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > peak / 2 else "black",
                )
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rocs(rocs: list[dict], path: Path, title: str) -> Path:
    """ROC curves from {"label", "fpr", "tpr", "auc"}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for roc in rocs:
        ax.plot(roc["fpr"], roc["tpr"], label=f"{roc['label']} (AUC {roc['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
