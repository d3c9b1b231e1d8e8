"""What a run leaves in its folder for people: metrics.jsonl, summary.json, curves.png.

One metrics record per epoch has the keys of `METRIC_KEYS`; `test_loss` and
`test_accuracy` are None for epochs without an evaluation (`train.eval_every`).
Files are replaced atomically, so a run killed while writing never leaves half a file.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.yaml"
METRIC_KEYS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
               "epoch_time_s", "images_per_second")


def write_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def epoch_record(epoch: int, train_loss: float, train_accuracy: float,
                 test: Optional[tuple[float, float]], seconds: float, images: int) -> dict:
    """One metrics.jsonl line; `test` is (loss, accuracy) or None when not evaluated."""
    test_loss, test_accuracy = test if test is not None else (None, None)
    return {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
            "test_loss": test_loss, "test_accuracy": test_accuracy,
            "epoch_time_s": seconds, "images_per_second": images / max(seconds, 1e-12)}


def write_metrics(out_dir: str, records: Sequence[dict]) -> None:
    """Rewrites metrics.jsonl from the full list, so it always matches the checkpoint's list."""
    write_atomic(os.path.join(out_dir, METRICS_FILE),
                 "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, METRICS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records: Sequence[dict], steps: int, **extra) -> dict:
    """Totals over all epochs plus the last evaluation; `extra` adds fields verbatim."""
    evaluated = [r for r in records if r["test_accuracy"] is not None]
    last_eval = evaluated[-1] if evaluated else {"test_loss": None, "test_accuracy": None}
    train_time = sum(r["epoch_time_s"] for r in records)
    images = sum(r["epoch_time_s"] * r["images_per_second"] for r in records)
    return {"test_accuracy": last_eval["test_accuracy"], "test_loss": last_eval["test_loss"],
            "train_loss": records[-1]["train_loss"] if records else None,
            "train_accuracy": records[-1]["train_accuracy"] if records else None,
            "epochs": records[-1]["epoch"] if records else 0, "steps": steps,
            "train_time_s": train_time,
            "images_per_second": images / train_time if train_time > 0 else 0.0, **extra}


def write_summary(out_dir: str, summary: dict) -> None:
    write_atomic(os.path.join(out_dir, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")


def format_epoch(record: dict, epochs: int) -> str:
    """The one line printed per epoch, whether or not a progress bar is shown."""
    line = (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f}")
    if record["test_accuracy"] is not None:
        line += f" | test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}"
    return line + f" | {record['epoch_time_s']:.1f} s, {record['images_per_second']:.0f} img/s"


def plot_curves(records: Sequence[dict], path: str) -> None:
    """Loss and accuracy per epoch, train and test, as a two-panel PNG."""
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    epochs = [r["epoch"] for r in records]
    evaluated = [r for r in records if r["test_accuracy"] is not None]
    for ax, key, title in zip(fig.subplots(1, 2), ("loss", "accuracy"), ("Loss", "Accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in records], "o-", label="train")
        ax.plot([r["epoch"] for r in evaluated], [r[f"test_{key}"] for r in evaluated],
                "s-", label="test")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
