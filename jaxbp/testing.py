"""The public rule checker: a hand-derived `jax.custom_vjp` rule against JAX's own gradient.

`check_rule(hand, reference, *args, **hyperparameters)` runs `hand` (a layer whose backward
is a hand-derived rule) and `reference` (its plain twin, differentiated by JAX) on the same
arguments and compares forward values, vector-Jacobian products, finite differences,
grad-of-grad and the results under `jax.jit` and `jax.vmap`, raising `RuleMismatch` with a
one-line message at the first disagreement. It returns a `RuleReport` of every error and of
the bytes each backward keeps.

Errors are measured with `relative_error`, max|actual - expected| / max|expected|, against
`TOLERANCE` per dtype: the project's one definition of "agrees".
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

TOLERANCE = {"float64": 1e-10, "float32": 1e-4}

# Central differences (float64 only) step this far along directions scaled to max-norm 1, so
# no element moves further. Truncation error is O(step^2) ~ 1e-12 of the curvature and
# rounding error O(eps |f| / step) ~ 1e-10 of the values, both well under the tolerance;
# an error normalised by |vjp|_2 |v|_2 does not blow up where the directional derivative
# cancels to nearly 0. In float32 eps / step is ~0.1: a difference there means little.
FD_STEP = 1e-6
FD_TOLERANCE = 1e-6

# Drawn values are normal times a per-element scale 10^u, u uniform in this range: both
# signs, two orders of magnitude, so a rule wrong only for negative or for small inputs shows.
_LOG10_SCALES = (-1.5, 0.5)


def tolerance(dtype) -> float:
    """The largest relative error allowed for `dtype` (a name, NumPy or JAX dtype)."""
    name = jnp.dtype(dtype).name
    if name not in TOLERANCE:
        raise ValueError(f"no tolerance for dtype {name}; known: {', '.join(TOLERANCE)}")
    return TOLERANCE[name]


def relative_error(actual, expected) -> float:
    """max|actual - expected| / max|expected|; the absolute error max|actual| where expected is
    all zero. NaN anywhere gives NaN, which no `error <= tolerance` accepts.

    Args:
      actual, expected: arrays (or scalars) of one shape.

    Returns:
      A Python float.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"relative_error: shapes differ, {actual.shape} vs {expected.shape}")
    error = float(np.max(np.abs(actual - expected), initial=0.0))
    scale = float(np.max(np.abs(expected), initial=0.0))
    return error / scale if scale > 0 else error


def residual_bytes(fn: Callable, *args) -> int:
    """Bytes of the arrays the pullback of `jax.vjp(fn, *args)` closes over, each counted once,
    leaving out the inputs themselves (a rule that saves x keeps no more than x already is).

    Traced only (`jax.make_jaxpr`), nothing runs. The pullback's leaves are the outputs of the
    traced program; literals and inputs passed straight through are not residuals.
    """
    closed = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a)[1])(*args)
    inputs = set(closed.jaxpr.invars)
    seen, total = set(), 0
    for var in closed.jaxpr.outvars:
        if isinstance(var, jex.Literal) or var in inputs or var in seen:
            continue
        seen.add(var)
        total += var.aval.size * var.aval.dtype.itemsize
    return total


class RuleMismatch(AssertionError):
    """A hand rule disagrees with its reference; the message is one line: the rule's name,
    the argument, the check and the error against the tolerance."""


class CheckOptions(NamedTuple):
    """What `check_rule` checks, and how hard.

    Attributes:
      dtype: "float64" or "float32"; floating inputs are cast to it. x64 is switched on for
        the duration of the call only.
      argnums: positional indices of the arguments to differentiate; None means every
        floating array argument.
      cotangents: random cotangents for the VJP check.
      directions: random directions per argument for the finite-difference check (float64).
      tolerance: max relative error; None means `tolerance(dtype)`.
      second_order: check grad-of-grad (reverse over reverse).
      transforms: check the forward and VJP under `jax.jit` and `jax.vmap`.
      seed: seed of every draw (inputs, cotangents, directions).
    """
    dtype: str = "float64"
    argnums: Optional[tuple] = None
    cotangents: int = 3
    directions: int = 2
    tolerance: Optional[float] = None
    second_order: bool = True
    transforms: bool = True
    seed: int = 0


class RuleReport(NamedTuple):
    """Every error `check_rule` measured (all within tolerance, or it would have raised).

    Per-argument tuples follow `arguments`; each entry is the worst over the cotangents,
    directions or second arguments. None marks a check that did not run.

    Attributes:
      name: the rule's name.
      dtype: the dtype checked in.
      tolerance: the relative tolerance applied.
      arguments: the differentiable arguments, as "index (name)".
      forward_error: the forward against the reference's (plain call and `jax.vjp`'s primal).
      vjp_errors: relative error of each argument's gradient.
      fd_errors: finite-difference error per argument (normalised, see `FD_TOLERANCE`);
        None in float32 or with no directions.
      second_order_errors: grad-of-grad error per argument; None when off.
      jit_error, vmap_error: worst forward or gradient error under the transform; None when off.
      residual_bytes: bytes the hand rule's backward keeps (`residual_bytes`).
      reference_residual_bytes: the same for JAX's backward of the reference.
    """
    name: str
    dtype: str
    tolerance: float
    arguments: Tuple[str, ...]
    forward_error: float
    vjp_errors: Tuple[float, ...]
    fd_errors: Optional[Tuple[float, ...]]
    second_order_errors: Optional[Tuple[float, ...]]
    jit_error: Optional[float]
    vmap_error: Optional[float]
    residual_bytes: int
    reference_residual_bytes: int

    def __str__(self) -> str:
        if self.fd_errors is not None:
            fd_row = ("finite differences", *map(_format_error, self.fd_errors))
            fd_note = f"finite differences: step {FD_STEP:g}, tolerance {FD_TOLERANCE:g}"
        else:
            fd_row = ("finite differences", *("skipped",) * len(self.arguments))
            fd_note = ("finite differences skipped: meaningless in float32"
                       if self.dtype == "float32" else "finite differences off")
        rows = [("gradient of", *self.arguments), ("vjp", *map(_format_error, self.vjp_errors)),
                fd_row, ("second order", *(map(_format_error, self.second_order_errors)
                                           if self.second_order_errors is not None
                                           else ("off",) * len(self.arguments)))]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                 for row in rows]
        return "\n".join([
            f"{self.name}: {self.dtype}, relative tolerance {self.tolerance:g}",
            *table,
            f"forward {_format_error(self.forward_error)}, jit {_format_error(self.jit_error)}, "
            f"vmap {_format_error(self.vmap_error)}; {fd_note}",
            f"residuals: {self.residual_bytes} bytes (reference "
            f"{self.reference_residual_bytes} bytes)"])


def _format_error(error: Optional[float]) -> str:
    return "off" if error is None else f"{error:.1e}"


class _Rule(NamedTuple):
    """What every comparison needs to say which rule, which argument and how close."""
    name: str
    labels: Tuple[str, ...]   # "argument i (name)" per positional argument
    tolerance: float


def _compare(rule: _Rule, what: str, actual, expected) -> float:
    """relative_error(actual, expected), raising RuleMismatch("<rule>: <what>: ...") when the
    shapes or dtypes differ or the error exceeds the tolerance."""
    got = (getattr(actual, "shape", None), getattr(actual, "dtype", None))
    want = (expected.shape, expected.dtype)
    if got != want:
        raise RuleMismatch(f"{rule.name}: {what}: got shape {got[0]} dtype {got[1]}, "
                           f"the reference shape {want[0]} dtype {want[1]}")
    error = relative_error(actual, expected)
    if not error <= rule.tolerance:
        raise RuleMismatch(f"{rule.name}: {what}: relative error {error:.2e} > tolerance "
                           f"{rule.tolerance:g}")
    return error


def _under(rule: _Rule, transform: str, compute: Callable):
    """compute(), with an exception the rule raises under `transform` as a RuleMismatch: its
    forward was already traced once (check 1), so this is the rule's failure, not bad usage."""
    try:
        return compute()
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RuleMismatch(f"{rule.name}: under {transform}, the rule raised "
                           f"{type(error).__name__}: {first}") from error


def _rule_name(fn) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__",
                                                    type(fn).__name__)


def _positional_names(fn) -> Tuple[str, ...]:
    """The names of `fn`'s positional parameters, in order, up to the first that is not."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    names = []
    for parameter in parameters:
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(parameter.name)
    return tuple(names)


def _bind(fn, count: int, hyperparameters: dict) -> Tuple[Callable, Tuple[str, ...]]:
    """`fn` with the hyperparameters fixed, as a function of `count` positional arguments, and
    the labels of those: "argument i (name)", "argument i" where `fn` names none.

    A hyperparameter may name a positional parameter (dropout's `rate` in `dropout(x, rate,
    key)`): the arguments then fill the positional parameters it leaves free, in order, and
    the hyperparameter is passed in its own place, so `check_rule(dropout, ref, x, key,
    rate=0.3)` calls `dropout(x, 0.3, key)`, not `dropout(x, key, rate=0.3)`.
    """
    names = _positional_names(fn)
    free = [name for name in names if name not in hyperparameters]
    labels = tuple(f"argument {i} ({free[i]})" if i < len(free) else f"argument {i}"
                   for i in range(count))
    # The positional parameters the arguments reach (none known if fn does not name them all).
    reached = names[:names.index(free[count - 1]) + 1] if 0 < count <= len(free) else ()
    if not any(name in hyperparameters for name in reached):
        return functools.partial(fn, **hyperparameters), labels
    keywords = {k: v for k, v in hyperparameters.items() if k not in reached}

    def bound(*args):
        values = iter(args)
        return fn(*(hyperparameters[name] if name in hyperparameters else next(values)
                    for name in reached), **keywords)
    return bound, labels


def _draw(rng: np.random.Generator, shape: Sequence[int], dtype) -> np.ndarray:
    """Normal values times per-element scales 10^u (u in `_LOG10_SCALES`): mixed signs, scales
    over two orders of magnitude, no ties or zeros to speak of.

    NumPy throughout, here and wherever inputs are derived: every JAX op run outside the
    compared functions would compile on its own, and those compiles would dominate.
    """
    values = rng.standard_normal(shape) * 10.0 ** rng.uniform(*_LOG10_SCALES, shape)
    return np.asarray(values, dtype)


def _is_floating(value) -> bool:
    """Floating arrays are drawn, differentiated and mapped; None and every other array
    (integer labels, PRNG keys, raw or typed) pass through as given."""
    return value is not None and jnp.issubdtype(value.dtype, jnp.floating)


def _is_shape(spec) -> bool:
    return isinstance(spec, tuple) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in spec)


def _prepare(spec, label: str, dtype: str, rng: np.random.Generator):
    """One positional argument as passed to both twins, and whether it was drawn."""
    if spec is None:
        return None, False
    if isinstance(spec, jax.ShapeDtypeStruct):
        if not jnp.issubdtype(spec.dtype, jnp.floating):
            raise ValueError(f"{label}: a shape was given with dtype {spec.dtype}, but only "
                             f"floating arguments are drawn; pass integer arrays (labels) as "
                             f"arrays")
        return _draw(rng, spec.shape, dtype), True
    if _is_shape(spec):
        return _draw(rng, spec, dtype), True
    if isinstance(spec, (np.ndarray, jax.Array)):
        return (np.asarray(spec, dtype) if _is_floating(spec) else spec), False
    raise TypeError(f"{label}: expected an array, None, a jax.ShapeDtypeStruct or a shape (a "
                    f"tuple of ints), got {type(spec).__name__} {spec!r}; hyperparameters are "
                    f"keyword arguments")


def _resolve_argnums(requested: Optional[tuple], args: tuple, labels: Tuple[str, ...]):
    """The differentiable positional indices: `requested`, checked, or every floating one."""
    if requested is None:
        argnums = tuple(i for i, a in enumerate(args) if _is_floating(a))
    else:
        argnums = tuple(requested)
        for i in argnums:
            if not isinstance(i, (int, np.integer)) or not 0 <= i < len(args):
                raise ValueError(f"argnums {requested!r}: {i!r} is not the index of one of the "
                                 f"{len(args)} positional arguments")
            if not _is_floating(args[i]):
                kind = "None" if args[i] is None else str(args[i].dtype)
                raise ValueError(f"argnums {requested!r}: {labels[i]} is {kind}, not floating, "
                                 f"so it has no gradient to check")
    if not argnums:
        raise ValueError("no floating array argument to differentiate")
    return argnums


def _second_member(rng: np.random.Generator, args: tuple, drawn: Sequence[bool], dtype: str):
    """A second, different set of arguments to stack with `args` for the vmap check."""
    def other(arg, was_drawn):
        if not _is_floating(arg):
            return arg
        if was_drawn:
            return _draw(rng, arg.shape, dtype)
        # A given array may carry structure the caller built in (a one-hot target, positive
        # scales); a relative nudge of at most 10% keeps its signs and zeros.
        return arg * np.asarray(1 + 0.1 * rng.uniform(-1, 1, arg.shape), dtype)
    return tuple(other(a, d) for a, d in zip(args, drawn))


def _with(args: tuple, argnums: Sequence[int], values: Sequence) -> tuple:
    """`args` with `args[argnums[k]]` replaced by `values[k]`."""
    args = list(args)
    for i, value in zip(argnums, values):
        args[i] = value
    return tuple(args)


def _sub_jaxprs(params: dict):
    """The jaxprs among an equation's parameters (jit's, cond's branches, scan's body...),
    recognised by their equations rather than by a class that has moved between versions."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)   # a closed jaxpr wraps its jaxpr
            if hasattr(inner, "eqns"):
                yield inner


def _has_custom_vjp(jaxpr) -> bool:
    """Whether a custom_vjp call appears anywhere in `jaxpr`, sub-jaxprs included; the
    primitive's name varies between JAX versions (custom_vjp_call, custom_vjp_call_jaxpr),
    "custom_vjp" is in all of them."""
    return any("custom_vjp" in eqn.primitive.name
               or any(_has_custom_vjp(sub) for sub in _sub_jaxprs(eqn.params))
               for eqn in jaxpr.eqns)


def _evaluation(fn: Callable, argnums: Tuple[int, ...]) -> Callable:
    """(args, cotangent) -> (fn(*args), jax.vjp's primal, the cotangent pulled back to each
    of `args[argnums]`). The plain call and jax.vjp's primal run different code in a rule
    (the primal function, then `fwd`), so both are compared."""
    def evaluate(args, cotangent):
        def of_differentiable(*values):
            return fn(*_with(args, argnums, values))
        primal, pullback = jax.vjp(of_differentiable, *(args[i] for i in argnums))
        return fn(*args), primal, pullback(cotangent)
    return evaluate


def _second_order(fn: Callable, argnums: Tuple[int, ...]) -> Callable:
    """(args, cotangent, second cotangents) -> for each differentiable argument i, the VJP of
    args -> vjp(cotangent)[i] with second cotangent i, w.r.t. every differentiable argument."""
    def second(args, cotangent, second_cotangents):
        def gradient(i):
            def of_differentiable(*values):
                return jax.vjp(lambda *v: fn(*_with(args, argnums, v)), *values)[1](cotangent)[i]
            return of_differentiable
        values = tuple(args[i] for i in argnums)
        return tuple(jax.vjp(gradient(n), *values)[1](d)
                     for n, d in enumerate(second_cotangents))
    return second


def _check_evaluation(rule: _Rule, prefix: str, argnums, got, want, cotangent: str) -> list:
    """Errors of a hand `_evaluation` against the reference's (forward, then each gradient)."""
    plain, primal, grads = got
    expected_out, _, expected_grads = want
    errors = [_compare(rule, f"{prefix}forward differs from the reference", plain, expected_out),
              _compare(rule, f"{prefix}forward differs from the reference (jax.vjp's primal, "
                             f"the rule's fwd)", primal, expected_out)]
    return errors + [_compare(rule, f"{prefix}gradient of {rule.labels[i]} differs from the "
                                    f"reference's for {cotangent}", g, e)
                     for i, g, e in zip(argnums, grads, expected_grads)]


def _finite_difference_errors(rule: _Rule, forward: Callable, args: tuple, argnums, cotangent,
                              grads, directions: int, rng: np.random.Generator) -> tuple:
    """Per argument, the worst over `directions` random v of
    |(<f(x + h v), c> - <f(x - h v), c>) / 2h - <vjp(c), v>| / (|vjp(c)|_2 |v|_2), f being
    `forward(args)`."""
    c = np.asarray(cotangent, np.float64)
    errors = []
    for i, grad in zip(argnums, grads):
        grad = np.asarray(grad, np.float64)
        worst = 0.0
        for k in range(directions):
            v = _draw(rng, args[i].shape, np.float64)
            v = v / (np.max(np.abs(v), initial=0.0) or 1.0)
            plus, minus = (np.asarray(forward(_with(args, (i,), (np.asarray(
                args[i] + sign * FD_STEP * v, args[i].dtype),))), np.float64)
                for sign in (1, -1))
            difference = abs(np.sum((plus - minus) * c) / (2 * FD_STEP) - np.sum(grad * v))
            scale = float(np.linalg.norm(grad) * np.linalg.norm(v))
            error = difference / scale if scale > 0 else difference
            if not error <= FD_TOLERANCE:
                raise RuleMismatch(
                    f"{rule.name}: finite differences disagree with the gradient of "
                    f"{rule.labels[i]} along direction {k + 1} of {directions}: error "
                    f"{error:.2e} > tolerance {FD_TOLERANCE:g} (normalised by |vjp| |v|)")
            worst = max(worst, error)
        errors.append(worst)
    return tuple(errors)


def _second_order_errors(rule: _Rule, hand: Callable, reference: Callable, args: tuple,
                         argnums, cotangent, rng: np.random.Generator) -> tuple:
    """Per argument i, the worst over j of d(vjp(c)[i] . d_i)/d arg j, hand against reference."""
    second_cotangents = tuple(_draw(rng, args[i].shape, args[i].dtype) for i in argnums)
    got = _under(rule, "grad of grad", lambda: jax.jit(_second_order(hand, argnums))(
        args, cotangent, second_cotangents))
    want = jax.jit(_second_order(reference, argnums))(args, cotangent, second_cotangents)
    return tuple(max(_compare(rule, f"second order (grad of grad) differs: the derivative of "
                                    f"the gradient of {rule.labels[i]} with respect to "
                                    f"{rule.labels[j]}", g, w)
                     for j, g, w in zip(argnums, got_i, want_i))
                 for i, got_i, want_i in zip(argnums, got, want))


def check_rule(hand: Callable, reference: Callable, *args, options: CheckOptions = CheckOptions(),
               **hyperparameters) -> RuleReport:
    """Checks a hand-derived custom_vjp rule against JAX's gradient of its plain twin.

    Both are called as `fn(*args, **hyperparameters)` and must return one array; the
    hyperparameters are static (closed over, never traced). A hyperparameter that names a
    positional parameter is passed in its place, the arguments filling the others in order
    (`check_rule(dropout, ref, x, key, rate=0.3)` calls `dropout(x, 0.3, key)`). Each
    positional argument is an array, None (passed through, e.g. an absent bias), or a shape
    to draw, a `jax.ShapeDtypeStruct` or a tuple of ints. Floating arrays are cast to
    `options.dtype`; every other array (integer labels, a PRNG key, raw or typed) is passed
    through as given: never drawn, differentiated or mapped under vmap. Drawn values,
    cotangents and directions are normal times per-element scales over two orders of
    magnitude, both signs (NumPy's `default_rng(options.seed)`). Continuous draws sit on a
    tie or a kink (relu's 0, max pooling's equal values) within the finite-difference step
    with probability ~1e-5 per element; if a case still trips there, change the seed.

    The checks, in order; the first failure raises:
      1. `hand` carries a custom_vjp in its traced program (a plain function would only be
         compared with itself).
      2. forward: the plain call and `jax.vjp`'s primal have the reference's shape and dtype
         and are within the tolerance ("forward differs").
      3. VJP of each differentiable argument against `jax.vjp` of the reference, for
         `options.cotangents` random cotangents ("gradient of argument i (name)"). The
         cotangents are deliberately not uniform: an all-ones cotangent hides whole terms,
         e.g. the x̂·mean(δ·x̂) term of a normalisation's backward (mean(x̂) = 0) and the
         off-diagonal -s sᵀδ of softmax's (the outputs sum to a constant).
      4. finite differences, a second oracle independent of JAX's autodiff: for
         `options.directions` random v per argument (scaled to max-norm 1), the central
         difference of <f(x + h v), c> with h = `FD_STEP` = 1e-6 against <vjp(c), v>, the
         error normalised by |vjp(c)|_2 |v|_2 so cancellation does not inflate it, within
         `FD_TOLERANCE` = 1e-6 (truncation ~h², rounding ~eps/h, both far below). Float64
         only: in float32 eps/h ~ 0.1 and the check is skipped (the report says so).
      5. second order (reverse over reverse): for each argument i, args -> vjp(c)[i]
         differentiated again, with a random cotangent, w.r.t. every differentiable argument,
         against the reference's. A backward that blocks its own derivative (stop_gradient on
         its residuals) passes 1-4 and fails here.
      6. under `jax.jit` applied to `hand` itself (its VJP then goes through jit's own
         differentiation rules, as in `jax.grad(jax.jit(layer))`), and under `jax.vmap` over
         a new leading axis stacking the floating arguments with a second draw (given floating
         arrays nudged by up to 10%; the others unmapped, in_axes None), the forward and VJP
         match the reference's. Each member is a whole call: a layer with batch statistics
         (batch norm) computes them per member, which the reference on each member checks.
      7. residuals: `residual_bytes` of hand and of reference, reported only.
    Each compared function is compiled once: checks 2-4 trace `hand` inside one jit, reused
    for every cotangent and finite difference (running the rule op by op would compile each
    op instead, several times slower). An exception the rule raises under jit, grad of grad
    or vmap (NumPy on a tracer, an unbatchable callback) is a RuleMismatch too.

    Args:
      hand: the layer whose backward is a hand-derived custom_vjp rule.
      reference: its plain twin, taking the same arguments.
      *args: positional arguments (arrays, None or shapes), as above.
      options: a `CheckOptions`.
      **hyperparameters: static keyword arguments of both.

    Returns:
      A `RuleReport`.

    Raises:
      RuleMismatch: at the first check that fails, with a one-line message.
      ValueError, TypeError: bad usage (an argument that cannot be drawn or differentiated,
        an unknown dtype).
    """
    tolerance(options.dtype)
    if options.cotangents < 1 or options.directions < 0:
        raise ValueError(f"need cotangents >= 1 and directions >= 0, got {options.cotangents} "
                         f"and {options.directions}")
    with jax.enable_x64(True):
        return _check(hand, reference, args, options, hyperparameters)


def _check(hand, reference, specs, options: CheckOptions, hyperparameters) -> RuleReport:
    """`check_rule` with x64 on."""
    rng = np.random.default_rng(options.seed)
    name = _rule_name(hand)
    hand, labels = _bind(hand, len(specs), hyperparameters)
    reference = _bind(reference, len(specs), hyperparameters)[0]
    prepared = [_prepare(s, label, options.dtype, rng) for s, label in zip(specs, labels)]
    args = tuple(value for value, _ in prepared)
    argnums = _resolve_argnums(options.argnums, args, labels)
    rule = _Rule(name, labels, options.tolerance if options.tolerance is not None
                 else tolerance(options.dtype))

    if not _has_custom_vjp(jax.make_jaxpr(hand)(*args).jaxpr):
        raise RuleMismatch(f"{rule.name}: no custom_vjp in the traced program of hand, so its "
                           f"gradient is JAX's own (is hand the plain reference?)")

    out = jax.eval_shape(reference, *args)
    cotangents = [_draw(rng, out.shape, out.dtype) for _ in range(options.cotangents)]
    # Compiled once each and reused for every cotangent (and, the hand's, every finite
    # difference): a few compiles per rule, where running the rule op by op costs more.
    expected = jax.jit(_evaluation(reference, argnums))
    evaluate = jax.jit(_evaluation(hand, argnums))
    expected_first = expected(args, cotangents[0])
    got_first = _under(rule, "jit", lambda: evaluate(args, cotangents[0]))
    forward_error, primal_error, *first_errors = _check_evaluation(
        rule, "", argnums, got_first, expected_first, f"cotangent 1 of {options.cotangents}")
    vjp_errors = [first_errors]
    for k, cotangent in enumerate(cotangents[1:], start=2):
        vjp_errors.append(_check_evaluation(
            rule, "", argnums, evaluate(args, cotangent), expected(args, cotangent),
            f"cotangent {k} of {options.cotangents}")[2:])

    fd_errors = None
    if options.dtype == "float64" and options.directions:
        fd_errors = _finite_difference_errors(
            rule, lambda a: evaluate(a, cotangents[0])[0], args, argnums, cotangents[0],
            got_first[2], options.directions, rng)

    second_order_errors = None
    if options.second_order:
        second_order_errors = _second_order_errors(rule, hand, reference, args, argnums,
                                                   cotangents[0], rng)

    jit_error = vmap_error = None
    if options.transforms:
        # jax.jit applied to the rule itself: its VJP then goes through jit's own
        # differentiation (partial evaluation of a jitted custom_vjp), as in grad(jit(layer)).
        jitted = _under(rule, "jit", lambda: jax.jit(_evaluation(jax.jit(hand), argnums))(
            args, cotangents[0]))
        jit_error = max(_check_evaluation(rule, "under jit, ", argnums, jitted, expected_first,
                                          "cotangent 1"))
        other = _second_member(rng, args, [drawn for _, drawn in prepared], options.dtype)
        other_cotangent = _draw(rng, out.shape, out.dtype)
        mapped = tuple(0 if _is_floating(a) else None for a in args)
        stacked = tuple(np.stack([a, b]) if axis == 0 else a
                        for a, b, axis in zip(args, other, mapped))
        stacked_cotangents = np.stack([cotangents[0], other_cotangent])
        batched = _under(rule, "vmap", lambda: jax.jit(jax.vmap(
            _evaluation(hand, argnums), in_axes=(mapped, 0)))(stacked, stacked_cotangents))
        vmap_error = max(
            max(_check_evaluation(rule, f"under vmap (member {m + 1} of 2), ", argnums,
                                  jax.tree_util.tree_map(lambda a: np.asarray(a)[m], batched),
                                  want,
                                  "its cotangent"))
            for m, want in enumerate([expected_first, expected(other, other_cotangent)]))

    return RuleReport(
        name=rule.name, dtype=options.dtype, tolerance=rule.tolerance,
        arguments=tuple(rule.labels[i].removeprefix("argument ") for i in argnums),
        forward_error=max(forward_error, primal_error),
        vjp_errors=tuple(map(max, zip(*vjp_errors))), fd_errors=fd_errors,
        second_order_errors=second_order_errors, jit_error=jit_error, vmap_error=vmap_error,
        residual_bytes=residual_bytes(hand, *args),
        reference_residual_bytes=residual_bytes(reference, *args))
