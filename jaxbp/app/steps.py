"""The jitted steps, as in Flax's examples/mnist: train (value_and_grad with `has_aux`, so
the forward runs once for the loss and the accuracy count, then the optax update) and eval.

Running totals (loss sum, correct count) stay on the device; the host reads them once per
epoch. The state and the totals are donated. The step is deterministic on CPU.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxbp.registry import HAND


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


class Totals(NamedTuple):
    """Running sums over the batches seen so far, kept on the device."""
    loss: jax.Array      # sum over batches of the batch-mean loss (train) or of the loss sum (eval)
    correct: jax.Array   # number of correctly classified images


def count_correct(outputs, labels):
    return jnp.sum(jnp.argmax(outputs, axis=-1).astype(labels.dtype) == labels, dtype=jnp.int32)


def zero_totals(dtype) -> Totals:
    return Totals(jnp.zeros((), dtype), jnp.zeros((), jnp.int32))


def make_train_step(model, optimizer: optax.GradientTransformation, dtype,
                    ops=HAND) -> Callable:
    """jit(state, totals, images, labels) -> (state, totals), with state and totals donated;
    `ops` the primitives to run through (the hand rules; the benchmark also times others)."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(state: TrainState, totals: Totals, images, labels):
        images = images.astype(dtype)
        (loss, outputs), grads = jax.value_and_grad(model.loss, has_aux=True)(
            state.params, images, labels, ops=ops)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = count_correct(outputs, labels)
        return TrainState(params, opt_state), Totals(totals.loss + loss, totals.correct + correct)

    return train_step


def make_eval_step(model, dtype) -> Callable:
    """jit(params, totals, images, labels) -> totals; totals donated."""

    @functools.partial(jax.jit, donate_argnums=(1,))
    def eval_step(params, totals: Totals, images, labels):
        images = images.astype(dtype)
        loss, outputs = model.loss(params, images, labels, ops=HAND)
        correct = count_correct(outputs, labels)
        return Totals(totals.loss + loss * images.shape[0], totals.correct + correct)

    return eval_step


@jax.jit
def _all_finite(tree):
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]
    return functools.reduce(jnp.logical_and, flags, jnp.bool_(True))


def all_finite(tree) -> bool:
    """Whether every entry of every array in `tree` is finite (one device-to-host read)."""
    return bool(_all_finite(tree))
