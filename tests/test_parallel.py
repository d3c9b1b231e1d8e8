"""Data parallel training on JAX's sharding: the same numbers on 8 devices as on one, on 2
processes of 4 devices as on one, and the hand rules' gradients under batch sharding and
under `jax.shard_map`.

The devices are fake: XLA's host platform split into 8 (`--xla_force_host_platform_device_count`),
which must be set before JAX starts, so the multi-device work happens in a child Python
(`parallel_child.py`) whose XLA_FLAGS name it (jaxbp's runtime adds its own flag beside it).
One child does all the single-process training runs, through the CLI's `main`; another the
gradients. The multi-process run is two `python -m jaxbp train` processes joined over
loopback (`--coordinator 127.0.0.1:PORT`), killed if they outlive their deadline.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from idx_fixtures import write_idx_dataset
from jaxbp import fast
from jaxbp.app import checkpoint, report
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


def device_env(devices: int) -> dict:
    """The environment of a child Python with `devices` fake CPU devices and this checkout's
    jaxbp."""
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))


def run_on_devices(*args: str) -> dict:
    """`parallel_child.py ARGS` on 8 fake devices: its JSON answer."""
    env = device_env(DEVICES)
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


# ---------------------------------------------------------------- several processes

PROCESSES, PER_PROCESS = 2, 4
DEADLINE_S = 400  # for all processes of one run together


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_on_processes(config: str, out: str, *args: str, last_also: tuple = ()
                       ) -> list[tuple[int, str, str]]:
    """`jaxbp train CONFIG --out OUT ARGS` as 2 processes of 4 fake devices over loopback
    (the last also given `last_also`): each process's (exit code, stdout, stderr). Both are
    killed if any outlives the deadline (the test then fails with their stderr)."""
    coordinator = f"127.0.0.1:{free_port()}"
    logs = os.path.join(os.path.dirname(out), f"{os.path.basename(out)}-logs")
    os.makedirs(logs, exist_ok=True)
    procs, files = [], []
    try:
        for i in range(PROCESSES):
            files.append([open(os.path.join(logs, f"{i}.{n}"), "w+", encoding="utf-8")
                          for n in ("out", "err")])
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "jaxbp", "train", config, "--out", out, *args,
                 *(last_also if i == PROCESSES - 1 else ()), "--coordinator", coordinator, "--num-processes", str(PROCESSES),
                 "--process-id", str(i), "--coordinator-timeout", "60"],
                cwd=REPO, env=device_env(PER_PROCESS), stdout=files[i][0], stderr=files[i][1]))
        deadline = time.monotonic() + DEADLINE_S
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = []
    for proc, streams in zip(procs, files):
        texts = []
        for f in streams:
            f.seek(0)
            texts.append(f.read())
            f.close()
        outputs.append((proc.returncode, *texts))
    return outputs


def summary_of(out: str) -> dict:
    with open(os.path.join(out, report.SUMMARY_FILE), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def processes(config_path, tmp_path_factory) -> dict:
    """Epoch 1 on 2 processes, epoch 2 resumed on 2 processes, epoch 3 resumed on one
    device of this (pytest's) process."""
    out = str(tmp_path_factory.mktemp("processes") / "run")
    first = train_on_processes(config_path, out, "--set", "train.epochs=1")
    metrics_after_first = report.read_metrics(out) if first[0][0] == 0 else None
    second = train_on_processes(config_path, out, "--resume", "--set", "train.epochs=2")
    result = {"first": first, "second": second, "metrics_after_first": metrics_after_first}
    if all(code == 0 for code, _, _ in first + second):
        result["summary"], result["metrics"] = summary_of(out), report.read_metrics(out)
        result["choice"] = checkpoint.choose(out)
        result["resumed_on_one"] = main(["train", config_path, "--out", out, "--resume",
                                         "--set", "train.devices=1"])
        result["resumed_metrics"] = report.read_metrics(out)
    return result


def assert_ran(outputs):
    for i, (code, _, err) in enumerate(outputs):
        assert code == 0, f"process {i} exited {code}: {err[-3000:]}"


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(processes, runs):
    assert_ran(processes["first"])
    assert_ran(processes["second"])
    one = runs["one"][0]
    assert [r["epoch"] for r in processes["metrics"]] == [1, 2]
    assert_close(losses(processes["metrics_after_first"]), losses(one[:1]))
    assert_close(losses(processes["metrics"]), losses(one[:2]))
    summary = processes["summary"]
    assert summary["devices"] == PROCESSES * PER_PROCESS and summary["processes"] == PROCESSES


@pytest.mark.slow
def test_process_zero_alone_talks(processes):
    assert_ran(processes["first"] + processes["second"])
    (_, out0, _), (_, out1, err1) = processes["second"]
    assert "resuming from the checkpoint of epoch 1" in out0
    assert "epoch 2/2: train loss" in out0 and "[Gloo]" not in out0
    assert out1 == "" and err1 == ""


@pytest.mark.slow
def test_checkpoints_of_two_processes_verify(processes):
    """Process 0 wrote each manifest after orbax's commit, over both processes' files."""
    assert_ran(processes["first"] + processes["second"])
    assert processes["choice"] == checkpoint.Choice(2, True, ())
    assert "no checksum manifest" not in processes["second"][0][1]


@pytest.mark.slow
def test_trained_on_two_processes_resumed_on_one_matches_one(processes, runs):
    assert processes.get("resumed_on_one") == 0
    assert_close(losses(processes["resumed_metrics"]), losses(runs["one"][0]))


@pytest.mark.slow
def test_a_failure_in_one_process_before_training_stops_all(config_path, tmp_path):
    """Process 1 cannot read its data: each process says one line and exits 2, none waits."""
    out = str(tmp_path / "run")
    (code0, _, err0), (code1, _, err1) = train_on_processes(
        config_path, out, last_also=("--set", f"data.dir={tmp_path / 'nowhere'}"))
    assert (code0, code1) == (2, 2), (err0[-2000:], err1[-2000:])
    # (Before it, process 0 may have shown TFDS's progress preparing the data.)
    assert err0.endswith("jaxbp: error: process 1 stopped (its own output says why); "
                         "process 0 stops too\n")
    assert err0.count("jaxbp: error") == 1 and "Traceback" not in err0
    assert err1.count("\n") == 1 and "nowhere" in err1 and "Traceback" not in err1
    assert not os.path.exists(out)


@pytest.mark.parametrize("flags, fragment", [
    (["--num-processes", "2"], "missing: --coordinator, --process-id"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in 0..1"),
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "1"],
     "HOST:PORT"),
])
def test_bad_process_flags_are_one_line(config_path, tmp_path, capsys, flags, fragment):
    assert main(["train", config_path, "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run")


def test_an_unreachable_coordinator_is_one_line(config_path, tmp_path, capsys):
    """Nothing listens on the port (bound here, never listening): a process other than 0
    gives up after --coordinator-timeout, before JAX's runtime starts."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        assert main(["train", config_path, "--out", str(tmp_path / "run"),
                     "--coordinator", address, "--num-processes", "2", "--process-id", "1",
                     "--coordinator-timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no coordinator answered at {address} within 1 s" in err


def test_a_coordinator_port_in_use_is_one_line(config_path, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["train", config_path, "--out", str(tmp_path / "run"),
                     "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                     "--process-id", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot serve the coordinator on port {port}" in err
