"""Faster formulations of the hand rules, chosen per shape: the same equations, computed
another way (as cs231n's fast_layers.py sits beside its layers.py).

The rule files (`jaxbp/layers/conv.py`, `jaxbp/layers/pooling.py`) read like the derivation:
a forward, the deltas and the vjp wiring, each gradient in its plain form. Each forward or
gradient that has alternatives is a *slot*; the rule file holds its plain formulation, this
package the others, each with a *name*:

  slot               plain formulation (rule file)                 alternatives (here)
  conv.forward       XLA's convolution                             taps, padded
  conv.input_delta   XLA's full correlation with the rotated kernel band
  conv.kernel_grad   XLA's correlation of x with the delta         band
  conv.bias_grad     the delta summed over batch and positions     rows
  pool.spread        a sum of shifted window deltas (any windows)  tiled

`jaxbp/fast/conv.py` and `jaxbp/fast/pooling.py` define them; each `Formulation` says
whether it `applies` to some static shapes at all, and by what measured rule it is
`selected` (the measurements: `experiments/results/README.md`).

The hook, the one way a formulation is chosen:

  choose(slot, *shapes) -> Choice
      What the rule's public function calls while it is traced, from static shapes only:
      a forced formulation (`use`), else the first alternative that applies and that its
      measured rule selects, else "plain". Under JAXBP_TUNING=0 (`jaxbp.runtime`) nothing
      is selected, only forced. The `Choice` is hashable and goes into the rule's
      `jax.custom_vjp` as a static (nondiff) argument, so no JAX cache reuses a trace made
      under another choice.
  Choice.run(plain, *arrays, **static)
      Computes the slot inside the rule. A selected formulation measured on one platform
      (all of today's are CPU measurements) runs as `lax.platform_dependent(cpu=fast,
      default=plain)`: the platform is the one the computation is compiled for, so a GPU
      array still gets XLA's (cuDNN's) convolution from a process whose default is the CPU.
      A forced formulation, or one measured on no platform (`tiled`), runs on every one.
  use({slot: name, ...})
      Context manager forcing formulations by name ("plain" forces the rule file's own);
      an unknown slot or name, or a formulation that does not apply to the shapes of a
      call made inside it, is a ValueError naming what was asked and what is allowed.
      Entering and leaving it clears JAX's caches, so that a function jitted (and traced)
      outside the block is traced anew inside it, and the other way round.
  chosen(slot, *shapes) -> str
      The name `choose` picks for these shapes, now.
  names(slot) -> tuple of str
      The slot's formulations, "plain" first.

A slot's shapes are those its rule has when called: `(x_shape, w_shape, geometry)` for
conv (`jaxbp.reference.conv.ConvGeometry`), `(x_shape, geometry)` for pooling
(`jaxbp.reference.pooling.PoolGeometry`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple

import jax
from jax import lax

from jaxbp import runtime

PLAIN = "plain"

SLOTS: Dict[str, str] = {  # slot -> its plain formulation, in the rule file
    "conv.forward": "XLA's convolution (jaxbp.reference.conv.conv_forward)",
    "conv.input_delta": "XLA's full correlation of the delta with the rotated kernel",
    "conv.kernel_grad": "XLA's valid correlation of the padded input with the delta",
    "conv.bias_grad": "the delta summed over batch and positions",
    "pool.spread": "a sum over window offsets of shifted window deltas",
}


class Formulation(NamedTuple):
    """One alternative for a slot.

    compute: the slot's function (same arguments as the plain one, static ones by keyword).
    applies: shapes -> bool, whether it can compute these shapes at all.
    needs: what `applies` asks for, in words (for error messages).
    selected: shapes -> bool, the measured rule choosing it where it applies.
    platform: where the rule was measured ("cpu"), or None where it holds everywhere.
    """
    slot: str
    name: str
    compute: Callable
    applies: Callable[..., bool]
    needs: str
    selected: Callable[..., bool]
    platform: Optional[str] = "cpu"


@functools.lru_cache(maxsize=None)
def _registry() -> Dict[str, Dict[str, Formulation]]:
    # Imported on first use, not at the top: jaxbp/fast/conv.py and pooling.py import
    # `Formulation` from this module.
    from jaxbp.fast import conv, pooling
    table: Dict[str, Dict[str, Formulation]] = {slot: {} for slot in SLOTS}
    for formulation in (*conv.FORMULATIONS, *pooling.FORMULATIONS):
        table[formulation.slot][formulation.name] = formulation
    return table


def names(slot: str) -> Tuple[str, ...]:
    """The slot's formulations: "plain" (the rule file's own) first, then the alternatives in
    the order they are tried."""
    _check_slot(slot, "names")
    return (PLAIN, *_registry()[slot])


def _check_slot(slot: str, caller: str) -> None:
    if slot not in SLOTS:
        raise ValueError(f"jaxbp.fast.{caller}: unknown slot {slot!r}; the slots are "
                         f"{', '.join(SLOTS)}")


class Choice(NamedTuple):
    """The formulation of one slot for one call (hashable: a static argument of a rule)."""
    slot: str
    name: str
    forced: bool = False

    def run(self, plain: Callable, *arrays, **static):
        """`plain(*arrays, **static)`, or the chosen formulation of the same arguments."""
        if self.name == PLAIN:
            return plain(*arrays, **static)
        formulation = _registry()[self.slot][self.name]
        fast = functools.partial(formulation.compute, **static)
        if self.forced or formulation.platform is None:
            return fast(*arrays)
        return lax.platform_dependent(*arrays, **{formulation.platform: fast},
                                      default=functools.partial(plain, **static))


_FORCED: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "jaxbp_fast_forced", default={})


@contextlib.contextmanager
def use(choices: Mapping[str, str]) -> Iterator[None]:
    """Forces formulations by name inside the block, e.g.
    `with jaxbp.fast.use({"conv.input_delta": "band"}): ...`; nested blocks add to (and
    override) the outer ones. Forced formulations run on every platform and whatever
    JAXBP_TUNING says. Entering and leaving clears JAX's caches (`jax.clear_caches`), so no
    trace made under other choices is reused."""
    for slot, name in choices.items():
        _check_slot(slot, "use")
        if name not in names(slot):
            raise ValueError(f"jaxbp.fast.use: {slot} has no formulation {name!r}; its "
                             f"formulations are {', '.join(map(repr, names(slot)))}")
    outer = _FORCED.get()
    inner = {**outer, **choices}
    token = _FORCED.set(inner)
    if inner != outer:  # jit caches traces by function and shapes, not by this choice
        jax.clear_caches()
    try:
        yield
    finally:
        _FORCED.reset(token)
        if inner != outer:
            jax.clear_caches()


def _applying(slot: str, shapes) -> Iterator[Formulation]:
    return (f for f in _registry()[slot].values() if f.applies(*shapes))


def choose(slot: str, *shapes) -> Choice:
    """The formulation of `slot` for these static shapes (see the module docstring)."""
    _check_slot(slot, "choose")
    forced = _FORCED.get().get(slot)
    if forced is not None:
        formulation = _registry()[slot].get(forced)
        if formulation is not None and not formulation.applies(*shapes):
            here = [PLAIN, *(f.name for f in _applying(slot, shapes))]
            raise ValueError(
                f"jaxbp.fast.use: {slot}={forced!r} does not apply to shapes "
                f"{', '.join(map(str, shapes))}: {forced!r} needs {formulation.needs}; "
                f"what applies here: {', '.join(map(repr, here))}")
        return Choice(slot, forced, forced=True)
    if runtime.formulations_enabled():
        for formulation in _applying(slot, shapes):
            if formulation.selected(*shapes):
                return Choice(slot, formulation.name)
    return Choice(slot, PLAIN)


def chosen(slot: str, *shapes) -> str:
    """The name of the formulation `choose` picks for these shapes now."""
    return choose(slot, *shapes).name
