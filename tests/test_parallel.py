"""Data parallel training on JAX's sharding: the same numbers on 8 devices as on one, and
the hand rules' gradients under batch sharding and under `jax.shard_map`.

The devices are fake: XLA's host platform split into 8 (`--xla_force_host_platform_device_count`),
which must be set before JAX starts, so the multi-device work happens in a child Python
(`parallel_child.py`) whose XLA_FLAGS name it (jaxbp's runtime adds its own flag beside it).
One child does all the training runs, through the CLI's `main`; another the gradients.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from idx_fixtures import write_idx_dataset
from jaxbp import fast
from jaxbp.app.cli import main
from jaxbp.testing import TOLERANCE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8

# conv, batch norm (statistics over the global batch), max_pool, dropout (one key for the
# global batch), dense: what could come out differently when the batch is split.
MODEL = {"layers": [
    {"type": "conv", "features": 4, "kernel": 5, "stride": 2},
    {"type": "batch_norm"},
    {"type": "relu"},
    {"type": "max_pool", "window": 2},
    {"type": "flatten"},
    {"type": "dropout", "rate": 0.25},
    {"type": "dense", "features": 10},
]}


def write_config(path, idx_dir: str, cache_dir: str, batch_size: int = 32) -> str:
    """float64, constant learning rate: a run's first epochs do not depend on its length."""
    cfg = {"model": MODEL, "loss": "softmax_cross_entropy",
           "optimizer": {"name": "momentum", "learning_rate": 0.05},
           "data": {"name": "mnist", "batch_size": batch_size, "dir": idx_dir,
                    "data_dir": cache_dir},
           "train": {"epochs": 3, "seed": 0, "precision": "float64"}}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> str:
    """256 train images (8 steps of 32 an epoch), 108 test images: the last eval batch, 12,
    is 8 split over the devices and 4 run whole on each."""
    root = tmp_path_factory.mktemp("parallel")
    idx = write_idx_dataset(root / "idx", n_train=256, n_test=108)
    return write_config(root / "tiny.yaml", str(idx), str(root / "cache"))


def run_on_devices(*args: str) -> dict:
    """`parallel_child.py ARGS` on 8 fake devices: its JSON answer."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, os.path.join(REPO, "tests", "parallel_child.py"),
                           *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def losses(metrics: list[dict]) -> list[float]:
    """Epoch by epoch: train loss, train accuracy, and where evaluated test loss, accuracy."""
    keys = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
    return [r[k] for r in metrics for k in keys if r[k] is not None]


def layer_norms(metrics: list[dict]) -> list[float]:
    """Epoch by epoch, each layer's mean delta norm, then its gradient norm."""
    return [v for r in metrics for key in ("delta_norms", "grad_norms")
            for v in r[key].values()]


def assert_close(a: list[float], b: list[float], rel: float = 1e-9) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * max(abs(x), abs(y)), (a, b)


@pytest.fixture(scope="module")
def runs(config_path, tmp_path_factory) -> dict:
    return run_on_devices("train", config_path, str(tmp_path_factory.mktemp("runs")))


@pytest.mark.slow
def test_eight_devices_give_the_numbers_of_one(runs):
    (eight, eight_summary), (one, one_summary) = runs["eight"], runs["one"]
    assert eight_summary["devices"] == DEVICES and one_summary["devices"] == 1
    assert eight_summary["processes"] == one_summary["processes"] == 1
    assert [r["epoch"] for r in eight] == [1, 2, 3]
    assert_close(losses(eight), losses(one))
    assert_close(layer_norms(eight), layer_norms(one))
    assert eight[0]["train_loss"] != eight[-1]["train_loss"], "it trained"


@pytest.mark.slow
def test_trained_on_eight_resumed_on_one_matches_one(runs):
    (first, first_summary), (resumed, _) = runs["first_on_eight"], runs["resumed_on_one"]
    assert first_summary["devices"] == DEVICES and len(first) == 1
    assert_close(losses(resumed), losses(runs["one"][0]))


@pytest.mark.slow
def test_a_batch_the_devices_do_not_divide_is_one_line(runs):
    code, err = runs["odd_batch"]
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "data.batch_size=12" in err and f"over {DEVICES} devices" in err


def test_too_many_devices_is_one_line(config_path, tmp_path, capsys):
    assert main(["train", config_path, "--out", str(tmp_path / "run"),
                 "--set", "train.devices=4096"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.devices=4096" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run")


def test_devices_must_be_positive(config_path, tmp_path, capsys):
    assert main(["train", config_path, "--out", str(tmp_path / "run"),
                 "--set", "train.devices=0"]) == 2
    assert "train.devices" in capsys.readouterr().err


@pytest.mark.slow
def test_hand_rules_match_the_twins_sharded_and_under_shard_map():
    result = run_on_devices("rules")
    assert result["devices"] == DEVICES
    assert set(result["errors"]) == {f"{slot}={name}" for slot in fast.SLOTS
                                     for name in fast.names(slot)}
    for formulation, errors in result["errors"].items():
        for where, error in errors.items():
            assert error <= TOLERANCE["float64"], (formulation, where, error)
    assert result["shard_map_reference"] <= TOLERANCE["float64"], "the harness sums once"
    # Batch norm over each slice is not over the whole batch: the shard_map expectation is
    # not the whole batch's gradient, so matching it says something of its own.
    assert result["slices_differ_from_whole"] > 1e-3
