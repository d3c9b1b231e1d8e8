"""End-to-end training through the CLI on tiny idx fixtures: reports, checkpoints, resume, NaN.

Runs go through `jaxbp.app.cli.main` in-process, except one `python3 -m jaxbp` that
is killed with SIGKILL mid-run and then resumed. Module-scoped fixtures share
the few uninterrupted runs the tests compare against.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from idx_fixtures import write_idx_dataset
from jaxbp.app import checkpoint, manifest, report, rundir
from jaxbp.app.cli import main
from jaxbp.app.config import load_config
from jaxbp.app.train import build, use_precision
from test_checkpoint import flip_byte

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 28x28 -> conv 4@5x5 -> 24x24 -> pool -> 12x12 -> conv 8@5x5 -> 8x8 -> pool -> 4x4x8 -> 10.
TINY_MODEL = {"layers": [
    {"type": "conv", "features": 4, "kernel": 5},
    {"type": "relu"},
    {"type": "max_pool", "window": 2},
    {"type": "conv", "features": 8, "kernel": 5},
    {"type": "relu"},
    {"type": "max_pool", "window": 2},
    {"type": "flatten"},
    {"type": "dense", "features": 10},
]}


def write_config(path, idx_dir: str, cache_dir: str, epochs: int = 1) -> str:
    """A tiny LeNet-like config on the idx fixture; constant learning rate, so a run's
    first epochs do not depend on its length."""
    cfg = {"model": TINY_MODEL, "loss": "softmax_cross_entropy",
           "optimizer": {"name": "momentum", "learning_rate": 0.05},
           "data": {"name": "mnist", "batch_size": 32, "dir": idx_dir, "data_dir": cache_dir},
           "train": {"epochs": epochs, "seed": 0}}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> str:
    """tiny.yaml (1 epoch) on 512 train / 256 test fixture images."""
    root = tmp_path_factory.mktemp("tiny")
    idx = write_idx_dataset(root / "idx", n_train=512, n_test=256)
    return write_config(root / "tiny.yaml", str(idx), str(root / "cache"))


def run_cli(*argv: str) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def one_epoch_run(config_path, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("runs") / "one")
    assert run_cli("train", config_path, "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def two_epoch_run(config_path, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("runs") / "two")
    assert run_cli("train", config_path, "--out", out, "--set", "train.epochs=2") == 0
    return out


def copy_run(run_dir: str, tmp_path) -> str:
    dest = str(tmp_path / os.path.basename(run_dir))
    shutil.copytree(run_dir, dest)
    return dest


def final_params(run_dir: str, config: str):
    """The newest checkpoint's parameters, restored into the config's model structure."""
    cfg = load_config(config)
    model, dtype = build(cfg), use_precision(cfg.train.precision)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dtype=dtype))
    return checkpoint.restore(run_dir, checkpoint.latest_epoch(run_dir), abstract).params


def assert_same_params(run_a: str, run_b: str, config: str) -> None:
    a, b = final_params(run_a, config), final_params(run_b, config)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), \
            "parameters differ"


def learning_metrics(run_dir: str) -> list[tuple]:
    """Per-epoch losses, accuracies and layer norms (not the timings) from metrics.jsonl."""
    keys = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
            "delta_norms", "grad_norms")
    return [tuple(r[k] for k in keys) for r in report.read_metrics(run_dir)]


@pytest.mark.slow
def test_one_epoch_writes_reports_and_checkpoint(one_epoch_run, config_path):
    summary = json.load(open(os.path.join(one_epoch_run, report.SUMMARY_FILE)))
    assert summary["epochs"] == 1 and summary["steps"] == 512 // 32
    assert summary["test_accuracy"] > 0.5, "10 classes: chance is 0.1"
    assert summary["test_loss"] > 0 and summary["train_time_s"] > 0
    assert summary["images_per_second"] > 0

    (record,) = report.read_metrics(one_epoch_run)
    assert set(record) == set(report.METRIC_KEYS) and record["epoch"] == 1
    assert record["test_accuracy"] == summary["test_accuracy"]

    with open(os.path.join(one_epoch_run, report.CONFIG_FILE)) as f:
        assert yaml.safe_load(f) == load_config(config_path)
    with open(os.path.join(one_epoch_run, report.CURVES_FILE), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert checkpoint.latest_epoch(one_epoch_run) == 1
    assert checkpoint.choose(one_epoch_run) == checkpoint.Choice(1, True, ())


@pytest.mark.slow
def test_metrics_hold_each_layers_norms_and_curves_plot_them(one_epoch_run):
    from matplotlib.figure import Figure

    (record,) = report.read_metrics(one_epoch_run)
    deltas, grads = record["delta_norms"], record["grad_norms"]
    assert list(deltas) == [str(i) for i in range(len(TINY_MODEL["layers"]))]
    assert list(grads) == ["0", "3", "7"], "the conv and dense layers"
    assert all(np.isfinite(v) and v > 0 for v in [*deltas.values(), *grads.values()])
    assert deltas["6"] == pytest.approx(deltas["5"], rel=1e-6), "flatten only reshapes δ"

    names = {str(i): layer["type"] for i, layer in enumerate(TINY_MODEL["layers"])}
    ax = Figure().subplots()
    report.plot_norms(ax, [record], names)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert high / low >= 10 ** report.NORM_DECADES, "runs compare on one span of decades"
    assert list(lines)[:3] == ["δ 0 conv", "∇θ 0 conv", "δ 1 relu"] and len(lines) == 8 + 3
    assert lines["∇θ 7 dense"].get_ydata()[0] == grads["7"]
    assert lines["δ 0 conv"].get_linestyle() != lines["∇θ 0 conv"].get_linestyle()
    with open(os.path.join(one_epoch_run, report.CURVES_FILE), "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert width > 3 * height, "three panels side by side"


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(one_epoch_run, two_epoch_run, config_path, tmp_path,
                                          capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    resumed = copy_run(one_epoch_run, tmp_path)
    assert run_cli("train", config_path, "--out", resumed, "--resume",
                   "--set", "train.epochs=2") == 0
    out, err = capsys.readouterr()
    assert "optimizer:" in out and "learning_rate: 0.05" in out, "the resolved config"
    assert "total parameters: 2,202" in out, "the model summary"
    assert "resuming from the checkpoint of epoch 1" in out
    assert "train.epochs: 1 -> 2" in out
    assert "epoch 2/2: train loss" in out
    assert "img/s" in err and "loss=" in err, "the progress bar ran on a (fake) terminal"
    assert checkpoint.latest_epoch(resumed) == 2
    assert_same_params(resumed, two_epoch_run, config_path)
    assert learning_metrics(resumed) == learning_metrics(two_epoch_run)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(two_epoch_run, config_path, tmp_path):
    """`python3 -m jaxbp` killed -9 after epoch 1's checkpoint, resumed: same parameters."""
    out = str(tmp_path / "killed")
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxbp", "train", config_path, "--out", out,
         "--set", "train.epochs=2"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    first = os.path.join(checkpoint.checkpoint_dir(out), "1")
    deadline = time.monotonic() + 120
    while not os.path.isdir(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert alive, "the run ended before it could be killed: " + open(tmp_path / "log.txt").read()
    assert checkpoint.latest_epoch(out) == 1, "killed before epoch 2's checkpoint"

    assert run_cli("train", config_path, "--out", out, "--resume",
                   "--set", "train.epochs=2") == 0
    assert_same_params(out, two_epoch_run, config_path)
    assert learning_metrics(out) == learning_metrics(two_epoch_run)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(one_epoch_run, config_path, tmp_path,
                                                       capsys):
    run = copy_run(one_epoch_run, tmp_path)
    metrics_before = open(os.path.join(run, report.METRICS_FILE)).read()
    code = run_cli("train", config_path, "--out", run, "--resume",
                   "--set", "train.epochs=2", "--set", "optimizer.learning_rate=1e30")
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("jaxbp: error: training diverged in epoch 2") and err.count("\n") == 1
    assert "last good checkpoint (epoch 1)" in err and "Traceback" not in err
    assert checkpoint.latest_epoch(run) == 1
    assert open(os.path.join(run, report.METRICS_FILE)).read() == metrics_before
    assert_same_params(run, one_epoch_run, config_path)


@pytest.mark.slow
def test_refuses_a_run_dir_with_checkpoints_without_resume(one_epoch_run, config_path, tmp_path,
                                                           capsys):
    run = copy_run(one_epoch_run, tmp_path)
    before = {name: os.path.getmtime(os.path.join(run, name)) for name in os.listdir(run)}
    assert run_cli("train", config_path, "--out", run) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxbp: error:") and "--resume" in err and err.count("\n") == 1
    assert {name: os.path.getmtime(os.path.join(run, name)) for name in os.listdir(run)} == before

    shutil.rmtree(checkpoint.checkpoint_dir(run))
    metrics = open(os.path.join(run, report.METRICS_FILE)).read()
    assert run_cli("train", config_path, "--out", run) == 2
    assert "metrics.jsonl of a run" in capsys.readouterr().err
    assert open(os.path.join(run, report.METRICS_FILE)).read() == metrics


@pytest.mark.slow
def test_eval_reproduces_the_summary(one_epoch_run, config_path, capsys):
    assert run_cli("eval", config_path, "--checkpoint", one_epoch_run) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.load(open(os.path.join(one_epoch_run, report.SUMMARY_FILE)))
    assert result["epoch"] == 1
    assert result["test_accuracy"] == summary["test_accuracy"]
    assert result["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


def params_array_file(run_dir: str, epoch: int) -> str:
    """The largest file of checkpoint `epoch`'s params: the array data."""
    folder = os.path.join(checkpoint.step_dir(run_dir, epoch), "params")
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    return max(files, key=os.path.getsize)


def folder_bytes(folder: str) -> dict:
    return {os.path.join(root, name): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def eval_result(capsys) -> tuple[dict, str]:
    """The JSON line `jaxbp eval` printed, and its stderr."""
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.mark.slow
def test_a_damaged_checkpoint_is_skipped_and_resume_stays_bit_exact(two_epoch_run, config_path,
                                                                    tmp_path, capsys):
    run = copy_run(two_epoch_run, tmp_path)
    bad = params_array_file(run, 2)
    flip_byte(bad, os.path.getsize(bad) // 2)
    damaged_bytes = folder_bytes(checkpoint.step_dir(run, 2))
    rel = os.path.relpath(bad, checkpoint.step_dir(run, 2))
    note = (f"the checkpoint of epoch 2 in {checkpoint.step_dir(run, 2)} is damaged "
            f"(checksum mismatch in {rel})")

    assert run_cli("eval", config_path, "--checkpoint", run) == 0
    result, err = eval_result(capsys)
    assert result["epoch"] == 1 and f"{note}; skipped" in err
    assert "the newest intact one" in err and checkpoint.epochs(run) == [1, 2]

    assert run_cli("train", config_path, "--out", run, "--resume",
                   "--set", "train.epochs=2") == 0
    out = capsys.readouterr().out
    aside = os.path.join(run, rundir.DAMAGED_DIR, "2")
    assert f"{note}; moved to {aside}, not deleted" in out
    assert "resuming from the checkpoint of epoch 1, the newest intact one" in out
    assert {os.path.relpath(k, aside): v for k, v in folder_bytes(aside).items()} == \
        {os.path.relpath(k, checkpoint.step_dir(run, 2)): v for k, v in damaged_bytes.items()}
    assert checkpoint.choose(run) == checkpoint.Choice(2, True, ())
    assert_same_params(run, two_epoch_run, config_path)
    assert learning_metrics(run) == learning_metrics(two_epoch_run)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "eval"])
def test_no_intact_checkpoint_exits_2_and_changes_nothing(command, one_epoch_run, config_path,
                                                          tmp_path, capsys):
    run = copy_run(one_epoch_run, tmp_path)
    flip_byte(params_array_file(run, 1))
    before = folder_bytes(run)
    argv = ("--out", run, "--resume") if command == "train" else ("--checkpoint", run)
    assert run_cli(command, config_path, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxbp: error: no intact checkpoint in {checkpoint.checkpoint_dir(run)}"
                          f" (epoch 1: checksum mismatch in params/")
    assert err.count("\n") == 1 and folder_bytes(run) == before


@pytest.mark.slow
@pytest.mark.parametrize("command, model", [("train", "model/optimizer"), ("eval", "model")])
def test_a_checkpoint_of_another_model_does_not_fit(command, model, one_epoch_run, config_path,
                                                    tmp_path, capsys):
    run = copy_run(one_epoch_run, tmp_path)
    before = folder_bytes(run)
    argv = ("--out", run, "--resume") if command == "train" else ("--checkpoint", run)
    assert run_cli(command, config_path, *argv, "--set", "model.layers.0.features=6") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxbp: error: the checkpoint of epoch 1 in "
                          f"{checkpoint.step_dir(run, 1)} does not fit this config's {model}: ")
    assert err.count("\n") == 1 and folder_bytes(run) == before


@pytest.mark.slow
def test_a_checkpoint_without_manifest(two_epoch_run, config_path, tmp_path, capsys):
    """Newer than one with a manifest: damaged (cut short); in a run without any: written
    before checkpoints were verified, used unverified."""
    run = copy_run(two_epoch_run, tmp_path)
    os.remove(os.path.join(checkpoint.step_dir(run, 2), manifest.MANIFEST_FILE))
    assert run_cli("eval", config_path, "--checkpoint", run) == 0
    result, err = eval_result(capsys)
    assert result["epoch"] == 1 and "epoch 2" in err and "(missing manifest); skipped" in err

    os.remove(os.path.join(checkpoint.step_dir(run, 1), manifest.MANIFEST_FILE))
    assert run_cli("eval", config_path, "--checkpoint", run) == 0
    result, err = eval_result(capsys)
    assert result["epoch"] == 2 and err.strip() == rundir.unverified_note(2)


def test_summary_totals_over_epochs():
    records = [report.epoch_record(1, 2.0, 0.5, None, 2.0, 100),
               report.epoch_record(2, 1.0, 0.7, (0.9, 0.75), 1.0, 100)]
    summary = report.summarize(records, steps=20, precision="float32")
    assert summary["test_accuracy"] == 0.75 and summary["test_loss"] == 0.9
    assert summary["epochs"] == 2 and summary["steps"] == 20
    assert summary["train_time_s"] == 3.0
    assert summary["images_per_second"] == pytest.approx(200 / 3.0)
    assert summary["precision"] == "float32"
