"""Hand-derived pooling backwards (jaxbp.layers.pooling) against jax.grad of their plain twins.

Section numbers (§) are those of jaxbp/layers/DERIVATIONS.md."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbp.layers.pooling as hand
import jaxbp.reference.pooling as plain
from gradcheck import assert_matches_reference, random_inputs
from jaxbp import fast, nn
from jaxbp.registry import HAND, REFERENCE
from jaxbp.testing import check_rule, relative_error


@pytest.fixture(autouse=True, scope="module")
def _fast_cotangent_sampler():
    # The partitionable threefry sampler compiles slowly per output shape on CPU, and every
    # comparison draws a cotangent of a new shape.
    with jax.threefry_partitionable(False):
        yield


def _both(name, jit=True, **kwargs):
    """The hand layer and its twin with the same static arguments bound; jitted by default,
    since compiling once is much cheaper than dispatching the slice-per-offset forward eagerly."""
    pair = (functools.partial(getattr(hand, name), **kwargs),
            functools.partial(getattr(plain, name), **kwargs))
    return tuple(map(jax.jit, pair)) if jit else pair


# ---------------------------------------------------------------- generated grid

# (window, stride) per axis: tiling, overlapping, gapped, and non-dividing combinations.
AXIS_COMBOS = [(1, 1), (2, 2), (3, 3), (2, 1), (3, 1), (3, 2), (2, 3), (1, 3)]
SIZES = {1: (7, 5, 6), 2: (5, 6, 7), 3: (4, 5, 3)}  # odd and even, kept tiny for rank 3


def _case(rank, i):
    """Case i of the given rank; each axis takes a different combination, so windows,
    strides and paddings differ between axes. Rank 1 passes plain ints (stride=None
    where it equals the window)."""
    combos = [AXIS_COMBOS[(i + axis) % len(AXIS_COMBOS)] for axis in range(rank)]
    window = tuple(k for k, _ in combos)
    stride = tuple(s for _, s in combos)
    padding = ("VALID", "SAME", "pairs")[(i + rank) % 3]
    if padding == "pairs":  # asymmetric, each side < window
        padding = tuple(((i + a) % k, (i + 2 * a + 1) % k) for a, k in enumerate(window))
    if rank == 1:
        window, stride = window[0], (None if stride == window else stride[0])
    shape = (1 + i % 2, *SIZES[rank][:rank], 1 if i % 3 == 0 else 3)
    return shape, dict(window=window, stride=stride, padding=padding)


# The generated cases tile (stride == window) with SAME padding only for window 1.
TILED_SAME = [((2, 5, 7, 2), dict(window=2, stride=None, padding="SAME")),
              ((1, 5, 3, 4, 1), dict(window=(2, 3, 1), stride=None, padding="SAME"))]
GRID = [_case(rank, i) for rank in (1, 2, 3) for i in range(len(AXIS_COMBOS))] + TILED_SAME


def _case_id(case):
    shape, kw = case
    dims = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
    pad = kw["padding"] if isinstance(kw["padding"], str) else "P" + "_".join(
        f"{lo}{hi}" for lo, hi in kw["padding"])
    return f"in{dims(shape)}-k{dims(kw['window'])}-s{dims(kw['stride'])}-{pad}"


@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
@pytest.mark.parametrize("name", ["max_pool", "avg_pool"])
def test_grid_matches_reference_float64(name, case):
    shape, kwargs = case
    x, = random_inputs(len(shape), [shape], jnp.float64)
    assert_matches_reference(*_both(name, **kwargs), [x], [0])


@pytest.mark.parametrize("case", GRID[::2], ids=[_case_id(c) for c in GRID[::2]])
@pytest.mark.parametrize("name", ["max_pool", "avg_pool"])
def test_grid_matches_reference_float32(name, case):
    shape, kwargs = case
    x, = random_inputs(7, [shape], jnp.float32)
    assert_matches_reference(*_both(name, **kwargs), [x], [0])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("shape,group_size", [((2, 6), 1), ((1, 5, 6), 3), ((2, 3, 2, 8), 4),
                                              ((2, 3, 2, 2, 6), 6)])
def test_channel_max_matches_reference(shape, group_size, dtype):
    x, = random_inputs(3, [shape], dtype)
    assert_matches_reference(*_both("channel_max", group_size=group_size), [x], [0])


# ---------------------------------------------------------------- finite differences

FD_CASES = [((1, 7, 2), dict(window=3, stride=2, padding="SAME")),
            ((2, 5, 4, 1), dict(window=(2, 3), stride=(1, 2), padding=((1, 0), (0, 2)))),
            ((1, 4, 3, 3, 1), dict(window=2, stride=1))]


@pytest.mark.parametrize("shape,kwargs", FD_CASES)
def test_max_pool_finite_differences(shape, kwargs):
    x, = random_inputs(11, [shape], jnp.float64)  # tie-free, so the max is locally linear
    check_grads(_both("max_pool", **kwargs)[0], (x,), order=1, modes=["rev"], eps=1e-6)


@pytest.mark.parametrize("shape,kwargs", FD_CASES)
def test_avg_pool_finite_differences_to_second_order(shape, kwargs):
    x, = random_inputs(12, [shape], jnp.float64)
    check_grads(_both("avg_pool", **kwargs)[0], (x,), order=2, modes=["rev"])


def test_channel_max_finite_differences():
    x, = random_inputs(13, [(2, 3, 6)], jnp.float64)
    check_grads(_both("channel_max", group_size=3)[0], (x,), order=1, modes=["rev"], eps=1e-6)


# ---------------------------------------------------------------- ties

def _max_pool_grad(x, dy, **kwargs):
    return jax.vjp(_both("max_pool", **kwargs)[0], x)[1](dy)[0]


def _loop_max_pool_grad(x, dy, window, stride, padding):
    """Oracle by explicit loops: each window's delta goes to its first maximum (row-major)."""
    geometry = plain.pool_geometry("max_pool", x, window, stride, padding)
    x = np.pad(np.asarray(x), [(0, 0), *geometry.pads, (0, 0)], constant_values=-np.inf)
    dx = np.zeros_like(x)
    for b, *out, c in np.ndindex(*dy.shape):
        starts = [j * s for j, s in zip(out, geometry.stride)]
        patch = x[(b, *[slice(t, t + k) for t, k in zip(starts, geometry.window)], c)]
        winner = np.unravel_index(np.argmax(patch), patch.shape)  # argmax: first occurrence
        dx[(b, *[t + w for t, w in zip(starts, winner)], c)] += dy[(b, *out, c)]
    return dx[(slice(None), *[slice(lo, lo + n) for (lo, _), n in
                              zip(geometry.pads, geometry.in_sizes)], slice(None))]


TIE_CASES = [((2, 8, 2), dict(window=3, stride=1, padding="SAME")),
             ((1, 6, 7, 2), dict(window=2, stride=None, padding="VALID")),
             ((1, 6, 7, 1), dict(window=(3, 2), stride=(2, 1), padding=((1, 1), (0, 1)))),
             ((1, 4, 5, 3, 2), dict(window=2, stride=(1, 2, 1), padding="SAME"))]


@pytest.mark.parametrize("all_equal", [False, True])
@pytest.mark.parametrize("shape,kwargs", TIE_CASES)
def test_max_pool_ties_go_to_the_first_maximum(shape, kwargs, all_equal):
    rng = np.random.default_rng(5)
    x = np.zeros(shape) if all_equal else rng.integers(0, 3, shape).astype(np.float64)
    out_shape = jax.eval_shape(functools.partial(hand.max_pool, **kwargs), x).shape
    dy = rng.standard_normal(out_shape)
    dx = np.asarray(_max_pool_grad(jnp.asarray(x), jnp.asarray(dy), **kwargs))
    np.testing.assert_allclose(dx, _loop_max_pool_grad(x, dy, **kwargs), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dx.sum(), dy.sum(), rtol=1e-12)  # nothing split, lost or copied


def test_max_pool_ties_explicit():
    all_equal = jnp.ones((1, 2, 2, 1))
    dx = _max_pool_grad(all_equal, jnp.full((1, 1, 1, 1), 5.0), window=2)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[5.0, 0.0], [0.0, 0.0]])
    # overlapping windows [1,3], [3,3], [3,2]: the left 3 wins the first two
    x = jnp.array([1.0, 3.0, 3.0, 2.0]).reshape(1, 4, 1)
    dx = _max_pool_grad(x, jnp.array([1.0, 10.0, 100.0]).reshape(1, 3, 1), window=2, stride=1)
    np.testing.assert_array_equal(dx.ravel(), [0.0, 11.0, 100.0, 0.0])


def test_max_pool_nan_wins_like_lax_max():
    """NaN propagates as in `lax.max` (the reference's reduce_window) and PyTorch; its delta
    goes to the first NaN of the window, wherever the window's larger numbers sit."""
    nan = np.nan
    x = jnp.array([[1.0, nan], [7.0, nan], [nan, 3.0], [2.0, 5.0]]).reshape(1, 8, 1)
    layer, reference = _both("max_pool", window=2)
    np.testing.assert_array_equal(layer(x), reference(x))
    dx = _max_pool_grad(x, jnp.array([1.0, 10.0, 100.0, 1000.0]).reshape(1, 4, 1), window=2)
    np.testing.assert_array_equal(dx.ravel(), [0, 1.0, 0, 10.0, 100.0, 0, 0, 1000.0])


def test_channel_max_ties_go_to_the_first_channel():
    x = jnp.array([[1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.0, 5.0, 5.0]])
    dx = jax.vjp(_both("channel_max", group_size=3)[0], x)[1](
        jnp.array([[1.0, 10.0, 100.0]]))[0]
    np.testing.assert_array_equal(dx, [[1.0, 0, 0, 10.0, 0, 0, 0, 100.0, 0]])


# ---------------------------------------------------------------- seeds

def test_seed_001_only_the_winning_kernel_gets_gradient():
    """DERIVATIONS.md §4; seed 001, the Q&A on a kernel bank with a max across kernels:
    l_p = max_i sum_q k^i_q F_pq; dE/dk^i_q = sum_p dy_p F_pq [i == w(p)]."""
    patches = jnp.array([[1.0, 2.0], [3.0, -1.0]])  # F: 2 positions x 2 taps
    kernels = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])  # 3 kernels
    dy = jnp.array([10.0, 100.0])

    def loss(k):
        responses = (patches @ k.T)[None]  # (1, positions, kernels)
        return jnp.sum(hand.channel_max(responses, 3)[0, :, 0] * dy)

    # position 0 responses (1, 2, 1): kernel 1 wins; position 1 (3, -1, -4): kernel 0 wins
    np.testing.assert_array_equal(jax.grad(loss)(kernels),
                                  [[300.0, -100.0], [10.0, 20.0], [0.0, 0.0]])


def test_seed_002_maxpool_3x24x24_to_3x12x12_upsamples_delta():
    """DERIVATIONS.md §3.1; seed 002, the Q&A tracing a conv 3@5x5 / sigmoid / max-pool /
    dense 432->10 network: the 3x12x12 delta goes back to one winner per 2x2 block of 3x24x24
    (seed 000's max-pool "upsampling")."""
    x, dy = random_inputs(2, [(1, 24, 24, 3), (1, 12, 12, 3)], jnp.float64)
    y, pullback = jax.vjp(_both("max_pool", window=2)[0], x)
    assert y.shape == (1, 12, 12, 3) and y.size == 432
    blocks = pullback(dy)[0].reshape(1, 12, 2, 12, 2, 3)
    np.testing.assert_array_equal(jnp.count_nonzero(blocks, axis=(2, 4)), 1)
    np.testing.assert_array_equal(blocks.sum(axis=(2, 4)), dy)
    assert_matches_reference(*_both("max_pool", window=2), [x], [0])


# ---------------------------------------------------------------- the hand rule runs

@pytest.mark.parametrize("name,kwargs", [("max_pool", dict(window=2)),
                                         ("avg_pool", dict(window=2)),
                                         ("channel_max", dict(group_size=2))])
def test_custom_vjp_is_in_the_graph(name, kwargs):
    x = jnp.ones((1, 4, 4, 2))
    layer, reference = _both(name, **kwargs)
    assert "custom_vjp_call" in str(jax.make_jaxpr(layer)(x))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(reference)(x))
    if name == "max_pool":
        grad_of = lambda f: str(jax.make_jaxpr(jax.grad(lambda v: f(v).sum()))(x))
        assert "select_and_scatter" in grad_of(reference)
        assert "select_and_scatter" not in grad_of(layer)


@pytest.mark.parametrize("name,kwargs,saved", [
    ("max_pool", dict(window=2), [((2, 3, 3, 4), jnp.int8)]),
    ("max_pool", dict(window=3, stride=1, padding="SAME"), [((2, 6, 6, 4), jnp.int8)]),
    ("avg_pool", dict(window=3, stride=2), []),
    ("channel_max", dict(group_size=2), [((2, 6, 6, 2), jnp.int8)]),
])
def test_residuals_are_winner_positions_not_the_input(name, kwargs, saved):
    x, = random_inputs(23, [(2, 6, 6, 4)], jnp.float32)
    pullback = jax.vjp(_both(name, **kwargs)[0], x)[1]
    leaves = jax.tree_util.tree_leaves(pullback)
    assert [(leaf.shape, leaf.dtype) for leaf in leaves] == saved


def _misrouting_channel_max(group_size):
    """hand.channel_max whose backward sends each delta to the group's first channel, not its
    winner: a rule that is wrong on purpose, built from the public layer."""
    @jax.custom_vjp
    def wrong(x):
        return hand.channel_max(x, group_size)

    def wrong_fwd(x):
        return hand.channel_max(x, group_size), x

    def wrong_bwd(x, dy):
        first = jnp.zeros((*dy.shape, group_size), dy.dtype).at[..., 0].set(dy)
        return (first.reshape(x.shape),)

    wrong.defvjp(wrong_fwd, wrong_bwd)
    return wrong


def test_a_misrouted_delta_fails_the_comparison():
    x, = random_inputs(22, [(1, 5, 6)], jnp.float64)
    with pytest.raises(AssertionError, match="gradient"):
        assert_matches_reference(jax.jit(_misrouting_channel_max(3)),
                                 _both("channel_max", group_size=3)[1], [x], [0])


# ---------------------------------------------------------------- spread formulations (jaxbp.fast)

def _chosen_spread(shape, **kwargs):
    geometry = plain.pool_geometry("max_pool", np.zeros(shape), kwargs["window"],
                                   kwargs.get("stride"), kwargs.get("padding", "VALID"))
    return fast.chosen("pool.spread", shape, geometry)


# Windows that tile the input (where "tiled" is chosen): a cropped extent, and "same" padding
# in 2-D and 3-D. The grid runs "tiled" on these shapes and "plain" everywhere else.
TILING = [((1, 5, 7, 2), dict(window=2, stride=None, padding="VALID")), *TILED_SAME]


def test_the_grid_runs_both_spreads():
    chosen = {_chosen_spread(shape, **kwargs) for shape, kwargs in GRID}
    assert chosen == {"plain", "tiled"}
    assert all(_chosen_spread(shape, **kwargs) == "tiled" for shape, kwargs in TILING)


# (the grid runs "plain" on cropped extents too, where windows leave a gap)
FORCED_PLAIN = [("max_pool", TILED_SAME[1]), ("avg_pool", TILED_SAME[0])]


@pytest.mark.parametrize("name,case", FORCED_PLAIN,
                         ids=[f"{n}-{_case_id(c)}" for n, c in FORCED_PLAIN])
def test_forced_plain_spread_matches_reference_where_windows_tile(name, case):
    """Each delta to its window's winner, or dy / n to every input of the window
    (DERIVATIONS.md §3.1-§3.2), by the shifted sum where the reshape is chosen."""
    shape, kwargs = case
    x, = random_inputs(21, [shape], jnp.float64)
    with fast.use({"pool.spread": "plain"}):
        assert_matches_reference(*_both(name, **kwargs), [x], [0])


@pytest.mark.parametrize("name", ["max_pool", "avg_pool"])
def test_tiled_spread_forced_on_overlapping_windows_is_rejected(name):
    with fast.use({"pool.spread": "tiled"}), pytest.raises(
            ValueError, match=r"^jaxbp.fast.use: pool.spread='tiled' does not apply to shapes "
                              r"\(1, 5, 7, 2\), PoolGeometry\(window=\(3, 3\).*needs windows "
                              r"that tile the input \(stride == window\); what applies here: "
                              r"'plain'$"):
        getattr(hand, name)(jnp.zeros((1, 5, 7, 2)), window=3, stride=1)


@pytest.mark.parametrize("shape,kwargs,spread", [
    ((128, 24, 24, 3), dict(window=2), "tiled"),                # seed002's pool
    ((128, 28, 28, 6), dict(window=2), "tiled"),                # lenet5_classic's first
    ((2, 5, 7, 2), dict(window=2, padding="SAME"), "tiled"),
    ((2, 5, 7, 2), dict(window=3, stride=2), "plain"),
    ((2, 5, 7, 2), dict(window=(2, 3), stride=(2, 2)), "plain"),
])
def test_tiled_spread_is_chosen_where_windows_tile(monkeypatch, shape, kwargs, spread):
    assert _chosen_spread(shape, **kwargs) == spread
    monkeypatch.setenv("JAXBP_TUNING", "0")
    assert _chosen_spread(shape, **kwargs) == "plain"


# ---------------------------------------------------------------- transformations

TRANSFORM_CASES = [("max_pool", dict(window=2)),
                   ("max_pool", dict(window=3, stride=2, padding="SAME")),
                   ("avg_pool", dict(window=(2, 3), stride=1, padding=((1, 0), (1, 2)))),
                   ("channel_max", dict(group_size=2))]


@pytest.mark.parametrize("name,kwargs", TRANSFORM_CASES)
def test_jit(name, kwargs):
    x, = random_inputs(31, [(2, 5, 6, 4)], jnp.float32)
    layer, reference = _both(name, jit=False, **kwargs)
    assert_matches_reference(jax.jit(layer), reference, [x], [0])


@pytest.mark.parametrize("name,kwargs", TRANSFORM_CASES)
def test_vmap_and_grad_of_vmap(name, kwargs):
    x, = random_inputs(32, [(3, 2, 5, 6, 4)], jnp.float64)
    layer, reference = _both(name, **kwargs)
    assert_matches_reference(jax.vmap(layer), jax.vmap(reference), [x], [0])


@pytest.mark.parametrize("name,kwargs", TRANSFORM_CASES[:3])
def test_full_check_rule_grad_of_grad_jit_vmap(name, kwargs):
    """`check_rule` in full: grad of grad, finite differences, jit and vmap."""
    layer, reference = _both(name, **kwargs)
    report = check_rule(layer, reference, (2, 5, 6, 1))
    assert report.second_order_errors and report.vmap_error is not None


# ---------------------------------------------------------------- bad input

BAD_POOL_ARGS = [
    ((5, 3), {}, "spatial axes"),
    ((1, 2, 2, 2, 2, 1), {}, "spatial axes"),
    ((1, 5, 5, 1), dict(window=0), "window must be >= 1"),
    ((1, 5, 5, 1), dict(window=(2,)), "window must be"),
    ((1, 5, 5, 1), dict(stride=0), "stride must be >= 1"),
    ((1, 5, 5, 1), dict(window=6), "does not fit"),
    ((1, 5, 5, 1), dict(padding="FULL"), "padding must be"),
    ((1, 5, 5, 1), dict(padding=((1, 1),)), "padding must be"),
    ((1, 5, 5, 1), dict(padding=((0, -1), (0, 0))), "padding must be"),
    ((1, 5, 5, 1), dict(padding=((2, 0), (0, 0))), "smaller than the window"),
]


@pytest.mark.parametrize("module", [hand, plain], ids=["hand", "reference"])
@pytest.mark.parametrize("name", ["max_pool", "avg_pool"])
@pytest.mark.parametrize("shape,kwargs,message", BAD_POOL_ARGS)
def test_bad_pool_arguments(module, name, shape, kwargs, message):
    kwargs = {"window": 2, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}: .*{message}"):
        getattr(module, name)(jnp.zeros(shape), **kwargs)


@pytest.mark.parametrize("module", [hand, plain], ids=["hand", "reference"])
@pytest.mark.parametrize("name", ["max_pool", "avg_pool", "channel_max"])
def test_integer_input_is_rejected(module, name):
    args = dict(group_size=2) if name == "channel_max" else dict(window=2)
    with pytest.raises(ValueError, match=f"^{name}: .*floating"):
        getattr(module, name)(jnp.zeros((1, 4, 4), jnp.int32), **args)


@pytest.mark.parametrize("module", [hand, plain], ids=["hand", "reference"])
@pytest.mark.parametrize("x,group_size,message", [
    (jnp.zeros((2, 5)), 2, "not divisible"),
    (jnp.zeros((2, 6)), 0, "group_size must be"),
    (jnp.zeros((2, 6)), 1.5, "group_size must be"),
    (jnp.zeros(()), 1, "channel axis"),
])
def test_bad_channel_max_arguments(module, x, group_size, message):
    with pytest.raises(ValueError, match=f"^channel_max: .*{message}"):
        module.channel_max(x, group_size)


def test_channel_max_twin_keeps_its_delta_after_batch_norm_in_one_program():
    """Batch norm feeding channel max, the whole network compiled as one program: the twin
    must still send each delta to its winner. (A twin written with `jnp.max` lost it: XLA
    recomputes the normalised input inside a fusion, and JAX's equality test with the
    maximum then finds no winner.)"""
    net = nn.serial(nn.layer("conv", 4, 3, stride=2, padding=1), nn.layer("batch_norm"),
                    nn.layer("channel_max", group_size=2), nn.Flatten(), nn.Dense(10))
    with jax.enable_x64(True):
        _, params = net.init(jax.random.PRNGKey(0), (28, 28, 1), jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(1), (6, 28, 28, 1), jnp.float64)
        grads = [jax.jit(jax.grad(lambda p, ops=ops: jnp.sum(
            net.apply(p, x, ops, train=True) ** 2)))(params) for ops in (HAND, REFERENCE)]
    hand, twin = grads
    # The conv's bias, before batch norm, has a gradient of rounding noise: left out.
    for path in ((0, "w"), (1, "scale"), (1, "offset"), (4, "w")):
        assert relative_error(hand[path[0]][path[1]], twin[path[0]][path[1]]) < 1e-12, path
