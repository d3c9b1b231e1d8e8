"""The CLI surface: `check` (passing, and failing on a broken rule), bad input, `data prepare`.

Everything runs in-process through `jaxbp.app.cli.main`; the module entry
(`python3 -m jaxbp`) is exercised by the SIGKILL test in test_train.py.
"""
from __future__ import annotations

import json
import os

import pytest
import yaml

from jaxbp.app.check import CHECK_FILE
from jaxbp.app.cli import main
from jaxbp.app.config import load_config
from test_train import config_path, run_cli  # noqa: F401  (config_path is a fixture)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MY_RULES = os.path.join(REPO, "configs", "my_rules.py")


def with_rules(config_path: str, folder, module: str, rules: str, replace_relu: str) -> str:
    """A copy of the tiny config in `folder` that imports `module` (written there from
    `rules`) and uses its layer `replace_relu` wherever the tiny net has a relu."""
    (folder / f"{module}.py").write_text(rules)
    cfg = yaml.safe_load(open(config_path))
    cfg["imports"] = [module]
    for item in cfg["model"]["layers"]:
        if item["type"] == "relu":
            item["type"] = replace_relu
    path = folder / "with_rules.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def softplus_rules(name: str, factor: str = "") -> str:
    """configs/my_rules.py registering its softplus as `name`, its backward times `factor`."""
    text = open(MY_RULES).read().replace('"my_softplus"', repr(name))
    return text.replace("(delta * jax.nn.sigmoid(x),)", f"(delta * jax.nn.sigmoid(x){factor},)")


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
def test_a_registered_rule_of_your_own_trains_and_passes_check(config_path, tmp_path, capsys):
    config = with_rules(config_path, tmp_path, "rules_right", softplus_rules("softplus_right"),
                        "softplus_right")
    assert run_cli("check", config, "--out", tmp_path / "check") == 0
    assert "all gradients agree" in capsys.readouterr().out
    assert run_cli("train", config, "--out", tmp_path / "run") == 0
    assert "softplus_right" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.slow
def test_check_fails_when_a_rule_is_broken(config_path, tmp_path, capsys):
    config = with_rules(config_path, tmp_path, "rules_broken",
                        softplus_rules("softplus_doubled", " * 2"), "softplus_doubled")
    assert run_cli("check", config, "--out", tmp_path,
                   "--set", "train.precision=float32") == 1
    assert "GRADIENTS DISAGREE" in capsys.readouterr().out
    result = read_check(tmp_path)
    assert result["precision"] == "float32" and not result["ok"]
    verdicts = {row["parameter"]: row["ok"] for row in result["rows"]}
    # Only the layers below a (doubled) softplus see the wrong gradient; the loss value is right.
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


@pytest.mark.parametrize("rules, message", [
    (None, "imports[0]: cannot import module 'rules_nowhere'"),
    ('import jaxbp, jax.numpy as jnp\n'
     'jaxbp.register_layer("relu", hand=jnp.tanh, reference=jnp.tanh)\n',
     "layer 'relu' is already registered by jaxbp.builtins"),
    ("raise RuntimeError('half-written module')\n", "RuntimeError: half-written module"),
], ids=["missing module", "name registered twice", "module that fails"])
def test_bad_imports_exit_2_with_one_line_and_touch_nothing(rules, message, config_path,
                                                             tmp_path, capsys):
    folder = tmp_path / "config"
    folder.mkdir()
    module = "rules_nowhere" if rules is None else f"rules_bad_{len(rules)}"
    config = with_rules(config_path, folder, module, rules or "", "relu")
    if rules is None:
        os.remove(folder / f"{module}.py")
    out = tmp_path / "run"
    assert run_cli("train", config, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxbp: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert not out.exists()


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
