"""Config files: loading, validation messages, `--set` overrides, and the optimizers they make."""
import copy
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbp.app.config import (ConfigError, apply_override, dump_config, load_config, validate_config,
                              validate_optimizer)
from jaxbp.app.optim import make_optimizer, make_schedule

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
SHIPPED = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))

BASE = {
    "model": {"layers": [{"type": "conv", "features": 4, "kernel": 3}, {"type": "relu"},
                         {"type": "flatten"}, {"type": "dense", "features": 10}]},
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "sgd", "learning_rate": 0.1},
    "data": {"name": "fashion_mnist"},
}


def _with(path, value):
    """BASE with the value at `path` (a tuple of keys/indices) replaced; `...` deletes it."""
    raw = copy.deepcopy(BASE)
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shipped_configs_are_present():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"seed000.yaml", "seed001.yaml", "seed002.yaml", "lenet5.yaml",
            "mnist1d_cnn.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_config_validates_to_itself_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert validate_config(copy.deepcopy(cfg)) == cfg
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


def test_defaults_are_filled():
    cfg = validate_config(copy.deepcopy(BASE))
    assert cfg["train"] == {"epochs": 10, "seed": 0, "precision": "float32", "eval_every": 1,
                            "checkpoint_every": 1, "devices": None}
    assert cfg["optimizer"]["schedule"] == {"name": "constant"}
    assert cfg["data"]["batch_size"] == 128 and cfg["data"]["normalize"] == "standardize"
    conv = cfg["model"]["layers"][0]
    assert conv["padding"] == "VALID" and conv["stride"] == 1 and conv["use_bias"] is True
    assert conv["kernel_init"] == {"name": "lecun_normal"}
    assert cfg["model"]["input_shape"] is None


def test_shorthands_are_normalised():
    raw = _with(("optimizer", "schedule"), "cosine")
    raw["model"]["layers"][0].update(padding="same", bias_init={"name": "normal"})
    cfg = validate_config(raw)
    assert cfg["optimizer"]["schedule"] == {"name": "cosine", "alpha": 0.0}
    assert cfg["model"]["layers"][0]["padding"] == "SAME"
    assert cfg["model"]["layers"][0]["bias_init"] == {"name": "normal", "stddev": 0.01}


BAD = [
    # (path, value, substrings the one-line message must contain)
    (("trian",), {}, ["trian", "did you mean 'train'"]),
    (("optimizer", "learnig_rate"), 0.1, ["optimizer.learnig_rate", "'learning_rate'"]),
    (("optimizer", "learning_rate"), "fast", ["optimizer.learning_rate", "'fast'"]),
    (("optimizer", "learning_rate"), -1.0, ["optimizer.learning_rate", "> 0"]),
    (("optimizer", "learning_rate"), ..., ["optimizer.learning_rate", "missing"]),
    (("optimizer", "name"), "adm", ["optimizer.name", "did you mean 'adam'"]),
    (("optimizer", "momentum"), 0.9, ["optimizer.momentum", "for optimizer 'sgd'",
                                      "momentum, nesterov"]),
    (("optimizer", "schedule"), {"name": "cosin"}, ["optimizer.schedule.name", "'cosine'"]),
    (("optimizer", "schedule"), {"name": "cosine", "alpah": 0.1},
     ["optimizer.schedule.alpah", "'alpha'"]),
    (("optimizer", "schedule"), {"name": "warmup_cosine", "warmup_epochs": 10},
     ["optimizer.schedule.warmup_epochs", "train.epochs"]),
    (("optimizer", "schedule"), {"name": "piecewise", "boundaries": [2, 4], "scales": [0.1]},
     ["optimizer.schedule.scales", "one scale per boundary"]),
    (("optimizer", "schedule"), {"name": "piecewise", "boundaries": [4, 2], "scales": [1, 1]},
     ["optimizer.schedule.boundaries", "increasing"]),
    (("optimizer",), ..., ["optimizer", "missing"]),
    (("loss",), "mse", ["loss", "unknown loss 'mse'"]),
    (("data", "name"), "fashion", ["data.name", "'fashion_mnist'"]),
    (("data", "batch_size"), 0, ["data.batch_size", ">= 1"]),
    (("data", "normalise"), "none", ["data.normalise", "'normalize'"]),
    (("train", "epochs"), True, ["train.epochs", "(bool)"]),
    (("train", "precision"), "float16", ["train.precision", "float32, float64"]),
    (("model", "layers"), [], ["model.layers", "non-empty list"]),
    (("model", "layers"), ..., ["model.layers", "missing"]),
    (("model", "layers", 0, "type"), "convv", ["model.layers[0].type", "'conv'"]),
    (("model", "layers", 0, "kernel"), "5x5", ["model.layers[0].kernel", "'5x5'"]),
    (("model", "layers", 0, "features"), ..., ["model.layers[0].features", "missing"]),
    (("model", "layers", 0, "padding"), "full", ["model.layers[0].padding", "SAME"]),
    (("model", "layers", 0, "kernel_init"), "lecun_norml", ["model.layers[0].kernel_init.name",
                                                      "'lecun_normal'"]),
    (("model", "layers", 0, "bias_init"), "he_normal", ["model.layers[0].bias_init.name",
                                                        "bias initialiser"]),
    (("model", "layers", 1, "features"), 3, ["model.layers[1].features", "layer type 'relu'"]),
    (("model", "layers", 3), {"type": "softmax"}, ["model.layers[3] (softmax)",
                                                   "softmax_cross_entropy"]),
    (("model", "input_shape"), [28, 0], ["model.input_shape[1]", ">= 1"]),
]


@pytest.mark.parametrize("path, value, expected", BAD, ids=[str(c[:2]) for c in BAD])
def test_bad_config_names_the_key(path, value, expected):
    message = _error(_with(path, value))
    for text in expected:
        assert text in message, message


def test_config_must_be_a_mapping():
    assert "config: expected a mapping" in _error(["model"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  layers: [\n loss: quadratic\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML: .*line \d+"):
        load_config(path)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(BASE).replace("learning_rate: 0.1", "learning_rate: 1e-3"))
    assert load_config(path)["optimizer"]["learning_rate"] == 1e-3


OVERRIDES = [
    ("optimizer.learning_rate=0.05", ("optimizer", "learning_rate"), 0.05),
    ("optimizer.learning_rate=5e-2", ("optimizer", "learning_rate"), 0.05),
    ("train.epochs=1", ("train", "epochs"), 1),
    ("data.name=mnist", ("data", "name"), "mnist"),
    ("model.layers.0.features=8", ("model", "layers", 0, "features"), 8),
    ("model.layers[0].kernel=[3, 2]", ("model", "layers", 0, "kernel"), [3, 2]),
    ("model.layers.0.use_bias=false", ("model", "layers", 0, "use_bias"), False),
    ("model.layers.0.padding=same", ("model", "layers", 0, "padding"), "SAME"),
    ("optimizer.schedule={name: cosine, alpha: 0.1}", ("optimizer", "schedule"),
     {"name": "cosine", "alpha": 0.1}),
    ("optimizer.schedule.name=exponential", ("optimizer", "schedule", "decay_rate"), 0.9),
    ("data.limit_train=", ("data", "limit_train"), None),
]


@pytest.mark.parametrize("override, path, expected", OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_override_is_typed(override, path, expected, tmp_path):
    config_path = tmp_path / "c.yaml"
    config_path.write_text(dump_config(BASE))
    node = load_config(config_path, [override]).to_dict()
    for key in path:
        node = node[key]
    assert node == expected and type(node) is type(expected)


def test_overrides_apply_in_order_and_in_place():
    raw = copy.deepcopy(BASE)
    assert apply_override(raw, "train.epochs=3") is raw
    apply_override(raw, "train.epochs=4")
    assert raw["train"] == {"epochs": 4}


@pytest.mark.parametrize("override, expected", [
    ("train.epochs", "expected KEY=VALUE"),
    ("model.layers.9.features=1", "model.layers.9: no item '9' in a list of 4 items"),
    ("loss.name=quadratic", "loss.name: cannot set it, loss holds a str"),
    ("train..epochs=1", "bad key"),
    ("optimizer.learning_rate=[1, 2", "cannot parse value"),
])
def test_bad_override(override, expected):
    with pytest.raises(ConfigError) as info:
        apply_override(copy.deepcopy(BASE), override)
    assert expected in str(info.value)


def test_override_of_an_unknown_key_is_caught_by_validation():
    raw = apply_override(copy.deepcopy(BASE), "optimizer.learning_rat=0.1")
    assert "did you mean 'learning_rate'" in _error(raw)


# ---------------------------------------------------------------- optimizers and schedules

@pytest.fixture
def standard_promotion():
    """optax adds Python floats to int32 step counts, which conftest's strict promotion rejects."""
    with jax.numpy_dtype_promotion("standard"):
        yield


uses_optax = pytest.mark.usefixtures("standard_promotion")

SCHEDULES = [
    {"name": "constant"},
    {"name": "cosine", "alpha": 0.1},
    {"name": "exponential", "decay_rate": 0.5},
    {"name": "warmup_cosine", "warmup_epochs": 1},
    {"name": "piecewise", "boundaries": [1, 2], "scales": [0.5, 0.1]},
]
OPTIMIZERS = ["sgd", "momentum", "nesterov", "adam", "adamw"]


# Every optimizer on the constant schedule and every schedule under sgd: the two are
# independent (optax takes the schedule as the learning rate), so no need for all pairs.
@pytest.mark.parametrize("name, schedule", [(n, SCHEDULES[0]) for n in OPTIMIZERS]
                         + [("sgd", s) for s in SCHEDULES[1:]], ids=str)
@uses_optax
def test_every_optimizer_and_schedule_steps(name, schedule):
    params = {"w": jnp.ones((3,), jnp.float32)}
    opt = make_optimizer(validate_optimizer(
        {"name": name, "learning_rate": 0.1, "schedule": schedule}, 3), steps_per_epoch=4, epochs=3)
    state = opt.init(params)
    for _ in range(3):
        updates, state = opt.update({"w": jnp.ones((3,), jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.float32
    assert bool(jnp.all(params["w"] < 1.0)) and bool(jnp.all(jnp.isfinite(params["w"])))


def _lr(schedule, step, steps_per_epoch=10, epochs=4):
    opt = validate_optimizer({"name": "sgd", "learning_rate": 0.2, "schedule": schedule}, epochs)
    fn = make_schedule(opt, steps_per_epoch, epochs)
    return float(fn(step))


@pytest.mark.parametrize("schedule, step, expected", [
    ({"name": "constant"}, 35, 0.2),
    ({"name": "cosine", "alpha": 0.1}, 0, 0.2),
    ({"name": "cosine", "alpha": 0.1}, 20, 0.11),
    ({"name": "cosine", "alpha": 0.1}, 40, 0.02),
    ({"name": "exponential", "decay_rate": 0.5}, 10, 0.1),
    ({"name": "exponential", "decay_rate": 0.5, "staircase": True}, 19, 0.1),
    ({"name": "warmup_cosine", "warmup_epochs": 1}, 0, 0.0),
    ({"name": "warmup_cosine", "warmup_epochs": 1}, 5, 0.1),
    ({"name": "warmup_cosine", "warmup_epochs": 1}, 10, 0.2),
    ({"name": "warmup_cosine", "warmup_epochs": 1}, 40, 0.0),
    ({"name": "piecewise", "boundaries": [1, 2.5], "scales": [0.5, 0.1]}, 9, 0.2),
    ({"name": "piecewise", "boundaries": [1, 2.5], "scales": [0.5, 0.1]}, 11, 0.1),
    ({"name": "piecewise", "boundaries": [1, 2.5], "scales": [0.5, 0.1]}, 26, 0.01),
], ids=lambda v: str(v))
@uses_optax
def test_schedule_lengths_are_in_epochs(schedule, step, expected):
    assert _lr(schedule, step) == pytest.approx(expected, abs=1e-7)


def _updates(opt_cfg, grads):
    """Updates of successive steps on a scalar parameter 1.0 for the given gradients."""
    opt = make_optimizer(validate_optimizer(opt_cfg, 1), steps_per_epoch=10, epochs=1)
    params = jnp.ones((), jnp.float64)
    state, out = opt.init(params), []
    for g in grads:
        updates, state = opt.update(jnp.asarray(g, jnp.float64), state, params)
        params = optax.apply_updates(params, updates)
        out.append(float(updates))
    return out


@uses_optax
def test_optimizer_hyperparameters_reach_optax():
    assert _updates({"name": "sgd", "learning_rate": 0.5}, [2.0]) == pytest.approx([-1.0])
    assert _updates({"name": "momentum", "learning_rate": 0.1, "momentum": 0.5},
                    [1.0, 1.0]) == pytest.approx([-0.1, -0.15])
    # Nesterov looks ahead: its first step already carries one momentum term.
    assert _updates({"name": "nesterov", "learning_rate": 0.1, "momentum": 0.5},
                    [1.0]) == pytest.approx([-0.15])
    # Adam's first step is lr * sign(g) whatever the size of g.
    assert _updates({"name": "adam", "learning_rate": 0.01}, [123.0]) == pytest.approx([-0.01])
    # AdamW with a zero gradient only decays: -lr * weight_decay * param.
    assert _updates({"name": "adamw", "learning_rate": 0.1, "weight_decay": 0.5},
                    [0.0]) == pytest.approx([-0.05])


def test_optimizer_section_is_validated():
    with pytest.raises(ConfigError, match="optimizer.name.*'adam'"):
        validate_optimizer({"name": "adma", "learning_rate": 0.1}, 1)
    with pytest.raises(ConfigError, match="optimizer.schedule.warmup_epochs"):
        validate_optimizer({"name": "sgd", "learning_rate": 0.1,
                            "schedule": {"name": "warmup_cosine", "warmup_epochs": 2}}, 2)


@uses_optax
def test_jit_of_a_scheduled_update():
    opt = make_optimizer(validate_optimizer(
        {"name": "adam", "learning_rate": 0.1, "schedule": "cosine"}, 2), 5, 2)
    params = np.ones(2, np.float32)
    step = jax.jit(lambda s, p: opt.update(jnp.ones(2, jnp.float32), s, p))
    updates, _ = step(opt.init(params), params)
    assert updates.shape == (2,) and updates.dtype == jnp.float32
