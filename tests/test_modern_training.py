"""Residual blocks, batch norm's running statistics, dropout's keys, augmentation and the
autoencoder target, through `jaxbp.nn`, the config and the CLI on tiny idx fixtures.

The rules themselves are proven in test_norm_dropout.py and test_conv_transpose.py; here
the state and the randomness flow through the train step, evaluation, checkpoints and a
bit-exact resume, and bad hyperparameters are one line.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from idx_fixtures import write_idx_dataset
from jaxbp import layers, nn, reference
from jaxbp.app import checkpoint, report
from jaxbp.app.config import ConfigError, load_config, validate_model
from jaxbp.app.data import Augment, augmented
from jaxbp.app.data.augment import crop, flip
from jaxbp.app.model import build_model, format_summary
from jaxbp.app.steps import step_key
from jaxbp.app.train import build, use_precision
from jaxbp.testing import relative_error
from test_train import run_cli

F64 = jnp.float64

# 28x28 -> conv 4@3x3 s2 -> 14x14 -> residual (conv, bn, relu, conv, bn) -> relu
# -> residual with a strided 1x1 shortcut -> 7x7x8 -> dropout -> global average -> 10.
BLOCK_MODEL = {"layers": [
    {"type": "conv", "features": 4, "kernel": 3, "stride": 2, "padding": "SAME"},
    {"type": "batch_norm"},
    {"type": "relu"},
    {"type": "residual", "layers": [
        {"type": "conv", "features": 4, "kernel": 3, "padding": "SAME", "use_bias": False},
        {"type": "batch_norm"},
        {"type": "relu"},
        {"type": "conv", "features": 4, "kernel": 3, "padding": "SAME", "use_bias": False},
        {"type": "batch_norm", "momentum": 0.8}]},
    {"type": "relu"},
    {"type": "residual",
     "layers": [{"type": "conv", "features": 8, "kernel": 3, "stride": 2, "padding": "SAME"},
                {"type": "batch_norm"}],
     "shortcut": [{"type": "conv", "features": 8, "kernel": 1, "stride": 2}]},
    {"type": "relu"},
    {"type": "dropout", "rate": 0.25},
    {"type": "global_avg_pool"},
    {"type": "dense", "features": 10},
]}


def _write(path, cfg) -> str:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    return str(write_idx_dataset(root / "idx", n_train=256, n_test=128)), str(root / "cache")


@pytest.fixture(scope="module")
def block_config(idx_data, tmp_path_factory) -> str:
    idx, cache = idx_data
    cfg = {"model": BLOCK_MODEL, "loss": "softmax_cross_entropy",
           "optimizer": {"name": "momentum", "learning_rate": 0.05},
           "data": {"name": "mnist", "batch_size": 32, "dir": idx, "data_dir": cache,
                    "augment": {"crop_padding": 2, "flip": True}},
           "train": {"epochs": 1, "seed": 3}}
    return _write(tmp_path_factory.mktemp("cfg") / "blocks.yaml", cfg)


@pytest.fixture(scope="module")
def two_epochs(block_config, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("runs") / "two")
    assert run_cli("train", block_config, "--out", out, "--set", "train.epochs=2") == 0
    return out


def _restored(run_dir: str, config: str):
    cfg = load_config(config)
    model, dtype = build(cfg), use_precision(cfg.train.precision)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dtype=dtype))
    state = jax.eval_shape(lambda: model.init_state(dtype))
    return checkpoint.restore(run_dir, checkpoint.latest_epoch(run_dir), abstract,
                              abstract_model_state=state)


# ---------------------------------------------------------------- residual blocks

def test_fork_adds_the_deltas_of_both_paths():
    x = jnp.asarray([1.0, -2.0, 3.0], F64)
    _, vjp = jax.vjp(layers.fork, x)
    main, shortcut = jnp.asarray([0.5, 1.0, -1.0], F64), jnp.asarray([2.0, 0.0, 4.0], F64)
    np.testing.assert_array_equal(vjp((main, shortcut))[0], [2.5, 1.0, 3.0])
    _, vjp = jax.vjp(layers.add, x, 2 * x)
    assert all(np.array_equal(d, main) for d in vjp(main))


def test_residual_block_hand_gradients_equal_the_reference():
    net = nn.serial(nn.Conv(3, 3, padding="SAME"),
                    nn.residual(nn.serial(nn.Conv(3, 3, padding="SAME"), nn.Tanh(),
                                          nn.Conv(3, 3, padding="SAME"))),
                    nn.residual(nn.serial(nn.Conv(5, 3, stride=2, padding="SAME")),
                                nn.Conv(5, 1, stride=2)),
                    nn.Flatten(), nn.Dense(2))
    _, params = net.init(jax.random.PRNGKey(0), (6, 6, 2), F64)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 6, 2), F64)
    grads = [jax.grad(lambda p, ops=ops: jnp.sum(jnp.sin(net.apply(p, x, ops))))(params)
             for ops in (nn.HAND, nn.REFERENCE)]
    for hand, plain in zip(*map(jax.tree_util.tree_leaves, grads)):
        assert relative_error(hand, plain) <= 1e-10
    jaxpr = str(jax.make_jaxpr(lambda p: net.apply(p, x))(params))
    assert jaxpr.count("custom_vjp_call") >= 2 * 2 + 6, "the forks and sums are hand rules"


def test_identity_shortcut_hands_the_delta_straight_down():
    """y = f(x) + x: δx = δ f'(x) + δ, the second term from the shortcut."""
    block = nn.residual(nn.Tanh())
    x = jnp.asarray([[0.3, -1.2]], F64)
    delta = jnp.asarray([[1.0, 2.0]], F64)
    _, vjp = jax.vjp(lambda v: block.apply({"layers": [{}], "shortcut": []}, v), x)
    expected = delta * (1 - jnp.tanh(x) ** 2) + delta
    assert relative_error(vjp(delta)[0], expected) <= 1e-14


def test_config_residual_summary_and_parameter_paths_agree():
    model = build_model(validate_model(BLOCK_MODEL, "softmax_cross_entropy"),
                        "softmax_cross_entropy", (28, 28, 1), 10)
    paths = {r.path: r for r in model.summary}
    assert paths["3"].type == "residual" and paths["3.layers.3"].type == "conv"
    assert paths["5.shortcut.0"].param_shapes["w"] == (1, 1, 4, 8)
    assert paths["5.shortcut.0"].where == "model.layers[5].shortcut[0]"
    params = model.init(jax.random.PRNGKey(0))
    assert params[5]["shortcut"][0]["w"].shape == (1, 1, 4, 8)
    assert model.init_state()[3]["layers"][1]["var"].shape == (4,)
    text = format_summary(model)
    assert "residual(shortcut: identity)" in text and "residual(shortcut: 1 layers)" in text


@pytest.mark.parametrize("layers_cfg, message", [
    ([{"type": "residual", "layers": [{"type": "conv", "features": 4, "kernel": 3}]},
      {"type": "flatten"}, {"type": "dense", "features": 10}],
     "model.layers[0] (residual): input of shape (28, 28, 1): residual: its layers turn"),
    ([{"type": "residual", "layers": [{"type": "conv", "featurs": 4, "kernel": 3}]}],
     "model.layers[0].layers[0].featurs: unknown key for layer type 'conv'"),
    ([{"type": "residual", "layers": []}], "model.layers[0].layers: expected a non-empty list"),
    ([{"type": "dropout", "rate": 1.0}], "model.layers[0].rate: expected a number in [0, 1)"),
], ids=["paths disagree", "nested typo", "empty block", "dropout rate 1"])
def test_bad_blocks_are_one_line(layers_cfg, message):
    with pytest.raises(ConfigError) as info:
        build_model(validate_model({"layers": layers_cfg}, "softmax_cross_entropy"),
                    "softmax_cross_entropy", (28, 28, 1), 10)
    assert message in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- state and randomness

def test_batch_norm_state_renews_in_training_and_serves_evaluation():
    net = nn.serial(nn.layer("batch_norm", momentum=0.5))
    _, params = net.init(jax.random.PRNGKey(0), (3,), F64)
    state = net.init_state((3,), F64)
    x = jnp.asarray([[1.0, 2.0, 3.0], [3.0, 6.0, -3.0]], F64)
    y, new = net.apply(params, x, train=True, state=state)
    np.testing.assert_allclose(new[0]["mean"], 0.5 * np.mean(np.asarray(x), 0))
    np.testing.assert_allclose(new[0]["var"], 0.5 + 0.5 * np.var(np.asarray(x), 0, ddof=1))
    assert relative_error(y, reference.batch_norm(x, params[0]["scale"],
                                                  params[0]["offset"])) <= 1e-14
    evaluated, same = net.apply(params, x, state=new)
    assert same == new
    mean, var = np.asarray(new[0]["mean"]), np.asarray(new[0]["var"])
    expected = (np.asarray(x) - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(evaluated, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="batch_norm: evaluation .* pass state="):
        net.apply(params, x)


def test_dropout_draws_per_step_keys_and_evaluation_keeps_everything():
    net = nn.layer("dropout", rate=0.5)
    x = jnp.ones((4, 64), F64)
    a, b = (net.apply({}, x, train=True, rng=step_key(0, s)) for s in (0, 1))
    assert not np.array_equal(a, b), "a fresh mask every step"
    np.testing.assert_array_equal(a, net.apply({}, x, train=True, rng=step_key(0, 0)))
    assert set(np.unique(np.asarray(a))) == {0.0, 2.0}
    np.testing.assert_array_equal(net.apply({}, x), x)
    with pytest.raises(ValueError, match="dropout: training draws random numbers"):
        net.apply({}, x, train=True)


# ---------------------------------------------------------------- augmentation

def test_augmentation_is_a_function_of_seed_and_epoch():
    images = np.random.default_rng(0).standard_normal((16, 6, 5, 1)).astype(np.float32)
    labels = np.arange(16)
    augment = Augment(crop_padding=2, flip=True, background=-9.0)

    def run(seed, epoch):
        return [b for b, _ in augmented([(images, labels)] * 2, augment, seed, epoch)]

    first = run(0, 1)
    assert all(np.array_equal(a, b) for a, b in zip(first, run(0, 1)))
    assert not np.array_equal(first[0], run(0, 2)[0])
    assert not np.array_equal(first[0], first[1]), "each batch draws afresh"
    assert first[0].shape == images.shape


def test_crop_takes_its_window_of_the_padded_image_and_flip_mirrors():
    images = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5, 1)
    cropped = crop(images, 1, -1.0, np.array([[0, 2], [1, 0]]))
    padded = np.pad(images, [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=-1.0)
    np.testing.assert_array_equal(cropped[0], padded[0, 0:4, 2:7])
    np.testing.assert_array_equal(cropped[1], padded[1, 1:5, 0:5])
    flipped = flip(images, np.array([True, False]))
    np.testing.assert_array_equal(flipped[0], images[0, :, ::-1])
    np.testing.assert_array_equal(flipped[1], images[1])


def test_a_process_part_is_augmented_as_in_the_whole_batch():
    """A process holding rows 4..11 of a global batch of 16 draws for all 16."""
    images = np.random.default_rng(0).standard_normal((16, 6, 5, 1)).astype(np.float32)
    augment = Augment(crop_padding=2, flip=True, background=-9.0)
    whole = [b for b, _ in augmented([(images, images)] * 2, augment, 0, 1)]
    part = [b for b, _ in augmented([(images[4:12], images[4:12])] * 2, augment, 0, 1,
                                    batch_size=16, rows=slice(4, 12))]
    for w, p in zip(whole, part):
        np.testing.assert_array_equal(p, w[4:12])


# ---------------------------------------------------------------- through the CLI

@pytest.mark.slow
def test_block_model_resumes_bit_exactly(block_config, two_epochs, tmp_path, capsys):
    """Batch norm's statistics, dropout's keys and the augmentation all survive a resume."""
    resumed = str(tmp_path / "resumed")
    assert run_cli("train", block_config, "--out", resumed) == 0
    assert run_cli("train", block_config, "--out", resumed, "--resume",
                   "--set", "train.epochs=2") == 0
    a, b = _restored(resumed, block_config), _restored(two_epochs, block_config)
    assert jax.tree_util.tree_leaves(a.model_state), "the running statistics are saved"
    for x, y in zip(*(jax.tree_util.tree_leaves((r.params, r.model_state)) for r in (a, b))):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    strip = [{k: v for k, v in r.items() if "time" not in k and "second" not in k}
             for r in report.read_metrics(resumed)]
    assert strip == [{k: v for k, v in r.items() if "time" not in k and "second" not in k}
                     for r in report.read_metrics(two_epochs)]
    fresh = jax.eval_shape(lambda: build(load_config(block_config)).init_state())
    moved = [not np.array_equal(s, np.zeros(f.shape)) for s, f in zip(
        jax.tree_util.tree_leaves(a.model_state), jax.tree_util.tree_leaves(fresh))]
    assert any(moved), "training moved the running statistics"


@pytest.mark.slow
def test_eval_uses_the_saved_statistics(block_config, two_epochs, capsys):
    assert run_cli("eval", block_config, "--checkpoint", two_epochs) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.load(open(os.path.join(two_epochs, report.SUMMARY_FILE)))
    assert evaluated["test_accuracy"] == summary["test_accuracy"]
    assert evaluated["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_check_passes_on_the_block_model(block_config, precision, tmp_path, capsys):
    assert run_cli("check", block_config, "--out", tmp_path,
                   "--set", f"train.precision={precision}") == 0
    assert "all gradients agree" in capsys.readouterr().out


@pytest.mark.parametrize("sets, message", [
    (["--set", "model.layers.7.rate=1.5"], "model.layers[7].rate: expected a number in [0, 1)"),
    (["--set", "model.layers.5.shortcut=[]"], "model.layers[5] (residual)"),
    (["--set", "data.augment.crop=2"], "data.augment.crop: unknown key"),
    (["--set", "model.layers.0={type: conv_transpose, features: 4, kernel: 3, stride: 2, "
      "output_padding: 2}"], "output_padding"),
], ids=["dropout rate", "paths disagree", "augment typo", "output_padding >= stride"])
def test_bad_hyperparameters_exit_2_and_touch_nothing(block_config, sets, message, tmp_path,
                                                      capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli("train", block_config, "--out", out, *sets) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxbp: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert os.listdir(out) == ["notes.txt"]


AUTOENCODER = {"layers": [
    {"type": "conv", "features": 4, "kernel": 3, "padding": "SAME"},
    {"type": "relu"},
    {"type": "max_pool", "window": 2},
    {"type": "conv_transpose", "features": 4, "kernel": 2, "stride": 2},
    {"type": "relu"},
    {"type": "conv", "features": 1, "kernel": 3, "padding": "SAME"},
]}


@pytest.mark.slow
def test_autoencoder_reports_reconstruction_error_and_pictures(idx_data, tmp_path, capsys):
    idx, cache = idx_data
    config = _write(tmp_path / "ae.yaml", {
        "model": AUTOENCODER, "loss": "quadratic",
        "optimizer": {"name": "momentum", "learning_rate": 0.0005},
        "data": {"name": "mnist", "batch_size": 32, "dir": idx, "data_dir": cache,
                 "target": "input"},
        "train": {"epochs": 2}})
    out = tmp_path / "run"
    assert run_cli("train", config, "--out", out) == 0
    assert "test reconstruction error" in capsys.readouterr().out
    records = report.read_metrics(out)
    assert set(records[0]) == set(report.metric_keys("reconstruction_error"))
    assert records[1]["test_reconstruction_error"] < records[0]["test_reconstruction_error"]
    assert records[1]["test_reconstruction_error"] < 0.5, "predicting 0 scores about 1"
    summary = json.load(open(out / report.SUMMARY_FILE))
    assert summary["test_reconstruction_error"] == records[1]["test_reconstruction_error"]
    with open(out / report.RECONSTRUCTIONS_FILE, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert run_cli("check", config, "--out", tmp_path / "check") == 0


@pytest.mark.parametrize("loss, layers_cfg, message", [
    ("softmax_cross_entropy", AUTOENCODER["layers"], "loss: softmax_cross_entropy compares"),
    ("quadratic", AUTOENCODER["layers"][:3], "needs the input's shape (28, 28, 1)"),
], ids=["labels loss", "wrong output shape"])
def test_autoencoder_config_errors(loss, layers_cfg, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(validate_model({"layers": layers_cfg}, loss), loss, (28, 28, 1), 10,
                    target="input")


def test_check_measures_a_gradient_zero_by_cancellation_against_the_network():
    """A bias before batch norm has gradient 0 in exact arithmetic: its rounding noise is
    judged against the network's largest gradient, while a real error there still fails."""
    from jaxbp.app.check import compare
    noise = compare("b", [1.3e-8], [-6e-9], 1e-4, network_scale=0.2)
    assert noise["ok"] and noise["scale"] == "network"
    assert not compare("b", [1e-3], [-6e-9], 1e-4, network_scale=0.2)["ok"]
    own = compare("w", [1.0, 2.001], [1.0, 2.0], 1e-4, network_scale=0.2)
    assert own["scale"] == "own" and not own["ok"]
