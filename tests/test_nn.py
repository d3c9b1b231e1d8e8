"""Networks built from configs: shapes, hand rules against the reference, and build errors."""
import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp.testing import relative_error, tolerance
from jaxbp import layers, reference, registry
from jaxbp.app import data
from jaxbp.app.config import ConfigError, load_config, validate_model
from jaxbp.app.model import build_model, format_summary
from jaxbp.initializers import KERNEL_INIT, KERNEL_INITIALIZERS
from jaxbp.nn import HAND, REFERENCE, Conv, Dense, Flatten, MaxPool, Relu, initializer, serial

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
SHIPPED = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def _build(cfg, input_shape=None, num_classes=None):
    name = cfg.data.name
    return build_model(cfg.model, cfg.loss, input_shape or data.input_shape(name),
                       num_classes or data.num_classes(name), cfg.data.target)


def _model(model_cfg, loss, input_shape, num_classes):
    return build_model(validate_model(model_cfg, loss), loss, input_shape, num_classes)


def _layers_model(layer_cfgs, loss="softmax_cross_entropy", input_shape=(28, 28, 1),
                  num_classes=10):
    return _model({"layers": layer_cfgs}, loss, input_shape, num_classes)


def _build_error(layer_cfgs, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        _layers_model(layer_cfgs, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _key(seed=0):
    """An "rbg" key: compiling threefry for every parameter shape would dominate test time."""
    return jax.random.key(seed, impl="rbg")


def _batch(model, dtype, batch=2, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, *model.input_shape), dtype)
    labels = jnp.arange(batch, dtype=jnp.int32) % model.num_classes
    return x, labels


def test_seed002_summary_matches_the_seed():
    model = _build(load_config(os.path.join(CONFIG_DIR, "seed002.yaml")))
    shapes = [row.output_shape for row in model.summary]
    assert shapes == [(24, 24, 3), (24, 24, 3), (12, 12, 3), (432,), (10,), (10,)]
    assert [row.params for row in model.summary] == [3 * 25 + 3, 0, 0, 0, 432 * 10 + 10, 0]


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_config_builds_and_runs_hand_and_reference_alike(path):
    """Forward outputs, loss and every parameter gradient agree in float64 on a tiny batch,
    in training mode (batch statistics, dropout masks from one key)."""
    cfg = load_config(path)
    model = _build(cfg)
    output_shape = (10,) if cfg.data.target == "labels" else model.input_shape
    assert model.summary[-1].output_shape == output_shape
    params = model.init(_key(1), dtype=jnp.float64)
    leaves = jax.tree_util.tree_leaves(params)
    assert sum(leaf.size for leaf in leaves) == sum(row.params for row in model.summary)
    assert all(leaf.dtype == jnp.float64 for leaf in leaves)
    x, labels = _batch(model, jnp.float64)
    state, key = model.init_state(jnp.float64), jax.random.PRNGKey(2)

    @jax.jit
    def run(params, x, labels):
        return {ops.name: (model.apply(params, x, ops, train=True, rng=key, state=state)[0],
                           jax.value_and_grad(model.loss, has_aux=True)(
                               params, x, labels, ops, train=True, rng=key, state=state))
                for ops in (HAND, REFERENCE)}

    results = run(params, x, labels)
    (hand_out, ((hand_loss, _), hand_grads)), (ref_out, ((ref_loss, _), ref_grads)) = (
        results["hand"], results["reference"])
    assert hand_out.shape == (2, *output_shape)
    assert relative_error(hand_out, ref_out) <= 1e-12
    assert relative_error(hand_loss, ref_loss) <= 1e-12
    for got, want in zip(jax.tree_util.tree_leaves(hand_grads),
                         jax.tree_util.tree_leaves(ref_grads)):
        assert relative_error(got, want) <= tolerance(jnp.float64)


def test_hand_ops_run_the_custom_rules_and_reference_ops_do_not():
    model = _build(load_config(os.path.join(CONFIG_DIR, "seed002.yaml")))
    params = jax.eval_shape(model.init, _key())
    x, labels = _batch(model, jnp.float32)

    def jaxpr(ops):
        return str(jax.make_jaxpr(lambda p: model.loss(p, x, labels, ops))(params))

    assert jaxpr(HAND).count("custom_vjp_call") >= 6  # conv, sigmoid, pool, flatten, dense, ...
    assert "custom_vjp_call" not in jaxpr(REFERENCE)


def test_ops_pick_the_hand_rule_or_the_twin_of_each_primitive():
    conv, quadratic = registry.get("conv"), registry.get("quadratic", "loss")
    assert HAND.of(conv) is layers.conv and REFERENCE.of(conv) is reference.conv
    assert REFERENCE.of(quadratic) is reference.quadratic
    assert HAND.of(quadratic) is not reference.quadratic
    assert {HAND: 1, REFERENCE: 2}[HAND] == 1  # hashable: usable as a static jit argument
    swapped = REFERENCE.replace("mine", conv=layers.conv)
    assert swapped.of(conv) is layers.conv and swapped.of(quadratic) is reference.quadratic


def test_init_dtype_and_jit_with_static_ops():
    model = _layers_model([{"type": "conv", "features": 2, "kernel": 3}, {"type": "flatten"},
                           {"type": "dense", "features": 10}], input_shape=(6, 6, 1))
    params = model.init(_key())
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    x, labels = _batch(model, jnp.float32)
    loss, _ = jax.jit(model.loss, static_argnames="ops")(params, x, labels, ops=HAND)
    assert loss.dtype == jnp.float32 and loss.shape == ()


def test_quadratic_loss_uses_one_hot_targets():
    model = _layers_model([{"type": "flatten"}, {"type": "dense", "features": 3},
                           {"type": "sigmoid"}], loss="quadratic", input_shape=(2, 2, 1),
                          num_classes=3)
    params = model.init(_key(), dtype=jnp.float64)
    x, labels = _batch(model, jnp.float64, batch=3)
    out = np.asarray(model.apply(params, x))
    expected = 0.5 * np.sum((out - np.eye(3)[np.asarray(labels)]) ** 2) / 3
    loss, (outputs, _) = model.loss(params, x, labels)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(outputs, out)


def test_input_shape_reshapes_examples():
    model = _layers_model([{"type": "conv", "features": 2, "kernel": 5, "stride": 5},
                           {"type": "flatten"}, {"type": "dense", "features": 10}],
                          input_shape=(5, 5, 1))
    assert model.summary[0].output_shape == (1, 1, 2)
    flat = _model({"input_shape": [25, 1], "layers": [
        {"type": "conv", "features": 2, "kernel": 5, "stride": 5}, {"type": "flatten"},
        {"type": "dense", "features": 10}]}, "softmax_cross_entropy", (5, 5, 1), 10)
    assert flat.input_shape == (25, 1) and flat.summary[0].output_shape == (5, 2)
    params = flat.init(_key())
    assert flat.apply(params, jnp.ones((3, 5, 5, 1), jnp.float32)).shape == (3, 10)


def test_int_padding_pads_both_sides_like_pytorch():
    def model(padding):
        return _layers_model([{"type": "conv", "features": 2, "kernel": 3, "stride": 2,
                               "padding": padding}, {"type": "flatten"},
                              {"type": "dense", "features": 10}], input_shape=(7, 1))
    by_int, by_pairs = model(1), model([[1, 1]])
    assert by_int.summary[0].output_shape == (4, 2)
    params = by_int.init(_key())
    x, _ = _batch(by_int, jnp.float32)
    np.testing.assert_array_equal(by_int.apply(params, x), by_pairs.apply(params, x))


def test_summary_table():
    model = _build(load_config(os.path.join(CONFIG_DIR, "lenet5.yaml")))
    text = format_summary(model)
    assert "conv(features=32, kernel=3, padding=SAME)" in text
    assert "(28, 28, 32)" in text and "(7, 7, 64)" in text and "(3136,)" in text
    total = sum(row.params for row in model.summary)
    assert f"total parameters: {total:,}" in text
    assert len(text.splitlines()) == len(model.summary) + 4


def test_kernel_larger_than_its_input_names_the_layer():
    message = _build_error([{"type": "conv", "features": 3, "kernel": 5}, {"type": "flatten"},
                            {"type": "dense", "features": 10}], input_shape=(4, 4, 1))
    assert message.startswith("model.layers[0] (conv): input of shape (4, 4, 1)")
    assert "does not fit" in message


def test_kernel_that_stops_fitting_deeper_in_names_that_layer():
    message = _build_error([
        {"type": "conv", "features": 3, "kernel": 5},  # 24x24
        {"type": "max_pool", "window": 2},             # 12x12
        {"type": "max_pool", "window": 2},             # 6x6
        {"type": "max_pool", "window": 2},             # 3x3
        {"type": "conv", "features": 3, "kernel": 5},
        {"type": "flatten"}, {"type": "dense", "features": 10}])
    assert message.startswith("model.layers[4] (conv): input of shape (3, 3, 3)")


@pytest.mark.parametrize("layer_cfgs, expected", [
    ([{"type": "dense", "features": 10}], ["model.layers[0] (dense)", "flatten"]),
    ([{"type": "conv", "features": 4, "kernel": 3, "groups": 2}, {"type": "flatten"},
      {"type": "dense", "features": 10}], ["model.layers[0] (conv)", "groups"]),
    ([{"type": "conv", "features": 4, "kernel": [3, 3, 3]}, {"type": "flatten"},
      {"type": "dense", "features": 10}], ["model.layers[0] (conv)", "kernel"]),
    ([{"type": "conv", "features": 4, "kernel": 3}, {"type": "channel_max", "group_size": 3},
      {"type": "flatten"}, {"type": "dense", "features": 10}],
     ["model.layers[1] (channel_max)"]),
    ([{"type": "max_pool", "window": 30}, {"type": "flatten"},
      {"type": "dense", "features": 10}], ["model.layers[0] (max_pool)"]),
    ([{"type": "flatten"}, {"type": "dense", "features": 12}],
     ["model.layers[1] (dense)", "(12,)", "10 classes"]),
    ([{"type": "conv", "features": 10, "kernel": 28}],
     ["model.layers[0] (conv)", "(1, 1, 10)", "10 classes"]),
    ([{"type": "flatten"}, {"type": "dense", "features": 10}, {"type": "softmax"}],
     ["model.layers[2] (softmax)", "softmax_cross_entropy"]),
    ([{"type": "flatten"}, {"type": "dense", "features": 10, "kernel_init": "bogus"}],
     ["model.layers[1].kernel_init.name"]),
], ids=lambda v: str(v[0]) if isinstance(v, list) and isinstance(v[0], str) else None)
def test_build_errors_name_the_layer(layer_cfgs, expected):
    message = _build_error(layer_cfgs)
    for text in expected:
        assert text in message, message


def test_input_shape_of_another_size_is_rejected():
    with pytest.raises(ConfigError, match=r"^model.input_shape: \[100\] holds 100 values"):
        _model({"input_shape": [100], "layers": [{"type": "flatten"},
                                                 {"type": "dense", "features": 10}]},
               "quadratic", (28, 28, 1), 10)


def test_stax_style_layers_compose_directly():
    init, apply = serial(Conv(4, 3, padding="SAME"), Relu(), MaxPool(2), Flatten(), Dense(5))
    out_shape, params = init(_key(), (8, 8, 2), jnp.float64)
    assert out_shape == (5,)
    assert [sorted(p) for p in params] == [["b", "w"], [], [], [], ["b", "w"]]
    assert params[0]["w"].shape == (3, 3, 2, 4) and params[4]["w"].shape == (64, 5)
    x = jnp.ones((3, 8, 8, 2), jnp.float64)
    both = jax.jit(lambda p, x: (apply(p, x, HAND), apply(p, x, REFERENCE)))(params, x)
    assert both[1].shape == (3, 5)
    np.testing.assert_allclose(*both, rtol=1e-12)


def test_conv_without_bias_has_no_bias_parameter():
    model = _layers_model([{"type": "conv", "features": 2, "kernel": 3, "use_bias": False},
                           {"type": "flatten"}, {"type": "dense", "features": 10}],
                          input_shape=(5, 5, 1))
    params = model.init(_key())
    assert sorted(params[0]) == ["w"] and model.summary[0].params == 18


def test_initialisers_from_config():
    model = _layers_model([{"type": "flatten"}, {"type": "dense", "features": 10,
                            "kernel_init": {"name": "constant", "value": 0.5},
                            "bias_init": {"name": "normal", "stddev": 2.0}}],
                          input_shape=(200, 1))
    params = model.init(_key(), dtype=jnp.float64)
    assert bool(jnp.all(params[1]["w"] == 0.5))
    assert 1.0 < float(jnp.std(params[1]["b"])) < 4.0
    fan_in = _layers_model([{"type": "flatten"}, {"type": "dense", "features": 10,
                             "kernel_init": "he_normal"}], input_shape=(20000, 1))
    w = fan_in.init(_key())[1]["w"]
    assert float(jnp.std(w)) == pytest.approx(math.sqrt(2 / 20000), rel=0.05)


def test_every_layer_type_builds_and_runs_alike_through_both_ops():
    layer_cfgs = [
        {"type": "conv", "features": 4, "kernel": [3, 2], "padding": "SAME", "dilation": 2},
        {"type": "conv_transpose", "features": 4, "kernel": 2, "stride": 2, "padding": 3,
         "output_padding": 1},
        {"type": "leaky_relu", "negative_slope": 0.1},
        {"type": "avg_pool", "window": 2, "stride": 1},
        {"type": "channel_max", "group_size": 2},
        {"type": "tanh"},
        {"type": "max_pool", "window": 2},
        {"type": "relu"},
        {"type": "upsample", "factor": [2, 1]},
        {"type": "flatten"},
        {"type": "batch_norm"},
        {"type": "dropout", "rate": 0.3},
        {"type": "dense", "features": 3},
        {"type": "layer_norm"},
        {"type": "sigmoid"},
        {"type": "softmax"},
    ]
    builtin = {n for n in registry.layer_names() if registry.get(n).module == "jaxbp.builtins"}
    # global_avg_pool would take flatten's place: tests/test_blocks.py builds it in a config.
    assert builtin - {c["type"] for c in layer_cfgs} == {"global_avg_pool"}
    model = _layers_model(layer_cfgs, loss="quadratic", input_shape=(5, 5, 2), num_classes=3)
    assert [r.output_shape for r in model.summary[:7]] == [
        (5, 5, 4), (5, 5, 4), (5, 5, 4), (4, 4, 4), (4, 4, 2), (4, 4, 2), (2, 2, 2)]
    params = model.init(_key(), dtype=jnp.float64)
    x, _ = _batch(model, jnp.float64)
    state = model.init_state(jnp.float64)
    run = jax.jit(lambda p, x, ops: model.apply(p, x, ops, train=True,
                                                rng=jax.random.PRNGKey(3), state=state),
                  static_argnums=2)
    (hand, hand_state), (ref, ref_state) = run(params, x, HAND), run(params, x, REFERENCE)
    assert relative_error(hand, ref) <= 1e-12
    for got, want in zip(*map(jax.tree_util.tree_leaves, (hand_state, ref_state))):
        assert relative_error(got, want) <= 1e-12


@pytest.mark.parametrize("name", sorted(KERNEL_INITIALIZERS))
def test_every_configurable_initialiser_exists(name):
    spec = KERNEL_INIT.fn("init", name)
    out = jax.eval_shape(lambda k: initializer(spec)(k, (3, 4), jnp.float32), _key())
    assert out.shape == (3, 4) and out.dtype == jnp.float32
