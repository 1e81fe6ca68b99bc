"""A PNG of a run's metrics.jsonl: training and eval loss, and the router-load entropy.

matplotlib is an optional extra (``pip install zaya[plot]``) and is imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path

from zaya.errors import ZayaError


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(per-step records, eval records) of a metrics.jsonl."""
    path = Path(path)
    if not path.is_file():
        raise ZayaError(f"no metrics log at {path} (has the run started?)")
    steps, evals = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            (evals if "eval_loss" in rec else steps).append(rec)
    return steps, evals


def plot_metrics(metrics: Path, out: Path, title: str | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ZayaError("plotting needs matplotlib: pip install 'zaya[plot]'") from None
    steps, evals = read_metrics(metrics)
    if not steps:
        raise ZayaError(f"{metrics} has no training steps to plot yet")
    fig, (ax_loss, ax_h) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    x = [r["step"] for r in steps]
    ax_loss.plot(x, [r["loss"] for r in steps], label="train", lw=1)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval", ms=3)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_h.plot(x, [r["load_entropy"] for r in steps], lw=1, label="mean over layers")
    ax_h.axhline(0.95, color="grey", ls="--", lw=0.8, label="0.95")
    ax_h.set_ylabel("router load entropy H(p)/ln E")
    ax_h.set_xlabel("optimizer step")
    ax_h.set_ylim(min(0.5, min(r["load_entropy"] for r in steps) - 0.02), 1.005)
    ax_h.legend(loc="lower right")
    ax_h.grid(alpha=0.3)
    fig.suptitle(title or str(Path(metrics).parent))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
