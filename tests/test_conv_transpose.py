"""conv_transpose, the exact adjoint of conv (jaxbp/layers/DERIVATIONS.md §10): the adjoint
identity, its hand rule against jax.grad of its plain twin, PyTorch's sizes and definition,
bad input, and the registered layer."""
import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradcheck import assert_matches_reference, random_inputs
from jaxbp import layers, nn, reference, registry, torch_twins
from jaxbp.app.config import validate_model
from jaxbp.app.model import build_model
from jaxbp.registry import HAND, REFERENCE
from jaxbp.testing import CheckOptions, check_rule, relative_error

F64 = jnp.float64


# ---------------------------------------------------------------- generated grid

CHANNELS = [  # (groups, in_ch, out_ch): in_ch is the result's, out_ch y's (the conv's output)
    (1, 1, 1), (1, 2, 3), (1, 3, 2), (2, 2, 2), (2, 4, 2), (2, 2, 4)]


def _case(rng, rank, stride, padding_kind):
    dilation = rng.choice((1, 2))
    kernel = tuple(rng.choice((1, 2, 3)) for _ in range(rank))
    windows = [(k - 1) * dilation + 1 for k in kernel]
    if padding_kind == "int":
        padding = rng.randint(1, 2)
        pairs = [(padding, padding)] * rank
    elif padding_kind == "pairs":  # axis 0 asymmetric; a pad may exceed the window
        pairs = [(rng.randint(0, 2), rng.randint(0, 1)) for _ in range(rank)]
        pairs[0] = (pairs[0][0], pairs[0][0] + 1)
        padding = tuple(pairs)
    else:
        padding, pairs = padding_kind, [(0, 0)] * rank  # SAME never leaves an output empty
    # y large enough that some output is left: (n - 1) * s + k_eff - lo - hi >= 1
    spatial = tuple(max(rng.randint(1, 4 - (rank == 3)), -(-(lo + hi + 1 - w) // stride) + 1)
                    for w, (lo, hi) in zip(windows, pairs))
    # output_padding below the stride or the dilation; SAME settles its own
    extra = 0 if padding_kind == "SAME" else rng.randint(0, max(stride, dilation) - 1)
    groups, in_ch, out_ch = rng.choice(CHANNELS)
    return dict(batch=rng.choice((1, 2)), spatial=spatial, kernel=kernel, in_ch=in_ch,
                out_ch=out_ch, bias=rng.random() < 0.6,
                kwargs=dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                            output_padding=extra))


PADDING_KINDS = ("VALID", "SAME", "int", "pairs")


def _grid():
    """Two thirds of rank x stride x padding kind, so that every stride meets every padding
    kind in two ranks and every rank meets each in two or three strides (compile time is the
    budget); dilation, groups and output_padding drawn."""
    rng = random.Random(1)
    return [_case(rng, rank, stride, kind) for rank in (1, 2, 3) for stride in (1, 2, 3)
            for i, kind in enumerate(PADDING_KINDS) if (rank + stride + i) % 3]


GRID = _grid()


def _case_id(case):
    kw = case["kwargs"]
    pad = kw["padding"]
    pad = pad if isinstance(pad, str) else f"p{pad}" if isinstance(pad, int) else "P" + "".join(
        f"{lo}{hi}" for lo, hi in pad)
    return (f"n{case['batch']}-y{'x'.join(map(str, case['spatial']))}"
            f"-k{'x'.join(map(str, case['kernel']))}-c{case['out_ch']}to{case['in_ch']}"
            f"-s{kw['stride']}-{pad}-d{kw['dilation']}-g{kw['groups']}-op{kw['output_padding']}"
            f"{'-bias' if case['bias'] else ''}")


def _inputs(case, seed, dtype=F64):
    """y, w, b of the case (b None without bias)."""
    w_shape = (*case["kernel"], case["in_ch"] // case["kwargs"]["groups"], case["out_ch"])
    y, w, b = random_inputs(seed, [(case["batch"], *case["spatial"], case["out_ch"]), w_shape,
                                   (case["in_ch"],)], dtype)
    return y, w, (b if case["bias"] else None)


def test_grid_covers_the_required_features():
    def having(pred):
        return sum(1 for c in GRID if pred(c))

    def kind(c):
        padding = c["kwargs"]["padding"]
        return padding if isinstance(padding, str) else type(padding).__name__

    kw = [c["kwargs"] for c in GRID]
    assert len(GRID) == 24
    assert {(c["kwargs"]["stride"], kind(c)) for c in GRID} == {
        (s, k) for s in (1, 2, 3) for k in ("VALID", "SAME", "int", "tuple")}
    assert {(len(c["spatial"]), kind(c)) for c in GRID} == {
        (r, k) for r in (1, 2, 3) for k in ("VALID", "SAME", "int", "tuple")}
    assert {k["stride"] for k in kw} == {1, 2, 3} and {k["dilation"] for k in kw} == {1, 2}
    assert {k["groups"] for k in kw} == {1, 2}
    assert having(lambda c: c["kwargs"]["output_padding"] > 0) >= 6
    assert having(lambda c: c["kwargs"]["output_padding"] >= c["kwargs"]["stride"]), \
        "an output_padding of a stride or more, allowed below the dilation"
    assert having(lambda c: c["batch"] == 1) and having(lambda c: c["batch"] > 1)
    assert having(lambda c: c["bias"]) and having(lambda c: not c["bias"])
    assert having(lambda c: isinstance(c["kwargs"]["padding"], tuple) and any(
        lo > (k - 1) * c["kwargs"]["dilation"]
        for (lo, _), k in zip(c["kwargs"]["padding"], c["kernel"]))), "pad wider than window"
    assert max(max(c["spatial"]) for c in GRID) <= 7


def _conv_onto(y_shape, w, kwargs):
    """x -> conv(x, w) on y's positions: the conv conv_transpose(·, w, **kwargs) is the adjoint
    of. An output_padding of a stride or more lets conv reach positions past y's; they are
    dropped (§10), and only then."""
    conv_kwargs = {k: v for k, v in kwargs.items() if k != "output_padding"}
    crop = tuple(slice(0, n) for n in y_shape[:-1])

    def conv_on(x):
        y = reference.conv(x, w, **conv_kwargs)
        stride = np.broadcast_to(kwargs["stride"], len(y_shape) - 2)
        extra = np.broadcast_to(kwargs["output_padding"], len(y_shape) - 2)
        assert (y.shape == tuple(y_shape)) == all(extra < stride)
        return y[crop]
    return conv_on


@pytest.mark.parametrize("seed,case", list(enumerate(GRID)), ids=[_case_id(c) for c in GRID])
def test_adjoint_of_conv_and_rule_match_reference(seed, case):
    """<conv(x, w), y> = <x, conv_transpose(y, w)> to 1e-12 of |conv(x)| |y|;
    conv_transpose(y, w) is jax.vjp of the plain conv in x; the hand rule's forward and VJP
    match the plain twin's (gradcheck.assert_matches_reference)."""
    y, w, b = _inputs(case, seed)
    kwargs = case["kwargs"]
    z = jax.jit(functools.partial(layers.conv_transpose, **kwargs))(y, w)
    (x,) = random_inputs(100 + seed, [z.shape], F64)
    conv_on, pullback = jax.vjp(_conv_onto(y.shape, w, kwargs), x)
    left, right = jnp.vdot(conv_on, y), jnp.vdot(x, z)
    assert abs(left - right) <= 1e-12 * jnp.linalg.norm(conv_on) * jnp.linalg.norm(y)
    assert relative_error(z, pullback(y)[0]) <= 1e-12

    args, argnums = ((y, w, b), (0, 1, 2)) if b is not None else ((y, w), (0, 1))
    assert_matches_reference(jax.jit(functools.partial(layers.conv_transpose, **kwargs)),
                             jax.jit(functools.partial(reference.conv_transpose, **kwargs)),
                             args, argnums)


# ---------------------------------------------------------------- the full check

FULL = [  # (y shape, w shape, kwargs): one per rank, then everything at once
    ((2, 4, 2), (3, 3, 2), dict(stride=2, padding=((1, 0),), output_padding=1)),
    ((1, 3, 2, 2), (2, 3, 1, 2), dict(stride=(1, 2), padding="SAME", dilation=(2, 1))),
    ((1, 2, 3, 2, 2), (2, 1, 2, 2, 2), dict(stride=(2, 1, 1), padding=1)),
    ((2, 3, 4, 4), (2, 2, 2, 4), dict(stride=(3, 2), padding=((2, 1), (0, 1)), dilation=(1, 3),
                                      groups=2, output_padding=(2, 2))),
]


@pytest.mark.parametrize("y_shape,w_shape,kwargs", FULL,
                         ids=["1d", "2d-same", "3d", "strided-dilated-grouped-op"])
def test_full_check_rule(y_shape, w_shape, kwargs):
    """check_rule in full: finite differences, grad-of-grad, jit and vmap (output_padding 2
    with stride 2 on the last case: the one that only the dilation allows)."""
    report = check_rule(layers.conv_transpose, reference.conv_transpose, y_shape, w_shape,
                        (w_shape[-2] * kwargs.get("groups", 1),), **kwargs)
    assert len(report.second_order_errors) == 3 and report.residual_bytes == 0


def test_check_rule_in_float32():
    check_rule(layers.conv_transpose, reference.conv_transpose, (2, 4, 3, 2), (3, 2, 2, 2),
               (2,), stride=2, padding=1, output_padding=1,
               options=CheckOptions(dtype="float32", directions=0, second_order=False))


def test_backward_is_conv_and_conv_backward_is_conv_transpose():
    """The symmetry: conv_transpose's input delta is conv's forward, and conv's input delta is
    conv_transpose's forward, with the same stride, padding, dilation and groups."""
    kwargs = dict(stride=2, padding=((1, 2),), dilation=2, groups=2)
    y, w, dz = random_inputs(3, [(2, 4, 4), (3, 1, 4), (2, 8, 2)], F64)
    dy = jax.vjp(lambda v: layers.conv_transpose(v, w, **kwargs), y)[1](dz)[0]
    assert relative_error(dy, reference.conv(dz, w, **kwargs)) <= 1e-13
    dx = jax.vjp(lambda v: layers.conv(v, w, **kwargs), dz)[1](y)[0]
    assert relative_error(dx, layers.conv_transpose(y, w, **kwargs)) <= 1e-13


def test_residuals_are_y_and_w_only():
    y, w, b = random_inputs(4, [(1, 3, 3, 2), (2, 2, 1, 2), (2,)], F64)
    pullback = jax.vjp(functools.partial(layers.conv_transpose, stride=2, groups=2), y, w, b)[1]
    saved = jax.tree_util.tree_leaves(pullback)
    assert len(saved) == 2
    np.testing.assert_array_equal(saved[0], y)
    np.testing.assert_array_equal(saved[1], w)


# ---------------------------------------------------------------- PyTorch's sizes and values

SIZES = [  # (n, k, s, p, d, output_padding) -> PyTorch's ConvTranspose output size
    ((5, 3, 1, 0, 1, 0), 7),    # stride 1, no padding: n + k - 1
    ((3, 4, 2, 1, 1, 0), 6),    # DCGAN's doubling: k 4, s 2, p 1
    ((4, 3, 2, 1, 1, 1), 8),    # k 3, s 2, p 1 doubles only with output_padding 1
    ((4, 3, 2, 1, 1, 0), 7),
    ((7, 3, 3, 2, 2, 2), 21),
    ((4, 5, 2, 3, 1, 1), 6),    # padding wider than half the window
    ((2, 2, 1, 0, 3, 2), 7),    # output_padding 2 >= stride 1, allowed below dilation 3
    ((1, 1, 1, 0, 1, 0), 1),
    ((1, 2, 3, 0, 1, 2), 4),
]


@pytest.mark.parametrize("spec,size", SIZES, ids=[str(s) for s, _ in SIZES])
def test_output_size_is_pytorchs(spec, size):
    """out = (n - 1) * s - 2p + d * (k - 1) + 1 + output_padding, PyTorch's formula."""
    n, k, s, p, d, extra = spec
    assert (n - 1) * s - 2 * p + d * (k - 1) + 1 + extra == size
    for fn in (layers.conv_transpose, reference.conv_transpose):
        out = jax.eval_shape(functools.partial(fn, stride=s, padding=p, dilation=d,
                                               output_padding=extra),
                             jax.ShapeDtypeStruct((1, n, 1), F64),
                             jax.ShapeDtypeStruct((k, 1, 1), F64))
        assert out.shape == (1, size, 1)


@pytest.mark.parametrize("n,k,s,d", [(3, 3, 2, 1), (3, 4, 2, 1), (2, 1, 3, 1), (4, 2, 3, 2),
                                     (3, 3, 1, 2)])
def test_same_padding_gives_n_times_stride(n, k, s, d):
    """"SAME" is conv's SAME for an input of n * s: the result has n * s positions, the
    output_padding max(s - k_eff, 0) being implied; and conv SAME takes it back to n."""
    def shape(fn, *shapes, **kwargs):
        structs = [jax.ShapeDtypeStruct(sh, F64) for sh in shapes]
        return jax.eval_shape(functools.partial(fn, **kwargs), *structs).shape

    kwargs = dict(stride=s, padding="SAME", dilation=d)
    assert shape(layers.conv_transpose, (1, n, 1), (k, 1, 1), **kwargs) == (1, n * s, 1)
    assert shape(layers.conv, (1, n * s, 1), (k, 1, 1), **kwargs) == (1, n, 1)


def _pytorch_conv_transpose(y, w, stride, padding, dilation, groups, output_padding):
    """PyTorch's definition, 1-D, as direct sums (numpy): y[o, co] adds y[o, co] w[k, c, co]
    to z at o * s + k * d - lo, for every tap k and every c of co's group."""
    n, out_ch = y.shape[1:]
    kernel, group_in = w.shape[:2]
    (lo, hi), group_out = padding, out_ch // groups
    size = (n - 1) * stride - lo - hi + dilation * (kernel - 1) + 1 + output_padding
    z = np.zeros((y.shape[0], size, group_in * groups))
    for o in range(n):
        for k in range(kernel):
            q = o * stride + k * dilation - lo
            if 0 <= q < size:
                for g in range(groups):
                    block = slice(g * group_out, (g + 1) * group_out)
                    z[:, q, g * group_in:(g + 1) * group_in] += y[:, o, block] @ w[k, :, block].T
    return z


@pytest.mark.parametrize("n,k,c,kwargs", [
    (4, 3, (2, 3), dict(stride=2, padding=(1, 1), dilation=1, groups=1, output_padding=1)),
    (3, 2, (4, 2), dict(stride=3, padding=(0, 2), dilation=2, groups=2, output_padding=0)),
    (3, 2, (2, 2), dict(stride=1, padding=(1, 0), dilation=3, groups=1, output_padding=2)),
    (2, 3, (2, 4), dict(stride=2, padding=(2, 3), dilation=3, groups=2, output_padding=2)),
])
def test_values_are_pytorchs_definition(n, k, c, kwargs):
    """Against the definition written out by hand, output_padding >= stride included."""
    in_ch, out_ch = c
    y, w = (np.asarray(a) for a in random_inputs(
        5, [(2, n, out_ch), (k, in_ch // kwargs["groups"], out_ch)], F64))
    expected = _pytorch_conv_transpose(y, w, **kwargs)
    for fn in (layers.conv_transpose, reference.conv_transpose):
        got = fn(jnp.asarray(y), jnp.asarray(w), **{**kwargs, "padding": (kwargs["padding"],)})
        assert relative_error(got, expected) <= 1e-13


# ---------------------------------------------------------------- fixed ranks, bad input

@pytest.mark.parametrize("rank", [1, 2, 3])
def test_fixed_rank_wrappers(rank):
    y, w = random_inputs(rank, [(1,) + (2,) * rank + (2,), (2,) * rank + (1, 2)], F64)
    for module in (layers, reference):
        fixed = getattr(module, f"conv_transpose{rank}d")
        np.testing.assert_array_equal(fixed(y, w, stride=2, groups=2, output_padding=1),
                                      module.conv_transpose(y, w, stride=2, groups=2,
                                                            output_padding=1))
        with pytest.raises(ValueError, match=rf"^conv_transpose{rank}d: .*{rank} to {rank} "):
            fixed(jnp.zeros((1,) + (2,) * (rank % 3 + 1) + (2,)), w)


BAD = [  # (y shape, w shape, b shape or None, kwargs, message fragment)
    ((1, 4, 1), (2, 1, 1), None, dict(stride=2, output_padding=2),
     r"output_padding must be smaller than the stride or the dilation on every axis, got "
     r"output_padding=2 with stride \(2,\) and dilation \(1,\)"),
    ((1, 4, 1), (2, 1, 1), None, dict(stride=1, dilation=2, output_padding=2),
     r"output_padding must be smaller than the stride or the dilation .* stride \(1,\) and "
     r"dilation \(2,\)"),
    ((1, 4, 4, 1), (2, 2, 1, 1), None, dict(stride=2, output_padding=(1, 2)),
     r"output_padding=\(1, 2\) with stride \(2, 2\)"),
    ((1, 4, 1), (2, 1, 1), None, dict(output_padding=-1), r"output_padding must be >= 0"),
    ((1, 4, 1), (2, 1, 1), None, dict(stride=2, padding="SAME", output_padding=1),
     r"output_padding must be 0 with padding SAME, .*\(8,\)\), got 1"),
    ((1, 4, 1), (2, 2, 1, 1), None, {}, r"expected kernel of shape .* 1 spatial axes for y of "
                                        r"shape \(1, 4, 1\), got shape \(2, 2, 1, 1\)"),
    ((1, 4, 3), (2, 1, 2), None, {}, r"kernel of shape \(2, 1, 2\) takes y with 2 channels .* "
                                     r"y of shape \(1, 4, 3\) has 3"),
    ((1, 4, 3), (2, 1, 3), None, dict(groups=2), r"groups=2 must divide the channels of y \(3\)"),
    ((1, 4, 2), (2, 1, 2), None, dict(groups=0), r"groups must be an int >= 1, got 0"),
    ((1, 4, 2), (2, 3, 2), (3,), dict(groups=2), r"expected bias of shape \(6,\) \(in_ch = "
                                                 r"w.shape\[-2\] \* groups = 3 \* 2\), got \(3,\)"),
    ((4, 2), (2, 1, 2), None, {}, r"1 to 3 spatial axes, got shape \(4, 2\)"),
    ((1, 2, 1), (2, 1, 1), None, dict(padding=2), r"padding \(\(2, 2\),\) leaves no output: "
                                                  r".* = \(-1,\) for y of spatial size \(2,\)"),
    ((1, 4, 1), (2, 1, 1), None, dict(padding="FULL"), r"padding must be .*got 'FULL'"),
]


@pytest.mark.parametrize("module", [layers, reference], ids=["hand", "reference"])
@pytest.mark.parametrize("y_shape,w_shape,b_shape,kwargs,message", BAD,
                         ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_one_clear_line(module, y_shape, w_shape, b_shape, kwargs, message):
    b = None if b_shape is None else np.zeros(b_shape)
    with pytest.raises(ValueError, match=rf"^conv_transpose: (.* )?{message}") as error:
        module.conv_transpose(np.zeros(y_shape), np.zeros(w_shape), b, **kwargs)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- the registered layer

def test_registered_layer_through_nn():
    layer = nn.layer("conv_transpose", 4, 3, stride=2)
    shape, params = layer.init(jax.random.PRNGKey(0), (5, 5, 2), F64)
    assert shape == (11, 11, 4) and params["w"].shape == (3, 3, 4, 2)
    assert params["b"].shape == (4,) and not params["b"].any()
    # lecun_normal on the conv layout: fan-in features // groups x taps = 36
    assert 0.5 < float(jnp.std(params["w"])) * 6 < 2
    y = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 2)))
    np.testing.assert_array_equal(layer.apply(params, y),
                                  layers.conv_transpose(y, params["w"], params["b"], stride=2))
    with pytest.raises(ValueError, match=r"^conv_transpose: groups must be an int >= 1 dividing "
                                         r"the input channels \(2\) and the features \(3\)"):
        nn.layer("conv_transpose", 3, 2, groups=2).init(jax.random.PRNGKey(0), (4, 2))


def test_registered_flops_and_torch_twin():
    """MACs of the conv it is the adjoint of; PyTorch's module built with our sizes."""
    primitive = registry.get("conv_transpose")
    assert primitive.flops((5, 5, 2), (11, 11, 4), {"w": (3, 3, 2, 2)}) == 5 * 5 * 2 * 3 * 3 * 2

    class FakeNN:  # records what the twin asks PyTorch for; torch is not installed here
        def __getattr__(self, name):
            return lambda *args, **kwargs: (name, args, kwargs)

    class FakeTorch:
        nn = FakeNN()

    def twin(input_shape, **hyperparameters):
        return primitive.torch_module(FakeTorch, input_shape, primitive.check(hyperparameters))

    # SAME with k 4, s 2 is (1, 1) and implies output_padding 0; with k 3 it is (0, 1)
    name, args, kwargs = twin((5, 6, 2), features=4, kernel=4, stride=2, padding="SAME",
                              groups=2)
    assert name == "ConvTranspose2d" and args == (2, 4, (4, 4), 2, (1, 1), (0, 0), 2)
    assert kwargs == {"bias": True, "dilation": 1}
    name, args, _ = twin((5, 2), features=1, kernel=1, stride=3, padding="SAME")
    assert name == "ConvTranspose1d" and args[4:6] == ((0,), (2,))
    for padding in ("SAME", [[1, 0]]):
        with pytest.raises(torch_twins.Unsupported, match="uneven"):
            twin((5, 2), features=4, kernel=3, stride=2, padding=padding)


def test_config_model_gradients_hand_equal_reference():
    """conv stride 2 down, conv_transpose stride 2 back up, flatten, dense: the hand gradient
    of the whole model is the reference's."""
    config = validate_model({"layers": [
        {"type": "conv", "features": 3, "kernel": 3, "stride": 2, "padding": 1},
        {"type": "conv_transpose", "features": 2, "kernel": 3, "stride": 2, "padding": 1,
         "output_padding": 1},
        {"type": "flatten"}, {"type": "dense", "features": 5}]}, "softmax_cross_entropy")
    assert config.layers[1].output_padding == 1
    model = build_model(config, "softmax_cross_entropy", (6, 6, 1), 5)
    assert [r.output_shape for r in model.summary[:2]] == [(3, 3, 3), (6, 6, 2)]
    params = model.init(jax.random.PRNGKey(0), dtype=F64)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, 1)))
    labels = jnp.asarray([1, 3], jnp.int32)
    grads = [jax.jit(jax.grad(lambda p, ops=ops: model.loss(p, x, labels, ops)[0]))(params)
             for ops in (HAND, REFERENCE)]
    for got, want in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        assert relative_error(got, want) <= 1e-10
