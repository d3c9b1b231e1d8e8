"""The source texts' small worked examples, their numbers computed by jaxbp's hand rule.

Every number a page shows comes from `jaxbp.layers.conv` and `jax.vjp` (the custom_vjp rule);
the term-by-term sums beside them are there to be read, and the tests hold them equal to the
rule's arrays. Arrays are single-channel 2-D grids; the conv runs on them as a batch of one.

Symbols follow each source: seed 004 numbers a grid's cells row by row from 1 (V1..V9), seed
003 names them by row and column (x11, w12, δ21).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import layers, reference
from jaxbp.testing import relative_error

Index = Tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Term:
    """One product of a sum: `left · right`, each a symbol with its number; a term whose
    `right` is "" is `left` alone (`right_value` 1). A source, where given, says which
    recorded array entry a number is, as `"key[i,j,k]"` (`source`)."""
    left: str
    left_value: float
    right: str
    right_value: float
    left_source: str = ""
    right_source: str = ""


@dataclasses.dataclass(frozen=True)
class Equation:
    """`lhs = Σ terms = value`; `value` is the rule's number, not the sum of the terms;
    `source` the recorded array entry it is, where it is one."""
    lhs: str
    terms: Tuple[Term, ...]
    value: float
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Grid:
    """A 2-D array to draw as a table, each cell with its symbol and, where the cell is a
    recorded array entry, its source (`sources` empty, or one string per cell, "" for a
    cell worked out from others)."""
    caption: str
    values: np.ndarray
    symbols: Tuple[Tuple[str, ...], ...]
    sources: Tuple[Tuple[str, ...], ...] = ()


def source(key: str, index=()) -> str:
    """`"key[i,j,k]"`: where a number on a page comes from, entry `index` of array `key`."""
    return f"{key}[{','.join(str(int(i)) for i in index)}]"


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a worked example: prose, the arrays involved, then the equations; `images`
    are figures already rendered as HTML (`jaxbp.app.explain.maps`), shown after the prose."""
    heading: str
    text: str
    grids: Tuple[Grid, ...]
    equations: Tuple[Equation, ...] = ()
    images: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Example:
    """A whole worked example, ready to render."""
    name: str
    title: str
    source: str
    steps: Tuple[Step, ...]


def flat_name(name: str, width: int) -> Callable[[Index], str]:
    """Seed 004's naming: cells numbered row by row from 1, e.g. (1, 1) -> V5 for width 3."""
    return lambda ij: f"{name}{ij[0] * width + ij[1] + 1}"


def grid_name(name: str) -> Callable[[Index], str]:
    """Seed 003's naming: row and column from 1, e.g. (0, 1) -> w12."""
    return lambda ij: f"{name}{ij[0] + 1}{ij[1] + 1}"


def make_grid(caption: str, values, name: Callable[[Index], str]) -> Grid:
    values = np.asarray(values, np.float64)
    symbols = tuple(tuple(name((i, j)) for j in range(values.shape[1]))
                    for i in range(values.shape[0]))
    return Grid(caption, values, symbols)


def term_sum(equation: Equation) -> float:
    """The sum of an equation's products, as a reader would work it out."""
    return float(sum(t.left_value * t.right_value for t in equation.terms))


@dataclasses.dataclass(frozen=True)
class RuleResult:
    """A conv's forward and its hand-derived deltas, with the check against jax.grad."""
    y: np.ndarray
    dx: np.ndarray
    dw: np.ndarray
    error_dx: float
    error_dw: float


def _batched(x, w):
    return jnp.asarray(x)[None, :, :, None], jnp.asarray(w)[:, :, None, None]


def run_rule(x: np.ndarray, w: np.ndarray, delta: np.ndarray, stride: int) -> RuleResult:
    """The hand rule's forward and VJP for `delta`, in float64, and their relative error
    against `jax.grad` of the plain twin `jaxbp.reference.conv`.

    Args:
      x: input grid `(H, W)`.
      w: kernel grid `(kH, kW)`.
      delta: the output delta, shaped like the VALID conv's output.
      stride: the conv's stride.
    """
    with jax.enable_x64(True):
        xb, wb = _batched(np.asarray(x, np.float64), np.asarray(w, np.float64))
        db = jnp.asarray(delta, jnp.float64)[None, :, :, None]
        y, pullback = jax.vjp(lambda a, k: layers.conv(a, k, stride=stride), xb, wb)
        dx, dw = pullback(db)
        # The twin's gradient of <conv(x, w), δ> is its VJP for δ, computed by JAX itself.
        dx_auto, dw_auto = jax.grad(
            lambda a, k: jnp.sum(reference.conv(a, k, stride=stride) * db), (0, 1))(xb, wb)
        return RuleResult(np.asarray(y)[0, :, :, 0], np.asarray(dx)[0, :, :, 0],
                          np.asarray(dw)[:, :, 0, 0], relative_error(dx, dx_auto),
                          relative_error(dw, dw_auto))


def contributions(in_shape: Index, k_shape: Index, stride: int):
    """Every (output cell, kernel cell, input cell) a VALID strided conv multiplies together.

    Returns:
      A list of `(out_ij, k_ab, in_pq)`, output cells in row order, then kernel cells.
    """
    out_h = (in_shape[0] - k_shape[0]) // stride + 1
    out_w = (in_shape[1] - k_shape[1]) // stride + 1
    return [((i, j), (a, b), (i * stride + a, j * stride + b))
            for i in range(out_h) for j in range(out_w)
            for a in range(k_shape[0]) for b in range(k_shape[1])]


def _group(rows, key) -> Dict[Index, list]:
    groups: Dict[Index, list] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def chain_rule_equations(x: Grid, w: Grid, y: Grid, delta: Grid, dx: Grid, dw: Grid,
                         stride: int, lhs_w: Callable[[str], str]):
    """The forward, kernel-gradient and input-delta sums of a conv, term by term, each
    equation's value taken from the grid it defines.

    Args:
      x, w, y: input, kernel and output grids (y's values are the rule's forward).
      delta, dx, dw: output delta and the rule's input delta and kernel gradient.
      stride: the conv's stride.
      lhs_w: writes the left-hand side of a kernel gradient from the weight's symbol.

    Returns:
      (forward, kernel gradient, input delta) equations, each in its grid's row order.
    """
    rows = contributions(x.values.shape, w.values.shape, stride)

    def equation(lhs: str, value: float, pairs) -> Equation:
        return Equation(lhs, tuple(Term(ls, float(lv), rs, float(rv)) for ls, lv, rs, rv in pairs),
                        float(value))

    def at(grid: Grid, ij: Index):
        return grid.symbols[ij[0]][ij[1]], grid.values[ij]

    forward = [equation(y.symbols[o[0]][o[1]], y.values[o],
                        [(*at(x, p), *at(w, k)) for _, k, p in group])
               for o, group in sorted(_group(rows, lambda r: r[0]).items())]
    kernel = [equation(lhs_w(w.symbols[k[0]][k[1]]), dw.values[k],
                       [(*at(delta, o), *at(x, p)) for o, _, p in group])
              for k, group in sorted(_group(rows, lambda r: r[1]).items())]
    by_input = _group(rows, lambda r: r[2])
    inputs = [equation(dx.symbols[p[0]][p[1]], dx.values[p],
                       [(*at(delta, o), *at(w, k)) for o, k, _ in by_input.get(p, [])])
              for p in np.ndindex(*x.values.shape)]
    return forward, kernel, inputs


def rotate(grid: Grid) -> Grid:
    """The kernel turned by 180°, its cells keeping their symbols."""
    return Grid(f"rot180({grid.caption.split()[-1]})", grid.values[::-1, ::-1],
                tuple(tuple(row[::-1]) for row in grid.symbols[::-1]))


def spread_and_pad(delta: np.ndarray, k_shape: Index, stride: int, in_shape: Index):
    """The output delta as the input delta's full correlation sees it: `stride - 1` zeros
    between its cells, then `k - 1` zeros around it (more at the far end where the forward's
    windows left input cells unread).

    Returns:
      (values, where) — the padded grid, and for each cell the delta cell it holds or None.
    """
    h = in_shape[0] + k_shape[0] - 1
    w = in_shape[1] + k_shape[1] - 1
    values, where = np.zeros((h, w)), [[None] * w for _ in range(h)]
    for i, j in np.ndindex(*delta.shape):
        r, c = i * stride + k_shape[0] - 1, j * stride + k_shape[1] - 1
        values[r, c], where[r][c] = delta[i, j], (i, j)
    return values, where


def sliding_equations(delta: Grid, w: Grid, dx: Grid, stride: int):
    """The input delta as the 180°-rotated kernel sliding over the spread, padded delta:
    one equation per input cell, its zero cells included as terms.

    Returns:
      (padded delta grid, rotated kernel grid, equations in dx's row order).
    """
    kh, kw = w.values.shape
    padded, where = spread_and_pad(delta.values, (kh, kw), stride, dx.values.shape)
    padded_grid = Grid("δ spread by the stride and padded with zeros", padded, tuple(
        tuple("0" if cell is None else delta.symbols[cell[0]][cell[1]] for cell in row)
        for row in where))
    rotated = rotate(w)
    equations = [Equation(dx.symbols[p][q], tuple(
        Term(padded_grid.symbols[p + a][q + b], float(padded[p + a, q + b]),
             rotated.symbols[a][b], float(rotated.values[a, b]))
        for a in range(kh) for b in range(kw)), float(dx.values[p, q]))
        for p, q in np.ndindex(*dx.values.shape)]
    return padded_grid, rotated, equations


def rule_note(result: RuleResult) -> str:
    return (f"Hand rule (jaxbp.layers.conv, jax.vjp) against jax.grad of jaxbp.reference.conv, "
            f"in float64: max relative error {result.error_dx:.1e} for the input delta, "
            f"{result.error_dw:.1e} for the kernel gradient.")


def seed004() -> Example:
    """Seed 004: a 3×3 input, a 2×2 kernel, the filter gradient and input delta by hand."""
    x_values = np.arange(1.0, 10.0).reshape(3, 3)
    w_values = np.array([[1.0, -1.0], [2.0, 0.5]])
    delta_values = np.array([[1.0, -2.0], [0.5, 3.0]])
    result = run_rule(x_values, w_values, delta_values, stride=1)
    x = make_grid("input V", x_values, flat_name("V", 3))
    w = make_grid("kernel W", w_values, flat_name("W", 2))
    y = make_grid("output G = V ⋆ W (the rule's forward)", result.y, flat_name("G", 2))
    delta = make_grid("output delta δG = ∂E/∂G (chosen)", delta_values, flat_name("δG", 2))
    dx = make_grid("input delta δV (the rule's)", result.dx, flat_name("δV", 3))
    dw = make_grid("kernel gradient ∂E/∂W (the rule's)", result.dw,
                   lambda ij: f"∂E/∂{flat_name('W', 2)(ij)}")
    forward, kernel, inputs = chain_rule_equations(x, w, y, delta, dx, dw, 1,
                                                   lambda s: f"∂E/∂{s}")
    return Example("seed004", "The filter gradient, worked by hand",
                   "seed 004: a question-and-answer thread that works ∂Error/∂W1 of a 3×3 input "
                   "and a 2×2 kernel through the chain rule", (
        Step("1. Forward", "Each output cell is the kernel laid on one 2×2 window of the input, "
             "multiplied cell by cell and summed (a valid cross-correlation, stride 1).",
             (x, w, y), tuple(forward)),
        Step("2. The delta arrives", "Backpropagation hands the layer ∂E/∂G, one number per "
             "output cell. Here it is chosen by hand so that every number below can be checked.",
             (delta,)),
        Step("3. Kernel gradient", "W1 multiplies one input cell in each of the four outputs, so "
             "by the chain rule its gradient gathers four products: each output's delta times "
             "the input cell W1 met there (∂G/∂W1 is that cell).", (x, delta, dw),
             tuple(kernel)),
        Step("4. Input delta", "An input cell feeds every output whose window covers it, "
             "through the weight it met there. The corner V1 is in one window, the centre V5 in "
             "all four, each through a different weight: this is δG correlated, fully, with "
             "the kernel turned by 180°.", (delta, rotate(w), dx), tuple(inputs)),
        Step("5. Check", rule_note(result), ()),
    ))


def _sliding_steps(label: str, x_values, w_values, delta_values, stride: int) -> List[Step]:
    result = run_rule(x_values, w_values, delta_values, stride)
    x = make_grid("input x", x_values, grid_name("x"))
    w = make_grid("kernel w", w_values, grid_name("w"))
    y = make_grid(f"output y = x ⋆ w, stride {stride} (the rule's forward)", result.y,
                  grid_name("y"))
    delta = make_grid("output delta δ (chosen)", delta_values, grid_name("δ"))
    dx = make_grid("input delta δx (the rule's)", result.dx, grid_name("δx"))
    padded, rotated, equations = sliding_equations(delta, w, dx, stride)
    spread = (" With stride 2 the forward's windows jump two cells, so between neighbouring "
              "deltas sits a zero where a stride-1 window would have been."
              if stride > 1 else "")
    return [
        Step(f"{label}: forward", f"The {x_values.shape[0]}×{x_values.shape[1]} input, the "
             f"{w_values.shape[0]}×{w_values.shape[1]} kernel, stride {stride}.", (x, w, y)),
        Step(f"{label}: the delta, spread and padded", "The output delta, placed back on the "
             f"positions the windows started from.{spread} A border of kernel size − 1 zeros "
             "lets the kernel hang off every edge.", (delta, padded)),
        Step(f"{label}: the rotated kernel slides", "Turn the kernel by 180° and slide it over "
             "the padded delta, one step at a time: each position gives one input delta. Cells "
             "that fall on zeros contribute nothing.", (rotated, padded, dx), tuple(equations)),
        Step(f"{label}: check", rule_note(result), ()),
    ]


def seed003() -> Example:
    """Seed 003: the input delta as the rotated kernel sliding over the padded delta."""
    w_values = np.array([[1.0, -1.0], [2.0, 0.5]])
    stride1 = _sliding_steps("Stride 1", np.arange(1.0, 10.0).reshape(3, 3), w_values,
                             np.array([[1.0, -2.0], [0.5, 3.0]]), 1)
    stride2 = _sliding_steps("Stride 2", np.arange(1.0, 17.0).reshape(4, 4), w_values,
                             np.array([[1.0, -2.0], [0.5, 3.0]]), 2)
    return Example("seed003", "Why the kernel is rotated",
                   "seed 003: a blog post deriving the convolution's delta as a full convolution "
                   "with the kernel turned by 180°, on a 3×3 input and a 2×2 kernel",
                   tuple(stride1 + stride2))


EXAMPLES: Dict[str, Callable[[], Example]] = {"seed003": seed003, "seed004": seed004}
