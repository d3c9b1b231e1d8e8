"""The one registry: a layer registered once works in jaxbp.nn, as a config type, in
`jaxbp check`'s comparison and in the benchmark; the library floor imports no app."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp import nn, registry
from jaxbp.app.config import validate_model
from jaxbp.app.model import build_model
from jaxbp.initializers import initializer
from jaxbp.registry import HAND, REFERENCE, RegistryError
from jaxbp.schema import POSITIVE, REQUIRED, ConfigError


def scale(x, s, *, offset=0.0):
    """y = x * s + offset with a per-channel scale s; dx = delta * s, ds = sum(delta * x)."""
    return _scaled(offset)(x, s)


def _per_channel(s, x):
    return s.reshape((1,) * (x.ndim - 1) + s.shape)


def _scaled(offset):
    @jax.custom_vjp
    def rule(x, s):
        return plain_scale(x, s, offset=offset)

    def fwd(x, s):
        return plain_scale(x, s, offset=offset), (x, s)

    def bwd(residuals, delta):
        x, s = residuals
        return delta * _per_channel(s, x), jnp.sum(delta * x, axis=tuple(range(x.ndim - 1)))

    rule.defvjp(fwd, bwd)
    return rule


def plain_scale(x, s, *, offset=0.0):
    return x * _per_channel(s, x) + offset


def scale_init(rng, input_shape, dtype, *, init_value=1.0):
    return jnp.full((input_shape[-1],), init_value, dtype)


@pytest.fixture(scope="module")
def scale_layer():
    primitive = jaxbp.register_layer("test_scale", hand=scale, reference=plain_scale,
                                     params={"s": scale_init}, checks={"init_value": POSITIVE})
    yield primitive
    registry.unregister("test_scale")


def test_hyperparameters_come_from_the_signatures(scale_layer):
    schema = scale_layer.hyperparameters
    assert list(schema) == ["init_value", "offset"]
    assert schema["init_value"].default == 1.0 and schema["offset"].default == 0.0
    conv = registry.get("conv").hyperparameters
    assert conv["features"].default is REQUIRED and conv["stride"].default == 1
    assert {"features", "kernel", "stride", "padding", "dilation", "groups", "use_bias",
            "kernel_init", "bias_init"} == set(conv)


def test_a_registered_layer_works_in_nn_and_in_a_config(scale_layer):
    layer = nn.layer("test_scale", init_value=2.0, offset=0.5)
    shape, params = layer.init(jax.random.PRNGKey(0), (3, 4))
    assert shape == (3, 4) and params["s"].tolist() == [2.0] * 4
    x = jnp.arange(24.0, dtype=jnp.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(layer.apply(params, x, HAND), layer.apply(params, x, REFERENCE))
    model = build_model(validate_model({"layers": [
        {"type": "test_scale", "offset": 1.0}, {"type": "flatten"},
        {"type": "dense", "features": 10}]}, "softmax_cross_entropy"), "softmax_cross_entropy",
        (3, 4), 10)
    assert model.summary[0].layer == "test_scale(offset=1.0)"
    params = model.init(jax.random.PRNGKey(1))
    labels = jnp.arange(2) % 10
    grads = {ops.name: jax.grad(lambda p: model.loss(p, x, labels, ops)[0])(params)
             for ops in (HAND, REFERENCE)}
    np.testing.assert_allclose(grads["hand"][0]["s"], grads["reference"][0]["s"], rtol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda p: model.loss(p, x, labels, HAND))(params))
    assert "custom_vjp_call" in jaxpr


@pytest.mark.parametrize("kwargs, message", [
    (dict(init_vlue=2.0), "test_scale.init_vlue: unknown key for layer 'test_scale'; did you "
                          "mean 'init_value'?"),
    (dict(init_value=-1.0), "test_scale.init_value: expected a number > 0"),
])
def test_bad_hyperparameters_are_one_line(scale_layer, kwargs, message):
    with pytest.raises(ConfigError) as info:
        nn.layer("test_scale", **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_hyperparameter_and_unknown_layer_in_a_config(scale_layer):
    with pytest.raises(ConfigError, match=r"model.layers\[0\].features: missing"):
        validate_model({"layers": [{"type": "dense"}]}, "quadratic")
    with pytest.raises(ConfigError, match=r"unknown layer type 'test_scael'; did you mean "
                                          r"'test_scale'\?"):
        validate_model({"layers": [{"type": "test_scael"}]}, "quadratic")


def test_positional_hyperparameters_are_the_required_ones_in_order():
    layer = nn.Conv(4, 3, padding=1)
    shape, params = layer.init(jax.random.PRNGKey(0), (6, 6, 2))
    assert shape == (6, 6, 4) and params["w"].shape == (3, 3, 2, 4)
    with pytest.raises(ValueError, match="conv: takes 2 positional hyperparameters"):
        nn.Conv(4, 3, 1)
    with pytest.raises(ValueError, match="features given both by position and by name"):
        nn.Conv(4, 3, features=5)


def test_layers_take_int_padding_as_nn_does():
    x, w = jnp.ones((1, 5, 5, 2), jnp.float32), jnp.ones((3, 3, 2, 4), jnp.float32)
    by_int = jaxbp.layers.conv(x, w, padding=1)
    np.testing.assert_array_equal(by_int, jaxbp.layers.conv(x, w, padding=((1, 1), (1, 1))))
    np.testing.assert_array_equal(by_int, jaxbp.reference.conv(x, w, padding=1))
    pooled = jaxbp.layers.max_pool(x, 3, stride=1, padding=1)
    assert pooled.shape == (1, 5, 5, 2)
    with pytest.raises(ValueError, match="conv: padding must be >= 0, got -1"):
        jaxbp.layers.conv(x, w, padding=-1)


def test_a_name_taken_by_another_module_is_refused():
    with pytest.raises(RegistryError, match="layer 'relu' is already registered by "
                                            "jaxbp.builtins"):
        jaxbp.register_layer("relu", hand=jnp.tanh, reference=jnp.tanh)
    assert registry.get("relu").hand is jaxbp.layers.relu


def test_the_same_module_registering_again_replaces_its_own():
    first = jaxbp.register_layer("test_again", hand=jaxbp.layers.tanh,
                                 reference=jaxbp.reference.tanh)
    second = jaxbp.register_layer("test_again", hand=jaxbp.layers.sigmoid,
                                  reference=jaxbp.reference.sigmoid)
    try:
        assert registry.get("test_again") is second is not first
    finally:
        registry.unregister("test_again")


def test_signatures_that_disagree_are_refused():
    def hand(x, w, *, groups=2):
        return x

    def init(rng, input_shape, dtype, *, groups=1):
        return jnp.zeros(())

    with pytest.raises(RegistryError, match="'groups' defaults to 2 here but to 1"):
        jaxbp.register_layer("test_disagree", hand=hand, reference=hand, params={"w": init})
    with pytest.raises(RegistryError, match="checks name stride, which no signature takes"):
        jaxbp.register_layer("test_disagree", hand=hand, reference=hand,
                             checks={"stride": POSITIVE})


def test_benchmark_hooks_come_from_the_registration():
    conv = registry.get("conv")
    assert conv.flops((6, 6, 2), (4, 4, 8), {"w": (3, 3, 2, 8), "b": (8,)}) == 4 * 4 * 8 * 18
    assert registry.get("channel_max").torch is None and registry.get("relu").torch is not None


def test_initializer_accepts_functions_names_and_specs():
    key = jax.random.PRNGKey(0)
    assert initializer(jax.nn.initializers.ones)(key, (2,), jnp.float32).tolist() == [1, 1]
    assert initializer("ones")(key, (2,), jnp.float32).tolist() == [1, 1]
    assert initializer({"name": "constant", "value": 3.0})(key, (1,), jnp.float32).tolist() == [3]


def test_the_library_floor_imports_no_app():
    """`import jaxbp.layers` and `import jaxbp.nn` load neither TFDS nor the CLI's config."""
    code = ("import sys, jaxbp.layers, jaxbp.nn, jaxbp.registry;"
            "bad = [m for m in sys.modules if m.startswith(('tensorflow_datasets', 'jaxbp.app',"
            " 'yaml', 'orbax'))]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, JAXBP_TUNING="0"))
    assert done.returncode == 0, done.stdout + done.stderr
