"""What a run leaves in its folder for people: metrics.jsonl, summary.json, curves.png, and
for an autoencoder reconstructions.png.

One metrics record per epoch has the keys of `metric_keys(metric)`, the metric being
"accuracy" for a classifier and "reconstruction_error" (mean squared error per value) for an
autoencoder; `test_loss` and `test_<metric>` are None for epochs without an evaluation
(`train.eval_every`). `delta_norms` and `grad_norms` map the paths of the items of
`model.layers` ("0", "1", ...) to their mean delta norm and parameter-gradient norm over the
epoch's steps (`jaxbp.app.norms`); records written before these existed lack them.
Files are replaced atomically, so a run killed while writing never leaves half a file.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence

from jaxbp.app.norms import DELTA_NORMS, GRAD_NORMS

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.yaml"
RECONSTRUCTIONS_FILE = "reconstructions.png"


def metric_keys(metric: str = "accuracy") -> tuple:
    return ("epoch", "train_loss", f"train_{metric}", "test_loss", f"test_{metric}",
            "epoch_time_s", "images_per_second", DELTA_NORMS, GRAD_NORMS)


METRIC_KEYS = metric_keys()


def metric_of(record: dict) -> str:
    """The metric a record holds: "accuracy" or "reconstruction_error"."""
    return "accuracy" if "train_accuracy" in record else "reconstruction_error"


def write_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def epoch_record(epoch: int, train_loss: float, train_metric: float,
                 test: Optional[tuple[float, float]], seconds: float, images: int,
                 metric: str = "accuracy", layer_norms: Optional[dict] = None) -> dict:
    """One metrics.jsonl line; `test` is (loss, metric) or None when not evaluated;
    `layer_norms` the `delta_norms` and `grad_norms` of `norms.epoch_norms`."""
    test_loss, test_metric = test if test is not None else (None, None)
    return {"epoch": epoch, "train_loss": train_loss, f"train_{metric}": train_metric,
            "test_loss": test_loss, f"test_{metric}": test_metric,
            "epoch_time_s": seconds, "images_per_second": images / max(seconds, 1e-12),
            **(layer_norms or {})}


def write_metrics(out_dir: str, records: Sequence[dict]) -> None:
    """Rewrites metrics.jsonl from the full list, so it always matches the checkpoint's list."""
    write_atomic(os.path.join(out_dir, METRICS_FILE),
                 "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, METRICS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records: Sequence[dict], steps: int, **extra) -> dict:
    """Totals over all epochs plus the last evaluation; `extra` adds fields verbatim."""
    metric = metric_of(records[0]) if records else "accuracy"
    evaluated = [r for r in records if r["test_loss"] is not None]
    last_eval = evaluated[-1] if evaluated else {"test_loss": None, f"test_{metric}": None}
    train_time = sum(r["epoch_time_s"] for r in records)
    images = sum(r["epoch_time_s"] * r["images_per_second"] for r in records)
    return {f"test_{metric}": last_eval[f"test_{metric}"], "test_loss": last_eval["test_loss"],
            "train_loss": records[-1]["train_loss"] if records else None,
            f"train_{metric}": records[-1][f"train_{metric}"] if records else None,
            "epochs": records[-1]["epoch"] if records else 0, "steps": steps,
            "train_time_s": train_time,
            "images_per_second": images / train_time if train_time > 0 else 0.0, **extra}


def write_summary(out_dir: str, summary: dict) -> None:
    write_atomic(os.path.join(out_dir, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")


_SHORT = {"accuracy": "acc", "reconstruction_error": "mse"}
_TITLE = {"accuracy": "Accuracy", "reconstruction_error": "Reconstruction error (MSE)"}


def format_epoch(record: dict, epochs: int) -> str:
    """The one line printed per epoch, whether or not a progress bar is shown."""
    metric = metric_of(record)
    short = _SHORT[metric]
    line = (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
            f"{short} {record[f'train_{metric}']:.4f}")
    if record["test_loss"] is not None:
        line += (f" | test loss {record['test_loss']:.4f} "
                 f"{short} {record[f'test_{metric}']:.4f}")
    return line + f" | {record['epoch_time_s']:.1f} s, {record['images_per_second']:.0f} img/s"


def plot_curves(records: Sequence[dict], path: str,
                layer_names: Optional[Mapping[str, str]] = None) -> None:
    """Loss and accuracy per epoch, train and test, as a PNG of two panels; a third, where
    the records have them, shows each layer's delta and gradient norms (`plot_norms`).
    `layer_names` maps the layers' paths to their types, for the labels."""
    with_norms = [r for r in records if DELTA_NORMS in r]
    fig = _figure((16, 4.5) if with_norms else (10, 4))
    axes = fig.subplots(1, 3 if with_norms else 2)
    epochs = [r["epoch"] for r in records]
    evaluated = [r for r in records if r["test_loss"] is not None]
    metric = metric_of(records[0])
    for ax, key, title in zip(axes, ("loss", metric), ("Loss", _TITLE[metric])):
        ax.plot(epochs, [r[f"train_{key}"] for r in records], "o-", label="train")
        ax.plot([r["epoch"] for r in evaluated], [r[f"test_{key}"] for r in evaluated],
                "s-", label="test")
        _epoch_axis(ax, title)
        ax.legend()
    if with_norms:
        plot_norms(axes[2], with_norms, layer_names or {})
    _save(fig, path)


NORM_DECADES = 2
"""The least span of the norms' log axis, in decades below the largest norm."""


def plot_norms(ax, records: Sequence[dict], layer_names: Mapping[str, str]) -> None:
    """Each layer's mean delta norm (solid, circles) and parameter-gradient norm (dashed,
    squares) per epoch on a log scale, one colour per layer from input (dark) to output
    (light). The axis spans at least `NORM_DECADES` decades below the largest norm, so one
    run's picture compares with another's: a delta that vanishes on its way down shows as
    curves spread far apart, one that keeps its size as curves close together."""
    from matplotlib import colormaps

    paths = list(records[-1][DELTA_NORMS])
    colours = colormaps["viridis"]([0.85 * i / max(len(paths) - 1, 1)
                                    for i in range(len(paths))])
    epochs = [r["epoch"] for r in records]
    values = []
    for layer, colour in zip(paths, colours):
        name = f"{layer} {layer_names.get(layer, '')}".rstrip()
        for key, style, symbol in ((DELTA_NORMS, "o-", "δ"), (GRAD_NORMS, "s--", "∇θ")):
            if layer in records[-1][key]:
                line = [r[key].get(layer, float("nan")) for r in records]
                ax.plot(epochs, line, style, color=colour, label=f"{symbol} {name}")
                values += [v for v in line if v > 0]
    ax.set_yscale("log")
    if values:
        top = 1.5 * max(values)
        ax.set_ylim(min(min(values) / 1.5, top / 10 ** NORM_DECADES), top)
    _epoch_axis(ax, "Each layer's δ = ‖∂ℓ/∂y‖ (solid), ∇θ = ‖∂L/∂θ‖ (dashed)")
    ax.set_ylabel("mean norm (log scale)")
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))


def _epoch_axis(ax, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)


def _figure(size):
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def plot_reconstructions(pairs, path: str) -> None:
    """Originals (top row) above their reconstructions (bottom row), as a PNG.

    `pairs` is (inputs, outputs), each `(count, *spatial, channels)`: 2-D maps are shown as
    grey images on one shared scale per column, 1-D signals as curves.
    """
    inputs, outputs = pairs
    count = len(inputs)
    fig = _figure((1.4 * count, 3.2))
    axes = fig.subplots(2, count, squeeze=False)
    for column in range(count):
        original, rebuilt = inputs[column][..., 0], outputs[column][..., 0]
        low = min(original.min(), rebuilt.min())
        high = max(original.max(), rebuilt.max())
        for row, (ax, values) in enumerate(zip(axes[:, column], (original, rebuilt))):
            if values.ndim == 2:
                ax.imshow(values, cmap="gray", vmin=low, vmax=high)
            else:
                ax.plot(values)
                ax.set_ylim(low, high)
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(("original", "reconstructed")[row])
    _save(fig, path)
