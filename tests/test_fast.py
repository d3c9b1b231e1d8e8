"""jaxbp.fast: the one hook choosing the hand rules' formulations, and where they run.

The formulations themselves are proven against the reference in tests/test_conv.py and
tests/test_pooling.py, each forced by name; here: the hook's names, errors and scoping, and
that a formulation measured on the CPU is compiled only for the CPU.
"""
import functools

import jax
import jax.numpy as jnp
import pytest

from jaxbp import fast, layers
from jaxbp.reference.conv import conv_geometry

# classic LeNet-5's second layer (the band input delta) and first layer (the taps forward)
SECOND = (jnp.zeros((2, 14, 14, 6)), jnp.zeros((5, 5, 6, 16)), jnp.zeros(16))
FIRST = (jnp.zeros((2, 28, 28, 1)), jnp.zeros((5, 5, 1, 6)))


def _forward(x, w):
    return layers.conv(x, w, padding="SAME")


def _full_grad(x, w, b):
    return jax.grad(lambda *a: jnp.sum(layers.conv(*a) ** 2), (0, 1, 2))(x, w, b)


def _ops(text):
    """(XLA convolutions, matmuls) in a StableHLO text."""
    return text.count("stablehlo.convolution"), text.count("stablehlo.dot_general")


def _lowered(fn, args, platform=None):
    traced = jax.jit(fn).trace(*args)
    return (traced.lower() if platform is None
            else traced.lower(lowering_platforms=(platform,))).as_text()


def test_every_slot_names_plain_first():
    assert fast.names("conv.forward") == ("plain", "taps", "padded")
    assert fast.names("conv.input_delta") == ("plain", "band")
    assert fast.names("conv.kernel_grad") == ("plain", "band")
    assert fast.names("conv.bias_grad") == ("plain", "rows")
    assert fast.names("pool.spread") == ("plain", "tiled")
    assert set(fast.SLOTS) == {"conv.forward", "conv.input_delta", "conv.kernel_grad",
                               "conv.bias_grad", "pool.spread"}


@pytest.mark.parametrize("choices,message", [
    ({"conv.backward": "band"}, r"^jaxbp.fast.use: unknown slot 'conv.backward'; the slots are "
                                r"conv.forward, conv.input_delta, .*pool.spread$"),
    ({"conv.input_delta": "banded"}, r"^jaxbp.fast.use: conv.input_delta has no formulation "
                                     r"'banded'; its formulations are 'plain', 'band'$"),
])
def test_use_rejects_unknown_slots_and_names(choices, message):
    with pytest.raises(ValueError, match=message):
        with fast.use(choices):
            pass


def test_a_forced_formulation_that_does_not_apply_is_rejected_at_the_call():
    x, w, _ = SECOND
    with fast.use({"conv.input_delta": "band"}):
        with pytest.raises(ValueError, match=r"conv.input_delta='band' does not apply to shapes "
                                             r"\(2, 14, 14, 6\), \(5, 5, 6, 16\), ConvGeometry"
                                             r".*needs stride 1, dilation 1 and groups 1; what "
                                             r"applies here: 'plain'$"):
            layers.conv(x, w, stride=2)


def test_use_nests_and_restores():
    shapes = (SECOND[0].shape, SECOND[1].shape)
    geometry = conv_geometry("conv", None, *SECOND[:2], None, 1, "VALID", 1, 1)
    assert fast.chosen("conv.input_delta", *shapes, geometry) == "band"
    with fast.use({"conv.input_delta": "plain", "conv.forward": "taps"}):
        assert fast.chosen("conv.input_delta", *shapes, geometry) == "plain"
        with fast.use({"conv.input_delta": "band"}):
            assert fast.chosen("conv.input_delta", *shapes, geometry) == "band"
            assert fast.chosen("conv.forward", *shapes, geometry) == "taps"
        assert fast.chosen("conv.input_delta", *shapes, geometry) == "plain"
    assert fast.chosen("conv.forward", *shapes, geometry) == "padded"


def test_use_reaches_a_function_jitted_before_it():
    """jit caches traces by function and shapes; `use` clears them on the way in and out."""
    jitted = jax.jit(_forward)
    assert _ops(jitted.lower(*FIRST).as_text()) == (0, 25)   # taps, selected
    with fast.use({"conv.forward": "plain"}):
        assert _ops(jitted.lower(*FIRST).as_text()) == (1, 0)
    assert _ops(jitted.lower(*FIRST).as_text()) == (0, 25)


def test_the_choice_is_a_static_argument_of_the_rule():
    def custom_vjp_params(fn, args):
        (eqn,) = [e for e in jax.make_jaxpr(fn)(*args).eqns if "custom_vjp" in str(e.primitive)]
        return str(eqn)

    chosen = custom_vjp_params(_forward, FIRST)
    with fast.use({"conv.forward": "plain"}):
        forced = custom_vjp_params(_forward, FIRST)
    assert chosen != forced


# ---------------------------------------------------------------- where the formulations run

def test_cpu_formulations_compile_for_the_cpu_only():
    """The band input delta (CPU-measured) is in the CPU lowering; lowered for CUDA, the same
    jitted gradient has XLA's three convolutions and no matmul."""
    assert _ops(_lowered(_full_grad, SECOND)) == (2, 1)   # forward, kernel grad; the band
    assert _ops(_lowered(_full_grad, SECOND, "cuda")) == (3, 0)
    assert _ops(_lowered(_forward, FIRST)) == (0, 25)     # the taps, one product each
    assert _ops(_lowered(_forward, FIRST, "cuda")) == (1, 0)


def test_a_forced_formulation_compiles_for_every_platform():
    with fast.use({"conv.forward": "taps"}):
        assert _ops(_lowered(_forward, FIRST, "cuda")) == (0, 25)


def test_the_cpu_program_keeps_no_conditional():
    """platform_dependent lowers to the CPU branch alone: nothing for XLA to branch on."""
    compiled = jax.jit(_full_grad).lower(*SECOND).compile().as_text()
    assert " convolution(" in compiled and " conditional(" not in compiled


def test_the_tiled_spread_is_not_platform_dependent():
    """Measured on no threshold, it runs wherever the windows tile."""
    pool = functools.partial(layers.max_pool, window=2)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(pool(x))))(jnp.zeros((1, 4, 4, 1))))
    assert "platform_index" not in jaxpr

