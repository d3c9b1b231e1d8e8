"""The CLI surface: `check` (passing, and failing on a broken rule), bad input, `data prepare`.

Everything runs in-process through `jaxbp.cli.main`; the module entry
(`python3 -m jaxbp`) is exercised by the SIGKILL test in test_train.py.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import pytest

from jaxbp import nn
from jaxbp.check import CHECK_FILE
from jaxbp.cli import main
from jaxbp.config import load_config
from test_train import config_path, run_cli  # noqa: F401  (config_path is a fixture)


def broken_relu():
    """relu whose backward doubles the incoming gradient: a deliberately wrong rule."""
    rule = jax.custom_vjp(lambda x: jnp.maximum(x, 0.0))
    rule.defvjp(lambda x: (jnp.maximum(x, 0.0), x > 0),
                lambda mask, g: (jnp.where(mask, 2 * g, 0.0),))
    return rule


def read_check(folder) -> dict:
    with open(os.path.join(folder, CHECK_FILE)) as f:
        return json.load(f)


@pytest.mark.slow
def test_check_passes_in_float64_into_default_out(config_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli("check", config_path) == 0
    out = capsys.readouterr().out
    assert "all gradients agree" in out and "max rel error" in out
    result = read_check(os.path.join("runs", "tiny"))
    assert result["ok"] and result["precision"] == "float64" and result["tolerance"] == 1e-10
    names = [row["parameter"] for row in result["rows"]]
    assert names == ["(loss value)", "0/b", "0/w", "3/b", "3/w", "7/b", "7/w"]
    assert next(r for r in result["rows"] if r["parameter"] == "3/w")["shape"] == [5, 5, 4, 8]


@pytest.mark.slow
def test_check_fails_when_a_rule_is_broken(config_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nn, "HAND", dataclasses.replace(nn.HAND, relu=broken_relu()))
    assert run_cli("check", config_path, "--out", tmp_path,
                   "--set", "train.precision=float32") == 1
    assert "GRADIENTS DISAGREE" in capsys.readouterr().out
    result = read_check(tmp_path)
    assert result["precision"] == "float32" and not result["ok"]
    verdicts = {row["parameter"]: row["ok"] for row in result["rows"]}
    # Only the layers below a relu see the doubled gradient; the loss value is unaffected.
    assert verdicts == {"(loss value)": True, "0/b": False, "0/w": False, "3/b": False,
                        "3/w": False, "7/b": True, "7/w": True}


BAD_INPUT = {
    "misspelt key": (["--set", "optimizer.learning_rat=0.1"],
                     "optimizer.learning_rat: unknown key"),
    "wrong type": (["--set", "data.batch_size=many"], "data.batch_size: expected an integer"),
    "5x5 kernel on a 4x4 map": (["--set", "model.layers.6={type: conv, features: 4, kernel: 5}"],
                                "model.layers[6] (conv)"),
    "unknown optimizer": (["--set", "optimizer.name=adamm"], "unknown optimizer 'adamm'"),
    "missing data folder": (["--set", "data.dir=/nonexistent/idx"], "/nonexistent/idx"),
}


@pytest.mark.parametrize("command", ["train", "check"])
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, command, config_path,
                                                             tmp_path, capsys):
    sets, message = BAD_INPUT[case]
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli(command, config_path, "--out", out, *sets) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxbp: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxbp: error:") and "nope.yaml" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_eval_without_checkpoint_exits_2(config_path, tmp_path, capsys):
    assert run_cli("eval", config_path, "--checkpoint", tmp_path) == 2
    assert "no checkpoint found" in capsys.readouterr().err


def test_data_prepare(config_path, tmp_path, capsys):
    idx_dir = load_config(config_path)["data"]["dir"]
    assert run_cli("data", "prepare", "mnist", "--set", f"data.dir={idx_dir}",
                   "--set", f"data.data_dir={tmp_path}") == 0
    assert os.listdir(tmp_path), "prepared files are cached in data.data_dir"
    assert run_cli("data", "prepare", "mnist", "--set", "train.epochs=3") == 2
    assert "only takes data.* keys" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["train"])
    assert exc.value.code == 2
