"""Worked steps on a recorded network: each layer type's backward spelled out on its own
numbers, as the source texts spell it out on theirs.

Each step picks the entry where the layer's delta is largest and writes the rule's sum
there term by term. Every number that is an entry of a recorded array carries its source
(`examples.source`, "3/delta_output[4,5,0]"), and every equation's value is the recorded
entry it defines: the sums beside them only spell the rule out, and the tests hold them to
the arrays. Numbers worked out on the way (a partial sum, f′(z), a batch statistic) are
computed here in float64 and carry no source.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from jaxbp.app.explain.examples import Equation, Grid, Step, Term, source
from jaxbp.app.explain.maps import categorical, heatmap
from jaxbp.reference.conv import conv_geometry
from jaxbp.reference.pooling import pool_geometry

KEEP = 8
"""Terms of a long sum written out: the largest products; the rest are added up as one."""

Index = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layer:
    """What a worked step of top-level layer `index` reads.

    Attributes:
      index: the layer's position in `model.layers`.
      type: its config type.
      hyper: its hyperparameters (defaults filled in).
      arrays: the hand rules' recording (`jaxbp.app.explain.record`).
      slopes: f′ at the input of each elementwise top-level layer, by index (its delta
        sent down is the one arriving times f′).
      state: the layer's non-trainable state (batch norm's running statistics), or {}.
      loss: the config's loss; last: whether this is the last layer.
    """
    index: int
    type: str
    hyper: Mapping
    arrays: Mapping[str, np.ndarray]
    slopes: Mapping[int, np.ndarray]
    state: Mapping[str, np.ndarray]
    loss: str
    last: bool

    def key(self, name: str) -> str:
        return f"{self.index}/{name}"

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[self.key(name)]

    def entry(self, name: str, index: Index) -> Tuple[float, str]:
        """The number at `index` of this layer's array `name`, and its source."""
        return float(self[name][tuple(index)]), source(self.key(name), index)


def spot(index: Index) -> str:
    return "[" + ",".join(str(int(i)) for i in index) + "]"


def sizes(values: Sequence[int]) -> str:
    """`2` or `2×1`: a stride or window as the text writes it."""
    return "×".join(str(int(v)) for v in values)


def largest(array: np.ndarray) -> Index:
    """The index of the largest magnitude (the first, on ties)."""
    return tuple(int(i) for i in np.unravel_index(np.argmax(np.abs(array)), array.shape))


def term(layer: Layer, left: Tuple[str, str, Index], right: Optional[Tuple[str, str, Index]]
         ) -> Term:
    """A product of two recorded entries, each `(symbol, array name, index)`; `right` None
    for a recorded entry standing alone."""
    symbol, name, index = left
    value, where = layer.entry(name, index)
    if right is None:
        return Term(symbol, value, "", 1.0, where)
    r_symbol, r_name, r_index = right
    r_value, r_where = layer.entry(r_name, r_index)
    return Term(symbol, value, r_symbol, r_value, where, r_where)


def lumped(terms: Sequence[Term], what: str, keep: int = KEEP) -> Tuple[Term, ...]:
    """The `keep` largest products in their order, the others added up as one term (when
    there are more than `keep + 1`)."""
    if len(terms) <= keep + 1:
        return tuple(terms)
    magnitudes = np.array([abs(t.left_value * t.right_value) for t in terms])
    shown = set(np.argsort(-magnitudes, kind="stable")[:keep].tolist())
    rest = [t for n, t in enumerate(terms) if n not in shown]
    total = float(sum(t.left_value * t.right_value for t in rest))
    return tuple(t for n, t in enumerate(terms) if n in shown) + (
        Term(f"(the other {len(rest)} {what}, added up)", total, "", 1.0),)


def recorded(layer: Layer, lhs: str, name: str, index: Index, terms: Sequence[Term]
             ) -> Equation:
    """`lhs = Σ terms = the recorded entry (name, index)`."""
    value, where = layer.entry(name, index)
    return Equation(lhs, tuple(terms), value, where)


def grid(layer: Layer, caption: str, cells: np.ndarray, symbol: Callable[[Index], str],
         entry_of: Optional[Callable[[Index], Optional[Tuple[str, Index]]]] = None,
         values: Optional[np.ndarray] = None) -> Grid:
    """A table over `cells` (a 2-D object array of indices): each cell's number is the
    recorded entry `entry_of(cell)` names as (array name, index), or where that is None (or
    `entry_of` is), `values` at the cell's place (a number worked out, or padding)."""
    rows, wheres, numbers = [], [], np.zeros(cells.shape)
    for r, c in np.ndindex(*cells.shape):
        found = entry_of(cells[r, c]) if entry_of is not None else None
        if found is None:
            numbers[r, c], where = values[r, c], ""
        else:
            numbers[r, c], where = layer.entry(*found)
        wheres.append(where)
        rows.append(symbol(cells[r, c]))
    width = cells.shape[1]
    chunk = lambda items: tuple(tuple(items[k:k + width])  # noqa: E731
                                for k in range(0, len(items), width))
    return Grid(caption, numbers, chunk(rows), chunk(wheres))


def as_table(indices: Sequence, shape: Sequence[int]) -> np.ndarray:
    """Indices (tuples) in row-major order as a 2-D object array: the last axis of `shape`
    across, the others down."""
    table = np.empty(len(indices), dtype=object)
    for n, index in enumerate(indices):
        table[n] = index
    return table.reshape(-1, shape[-1] if len(shape) else 1)


# --- conv ----------------------------------------------------------------------------------

def _conv_steps(layer: Layer) -> List[Step]:
    h = layer.hyper
    geometry = conv_geometry("conv", None, layer["input"][None], layer["w"], None,
                             h["stride"], h["padding"], h["dilation"], h["groups"])
    return [_conv_input_delta(layer, geometry), _conv_kernel_gradient(layer, geometry)]


def _spread_cell(m: Index, strides, out_sizes) -> Optional[Index]:
    """The output position at spread-δ position m, or None where the spread δ holds a zero
    (between strided positions, or in the border)."""
    if any(v < 0 or v % s or v // s >= n for v, s, n in zip(m, strides, out_sizes)):
        return None
    return tuple(v // s for v, s in zip(m, strides))


def _conv_input_delta(layer: Layer, geometry) -> Step:
    w, dy, dx = layer["w"], layer["delta_output"], layer["delta_input"]
    kernel, in_group, out_ch = w.shape[:-2], w.shape[-2], w.shape[-1]
    out_group = out_ch // geometry.groups
    p = largest(dx)
    position, c = p[:-1], p[-1]
    group, c_in = c // in_group, c % in_group
    channels = range(group * out_group, (group + 1) * out_group)
    strides, dilation = geometry.strides, geometry.dilation
    lows = [lo for lo, _ in geometry.pads]
    taps = list(np.ndindex(*kernel))  # rotated-kernel positions k' in row-major order

    def cell(k_rot: Index) -> Optional[Index]:
        m = [q + lo - (k - 1 - kr) * d
             for q, lo, k, kr, d in zip(position, lows, kernel, k_rot, dilation)]
        return _spread_cell(m, strides, dy.shape[:-1])

    def unrotated(k_rot: Index) -> Index:
        return tuple(k - 1 - kr for k, kr in zip(kernel, k_rot))

    def part(co: int) -> float:
        return float(sum(dy[(*cell(k), co)] * w[(*unrotated(k), c_in, co)]
                         for k in taps if cell(k) is not None))

    parts = [part(co) for co in channels]
    co = channels[int(np.argmax(np.abs(parts)))]
    table = as_table(taps, kernel)
    spread = grid(layer, f"δ of output channel {co}, spread out and padded: the cells the "
                  f"rotated kernel covers at input position {spot(position)}", table,
                  lambda k: "0" if cell(k) is None else f"δ{spot(cell(k))}",
                  lambda k: None if cell(k) is None else ("delta_output", (*cell(k), co)),
                  np.zeros(table.shape))
    rotated = grid(layer, f"the kernel w[…, {c_in}, {co}] turned by 180°", table,
                   lambda k: f"w{spot(unrotated(k))}",
                   lambda k: ("w", (*unrotated(k), c_in, co)))
    terms = []
    for k in taps:
        _, w_where = layer.entry("w", (*unrotated(k), c_in, co))
        weight = float(w[(*unrotated(k), c_in, co)])
        if cell(k) is None:
            terms.append(Term("0", 0.0, f"w{spot(unrotated(k))}", weight, "", w_where))
        else:
            terms.append(term(layer, (f"δ{spot(cell(k))}", "delta_output", (*cell(k), co)),
                              (f"w{spot(unrotated(k))}", "w", (*unrotated(k), c_in, co))))
    lhs = f"δx{spot(p)}"
    equations = [Equation(f"{lhs}, the part from δ channel {co}", tuple(terms),
                          parts[co - channels[0]])]
    if len(parts) > 1:
        equations.append(recorded(layer, lhs, "delta_input", p, lumped(
            [Term(f"part{co_}", v, "", 1.0) for co_, v in zip(channels, parts)],
            "channels' parts")))
    else:
        equations[0] = dataclasses.replace(equations[0], lhs=lhs, value=float(dx[p]),
                                           source=source(layer.key("delta_input"), p))
    stride_note = (f" Stride {sizes(strides)} spreads δ out first, with stride − 1 zeros "
                   f"between its entries where the strided forward skipped windows."
                   if max(strides) > 1 else "")
    text = (f"The input delta at {spot(p)} (where it is largest) collects δ from every output "
            f"whose window covered that input cell, each time through the weight it met "
            f"there. Written as seed 003 writes it: spread δ, pad it with zeros, turn the "
            f"kernel by 180° and slide it; at {spot(position)} it covers the cells "
            f"below.{stride_note} Cells beyond the output are zeros. With "
            f"{len(parts)} output channel{'s' if len(parts) > 1 else ''} in the group, each "
            f"adds its own part.")
    return Step("Input delta: δ correlated with the rotated kernel", text, (spread, rotated),
                tuple(equations))


def _conv_kernel_gradient(layer: Layer, geometry) -> Step:
    x, dy, dw = layer["input"], layer["delta_output"], layer["grad_w"]
    out_sizes, in_sizes = dy.shape[:-1], x.shape[:-1]
    in_group, out_group = dw.shape[-2], dw.shape[-1] // geometry.groups
    k_index = largest(dw)
    k, c_in, co = k_index[:-2], k_index[-2], k_index[-1]
    c = (co // out_group) * in_group + c_in
    lows = [lo for lo, _ in geometry.pads]

    def met(o: Index) -> Optional[Index]:
        """The input cell kernel entry k met at output o, None in the padding."""
        q = tuple(oi * s + ki * d - lo for oi, s, ki, d, lo in
                  zip(o, geometry.strides, k, geometry.dilation, lows))
        return q if all(0 <= v < n for v, n in zip(q, in_sizes)) else None

    outputs = list(np.ndindex(*out_sizes))
    products = np.array([0.0 if met(o) is None else float(x[(*met(o), c)]) * float(dy[(*o, co)])
                         for o in outputs])
    best = outputs[int(np.argmax(np.abs(products)))]
    start = [min(b, n - min(2, n)) for b, n in zip(best, out_sizes)]
    block_shape = [min(2, n) for n in out_sizes]
    block = [tuple(s + b for s, b in zip(start, offset)) for offset in np.ndindex(*block_shape)]
    table = as_table(block, block_shape)
    deltas = grid(layer, f"δ of output channel {co} at the outputs from {spot(start)}", table,
                  lambda o: f"δ{spot(o)}", lambda o: ("delta_output", (*o, co)))
    inputs = grid(layer, f"the input cells (channel {c}) that w{spot(k_index)} met there",
                  table, lambda o: "0 (pad)" if met(o) is None else f"x{spot(met(o))}",
                  lambda o: None if met(o) is None else ("input", (*met(o), c)),
                  np.zeros(table.shape))
    shown = []
    for o in block:
        if met(o) is None:
            value, where = layer.entry("delta_output", (*o, co))
            shown.append(Term(f"δ{spot(o)}", value, "0 (pad)", 0.0, where, ""))
        else:
            shown.append(term(layer, (f"δ{spot(o)}", "delta_output", (*o, co)),
                              (f"x{spot(met(o))}", "input", (*met(o), c))))
    shown_outputs = set(block)
    rest = [n for n, o in enumerate(outputs) if o not in shown_outputs]
    terms = shown + ([Term(f"(the other {len(rest)} positions' δ·x, added up)",
                           float(products[rest].sum()), "", 1.0)] if rest else [])
    equations = [recorded(layer, f"∂L/∂w{spot(k_index)}", "grad_w", k_index, terms)]
    if layer.key("grad_b") in layer.arrays:
        equations.append(recorded(layer, f"∂L/∂b[{co}]", "grad_b", (co,), [Term(
            f"(all {len(outputs)} δ of channel {co}, added up)",
            float(np.sum(dy[..., co], dtype=np.float64)), "", 1.0)]))
    text = (f"A kernel entry is used once per output position, so its gradient adds up "
            f"δ·(the input cell it met) over all {len(outputs)} of them: seed 004's "
            f"dE/dW1 = δG1·V1 + δG2·V2 + δG3·V4 + δG4·V5 on a 2×2 output. Here the "
            f"{len(block)} outputs around the largest product are written out"
            + (f", with stride {sizes(geometry.strides)} the input cells "
               f"{sizes(geometry.strides)} apart" if max(geometry.strides) > 1 else "")
            + ". The bias gradient is δ added up over the positions.")
    return Step("Kernel gradient: input cells times δ", text, (deltas, inputs),
                tuple(equations))


# --- pooling -------------------------------------------------------------------------------

def _window_candidates(x: np.ndarray, geometry):
    """`(*out_sizes, channels, window_size)` window values (padding -inf) and for each the
    input position it reads (None in the padding), offsets in row-major order."""
    offsets = list(itertools.product(*(range(k) for k in geometry.window)))
    outputs = list(np.ndindex(*geometry.out_sizes))

    def position(o, t):
        q = tuple(oi * s + ti - lo for oi, s, ti, (lo, _) in
                  zip(o, geometry.stride, t, geometry.pads))
        return q if all(0 <= v < n for v, n in zip(q, geometry.in_sizes)) else None

    where = {o: [position(o, t) for t in offsets] for o in outputs}
    values = np.full((*geometry.out_sizes, x.shape[-1], len(offsets)), -np.inf)
    for o in outputs:
        for n, q in enumerate(where[o]):
            if q is not None:
                values[o][:, n] = x[q]
    return values, where


def _max_pool_steps(layer: Layer) -> List[Step]:
    x, dy = layer["input"], layer["delta_output"]
    h = layer.hyper
    geometry = pool_geometry("max_pool", x[None], h["window"], h["stride"], h["padding"])
    values, where = _window_candidates(np.asarray(x, np.float64), geometry)
    winner = np.argmax(values, axis=-1)  # the first maximum: the rule's tie rule
    tied = np.sum(values == values.max(axis=-1, keepdims=True), axis=-1) > 1
    o_c = largest(dy)
    o, c = o_c[:-1], o_c[-1]
    won = {}  # input cell -> the windows it won (channel c)
    for out in where:
        won.setdefault(where[out][winner[(*out, c)]], []).append(out)
    block_shape = [min(2, n) for n in geometry.out_sizes]
    start = [min(b, n - s) for b, n, s in zip(o, geometry.out_sizes, block_shape)]
    block = [tuple(s + b for s, b in zip(start, t)) for t in np.ndindex(*block_shape)]
    cells = sorted({q for out in block for q in where[out] if q is not None})
    lo = np.min(cells, axis=0)
    patch_shape = tuple(np.max(cells, axis=0) - lo + 1)
    patch = [tuple(int(v) for v in lo + t) for t in np.ndindex(*patch_shape)]
    table = as_table(patch, patch_shape)
    inputs = grid(layer, f"the input (channel {c}) under those windows; ★ won its window",
                  table, lambda q: f"x{spot(q)}" + (" ★" if q in won else ""),
                  lambda q: ("input", (*q, c)))
    deltas = grid(layer, f"δ arriving at the windows from {spot(start)}", as_table(
        block, block_shape), lambda out: f"δ{spot(out)}",
        lambda out: ("delta_output", (*out, c)))
    sent = grid(layer, "δ sent down: each window's δ at its winner, 0 elsewhere", table,
                lambda q: f"δx{spot(q)}", lambda q: ("delta_input", (*q, c)))
    equations = tuple(_routed(layer, q, won, c) for q in patch if q in won)
    ties, total = int(tied[..., c].sum()), int(np.prod(geometry.out_sizes))
    text = (f"Max pooling has no weights: its backward hands each window's δ to the input "
            f"that won the window in the forward and 0 to the others (the ★ cells are the "
            f"winner map). Tie rule: the first maximum in row-major order wins the whole δ, "
            f"so no δ is split or copied. {ties} of the {total} windows of channel {c} hold a "
            f"tie here ({int(tied.sum())} of {tied.size} in all channels): flat stretches of "
            f"the map, such as a background or ReLU's zeros.")
    steps = [Step("Where each δ went: the winner map", text, (inputs, deltas, sent),
                  equations, (_winner_map(geometry, where, winner[..., c], c),))]
    tie = _tie_example(layer, tied[..., c], dy[..., c], where, winner[..., c], won, c,
                       geometry.window)
    return steps + ([tie] if tie else [])


def _winner_map(geometry, where, winner, c: int) -> str:
    mask = np.zeros((*geometry.in_sizes, 1))
    for out in where:
        mask[where[out][winner[out]]] = 1.0
    return heatmap(mask, 1.0, f"the winner map of channel {c}: red cells won a window")


def _tie_example(layer: Layer, tied, dy, where, winner, won, c: int, window
                 ) -> Optional[Step]:
    """The tied window with the largest δ, its values and where its δ went; None if none."""
    if not tied.any():
        return None
    out = largest(np.where(tied, dy, 0)) if np.any(dy[tied]) else tuple(
        int(i) for i in np.argwhere(tied)[0])
    cells = [q for q in where[out] if q is not None]
    table = as_table(cells, window if len(cells) == len(where[out]) else [len(cells)])
    values = grid(layer, f"window {spot(out)} (channel {c}), in row-major order", table,
                  lambda q: f"x{spot(q)}" + (" ★" if q == where[out][winner[out]] else ""),
                  lambda q: ("input", (*q, c)))
    first = where[out][winner[out]]
    text = ("Its maximum appears more than once. The first one in row-major order, ★, takes "
            "the window's whole δ; the others get 0 from this window.")
    return Step("The tie rule, on a tied window", text, (values,), (
        _routed(layer, first, won, c),))


def _routed(layer: Layer, q: Index, won: Mapping, c: int) -> Equation:
    """δx at input cell q: the δ of every window it won, added up."""
    return recorded(layer, f"δx{spot(q)}", "delta_input", (*q, c),
                    [term(layer, (f"δ{spot(out)}", "delta_output", (*out, c)), None)
                     for out in won[q]])


def _channel_max_steps(layer: Layer) -> List[Step]:
    x, dy = layer["input"], layer["delta_output"]
    size = int(layer.hyper["group_size"])
    p_g = largest(dy)
    p, g = p_g[:-1], p_g[-1]
    group = list(range(g * size, (g + 1) * size))
    grouped = np.asarray(x, np.float64).reshape(*x.shape[:-1], -1, size)
    winners = np.argmax(grouped, axis=-1)
    w = group[winners[p_g]]
    table = as_table([(*p, ch) for ch in group], [size])
    maps = grid(layer, f"the {size} maps of group {g} at {spot(p)}; ★ won", table,
                lambda q: f"x{spot(q)}" + (" ★" if q[-1] == w else ""),
                lambda q: ("input", q))
    sent = grid(layer, "δ sent down to them", table, lambda q: f"δx{spot(q)}",
                lambda q: ("delta_input", q))
    counts = np.bincount(winners[..., g].ravel(), minlength=size)
    text = (f"Seed 001's winner kernel: at each position only the largest of the {size} maps "
            f"of a group goes up, so only that map gets the δ back; the other maps get 0 "
            f"there (tie rule: the lowest channel wins). Over the whole map, the maps of "
            f"group {g} won at " + ", ".join(f"{n} (map {ch})" for ch, n in zip(group, counts))
            + " positions.")
    return [Step("Which map won", text, (maps, sent), (recorded(
        layer, f"δx{spot((*p, w))}", "delta_input", (*p, w),
        [term(layer, (f"δ{spot(p_g)}", "delta_output", p_g), None)]),),
        (categorical(winners[..., g], group,
                     f"which map of group {g} won at each position"),))]


# --- dense and elementwise -----------------------------------------------------------------

def _dense_steps(layer: Layer) -> List[Step]:
    n_in, n_out = layer["w"].shape
    j = largest(layer["delta_input"])[0]
    terms = [term(layer, (f"w[{j},{o}]", "w", (j, o)), (f"δ[{o}]", "delta_output", (o,)))
             for o in range(n_out)]
    equations = [recorded(layer, f"δx[{j}]", "delta_input", (j,), lumped(terms, "products"))]
    below = layer.index - 1
    text = (f"W is {n_in}×{n_out} (jaxbp stores it in×out: y = x W + b). The δ arriving has "
            f"{n_out} entries; Wᵀδ, computed as W·δ here, has {n_in}: each input's δ adds up "
            f"the δ of every output it fed, through its weight. ")
    if below in layer.slopes:
        slope = layer.slopes[below]
        value, where = layer.entry("delta_input", (j,))
        equations.append(Equation(
            f"δ sent down by layer {below} at [{j}]",
            (Term(f"(Wᵀδ)[{j}]", value, f"f′(z[{j}])", float(slope[j]), where, ""),),
            float(layer.arrays[f"{below}/delta_input"][j]),
            source(f"{below}/delta_input", (j,))))
        text += (f"Layer {below} below applied f elementwise, so its δ is δ = Wᵀδ ⊙ f′(z): "
                 f"{n_in} = ({n_in}×{n_out})·({n_out}) ⊙ ({n_in}). ")
    jw = largest(layer["grad_w"])
    equations.append(recorded(layer, f"∂L/∂w{spot(jw)}", "grad_w", jw, [
        term(layer, (f"x[{jw[0]}]", "input", (jw[0],)),
             (f"δ[{jw[1]}]", "delta_output", (jw[1],)))]))
    if layer.key("grad_b") in layer.arrays:
        equations.append(recorded(layer, f"∂L/∂b[{jw[1]}]", "grad_b", (jw[1],), [
            term(layer, (f"δ[{jw[1]}]", "delta_output", (jw[1],)), None)]))
    text += "The weight gradient is an outer product: ∂L/∂W = xᵀδ, one product per entry."
    heading = "δ = Wᵀδ ⊙ f′(z)" if below in layer.slopes else "δ = Wᵀδ"
    return [Step(f"{heading}, with the sizes", text, (), tuple(equations))]


def _elementwise_steps(layer: Layer) -> List[Step]:
    slope = layer.slopes[layer.index]
    p = largest(layer["delta_input"])
    value, where = layer.entry("delta_output", p)
    return [Step("δ times the slope", "An elementwise layer multiplies each δ by its own "
                 "slope f′(z) at the input z it saw (here f′ comes from the layer's rule "
                 "applied to a δ of ones). Where f′ is small, δ fades.", (), (Equation(
                     f"δx{spot(p)}", (Term(f"δ{spot(p)}", value, f"f′(z{spot(p)})",
                                           float(slope[p]), where, ""),),
                     float(layer["delta_input"][p]),
                     source(layer.key("delta_input"), p)),))]


# --- softmax, batch norm, residual ---------------------------------------------------------

def _softmax_steps(layer: Layer) -> List[Step]:
    s = np.asarray(layer["output"], np.float64)
    if s.ndim != 1 or s.size > 32:
        return []
    delta = np.asarray(layer["delta_output"], np.float64)
    full = np.asarray(layer["delta_input"], np.float64)
    diagonal = s * (1 - s) * delta
    k = s.size
    columns = as_table([(n,) for n in range(k)], [k])
    rows = [grid(layer, "s = softmax(z)", columns, lambda n: f"s{spot(n)}",
                 lambda n: ("output", n)),
            grid(layer, "δ arriving (∂L/∂s)", columns, lambda n: f"δ{spot(n)}",
                 lambda n: ("delta_output", n)),
            grid(layer, "δz with the full Jacobian (the rule's)", columns,
                 lambda n: f"δz{spot(n)}", lambda n: ("delta_input", n)),
            grid(layer, "δz with the diagonal only (seed 001's slip)", columns,
                 lambda n: f"δz′{spot(n)}", None, diagonal[None, :])]
    jacobian = np.diag(s) - np.outer(s, s)
    pairs = as_table(list(np.ndindex(k, k)), [k])
    matrix = grid(layer, "the full Jacobian ∂s/∂z = diag(s) − s sᵀ", pairs,
                  lambda ij: f"J{spot(ij)}", None, jacobian)
    j = largest(full)
    inner = float(s @ delta)
    s_j, s_where = layer.entry("output", j)
    d_j, d_where = layer.entry("delta_output", j)
    equations = (
        recorded(layer, f"δz{spot(j)}", "delta_input", j, [
            Term(f"s{spot(j)}", s_j, f"δ{spot(j)}", d_j, s_where, d_where),
            Term(f"s{spot(j)}", s_j, "(−⟨s, δ⟩)", -inner, s_where, "")]),
        Equation(f"δz′{spot(j)} (diagonal only)", (
            Term(f"s{spot(j)}(1 − s{spot(j)})", s_j * (1 - s_j), f"δ{spot(j)}", d_j, "",
                 d_where),), float(diagonal[j])))
    gap = float(np.max(np.abs(full - diagonal)) / max(np.max(np.abs(full)), 1e-300))
    after = (" With the quadratic loss above it, δ = s − y." if layer.last and
             layer.loss == "quadratic" else "")
    text = (f"Every s depends on every z (they share the normaliser), so δz = Jᵀδ with the "
            f"full {k}×{k} Jacobian: δz = s ⊙ (δ − ⟨s, δ⟩). Seed 001 keeps only the diagonal, "
            f"s(1 − s) ⊙ δ.{after} On these numbers the two differ by {gap:.3g} of the "
            f"largest δz (max |δz − δz′| / max |δz|), and in sign at "
            f"{int(np.sum(np.sign(full) != np.sign(diagonal)))} of the {k} entries.")
    return [Step("Softmax: the full Jacobian against the diagonal", text,
                 (*rows, matrix), equations)]


def _batch_norm_steps(layer: Layer) -> List[Step]:
    x = np.asarray(layer["input"], np.float64)
    p = largest(layer["delta_input"])
    c = p[-1]
    values = x[..., c]
    count = values.size
    mean = float(values.mean())
    sigma = float(np.sqrt(values.var() + float(layer.hyper["eps"])))
    x_hat = (values - mean) / sigma
    scale, scale_where = layer.entry("scale", (c,))
    g = np.asarray(layer["delta_output"], np.float64)[..., c] * scale
    mean_g, mean_gx = float(g.mean()), float((g * x_hat).mean())
    spot_p = p[:-1]
    d_p, d_where = layer.entry("delta_output", p)
    g_p, xh_p = float(g[spot_p]), float(x_hat[spot_p])
    statistics = Grid(f"channel {c}'s statistics over this example's {count} positions",
                      np.array([[mean, sigma, mean_g, mean_gx]]),
                      (("μ", "σ", "mean(g)", "mean(g·x̂)"),))
    equations = (
        Equation(f"g{spot(p)}", (Term(f"δ{spot(p)}", d_p, f"scale[{c}]", scale, d_where,
                                      scale_where),), g_p),
        recorded(layer, f"δx{spot(p)}", "delta_input", p, [
            Term(f"g{spot(p)}", g_p, "1/σ", 1 / sigma),
            Term("−mean(g)", -mean_g, "1/σ", 1 / sigma),
            Term(f"−x̂{spot(p)}·mean(g·x̂)", -xh_p * mean_gx, "1/σ", 1 / sigma)]),
        recorded(layer, f"∂L/∂scale[{c}]", "grad_scale", (c,), [Term(
            f"(Σ δ·x̂ over the {count} positions)",
            float(np.sum(np.asarray(layer["delta_output"], np.float64)[..., c] * x_hat)),
            "", 1.0)]),
        recorded(layer, f"∂L/∂offset[{c}]", "grad_offset", (c,), [Term(
            f"(Σ δ over the {count} positions)",
            float(np.sum(layer["delta_output"][..., c], dtype=np.float64)), "", 1.0)]))
    running = ""
    if "mean" in layer.state:
        running = (f" Evaluation would use the running statistics instead (mean "
                   f"{float(layer.state['mean'][c]):.4g}, variance "
                   f"{float(layer.state['var'][c]):.4g} for channel {c}), a fixed affine map "
                   f"whose δ is just δ·scale/σ.")
    text = (f"Batch norm's μ and σ are averages of every x of the channel, so moving one x "
            f"moves them too: with g = δ·scale the rule has three terms, "
            f"δx = (g − mean(g) − x̂·mean(g·x̂))/σ. The first alone, g/σ = {g_p / sigma:.4g}, "
            f"is what a rule that took μ and σ for constants would send down. Here the batch "
            f"is this one example, so the statistics run over its {count} positions."
            + running)
    return [Step("Batch norm: three terms", text, (statistics,), equations)]


def _residual_steps(layer: Layer) -> List[Step]:
    p = largest(layer["delta_input"])
    q = largest(layer["output"])
    equations = (
        recorded(layer, f"y{spot(q)}", "output", q, [
            term(layer, (f"layers(x){spot(q)}", "layers/output", q), None),
            term(layer, (f"shortcut(x){spot(q)}", "shortcut/output", q), None)]),
        recorded(layer, f"δx{spot(p)}", "delta_input", p, [
            term(layer, (f"δ via layers{spot(p)}", "layers/delta_input", p), None),
            term(layer, (f"δ via shortcut{spot(p)}", "shortcut/delta_input", p), None)]))
    text = ("The block's input feeds two paths, its layers and its shortcut, and their "
            "outputs are added. Backward, the sum hands the arriving δ to both paths "
            "unchanged; each path sends its own δ down to the input, and there the fork adds "
            "them: the input's δ is the sum of both paths' deltas. The shortcut carries δ "
            "past the layers, so it cannot fade in them.")
    return [Step("The fork adds two deltas", text, (), equations)]


STEPS: Dict[str, Callable[[Layer], List[Step]]] = {
    "conv": _conv_steps, "max_pool": _max_pool_steps, "channel_max": _channel_max_steps,
    "dense": _dense_steps, "softmax": _softmax_steps, "batch_norm": _batch_norm_steps,
    "residual": _residual_steps}


def worked_steps(layer: Layer) -> List[Step]:
    """The layer type's worked steps (an elementwise layer's: δ times f′), or none."""
    if layer.type in STEPS:
        return STEPS[layer.type](layer)
    return _elementwise_steps(layer) if layer.index in layer.slopes else []
