"""Where a network's paths part and meet: the fork and the sum of a residual block
(jaxbp/layers/DERIVATIONS.md §11).

A residual block computes y = main(x) + shortcut(x). Its input is used twice, so by the
chain rule the delta arriving at x is the SUM of the deltas coming back along both paths:
this is the whole lesson of skip connections, and `fork` is where it happens. The sum hands
its delta to both addends unchanged, which is why the shortcut carries δ straight down.
"""
from __future__ import annotations

import jax


@jax.custom_vjp
def fork(x):
    """x to two paths: `(x, x)`.

    Backward: δx = δ₁ + δ₂, the deltas of both paths added up. Saves nothing.
    """
    return x, x


def _fork_fwd(x):
    return (x, x), None


def _fork_bwd(_, deltas):
    delta_main, delta_shortcut = deltas
    return (delta_main + delta_shortcut,)


fork.defvjp(_fork_fwd, _fork_bwd)


@jax.custom_vjp
def add(a, b):
    """a + b (same shapes): where a residual block's two paths meet.

    Backward: δa = δb = δ, the delta passed to each addend unchanged. Saves nothing.
    """
    return a + b


def _add_fwd(a, b):
    return a + b, None


def _add_bwd(_, delta):
    return delta, delta


add.defvjp(_add_fwd, _add_bwd)
