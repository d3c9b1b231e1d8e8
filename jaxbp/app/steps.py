"""The jitted steps, as in Flax's examples/mnist: train (value_and_grad with `has_aux`, so
the forward runs once for the loss and the score, then the optax update) and eval.

Running totals (loss sum, score sum: correct answers, or squared reconstruction errors) stay
on the device; the host reads them once per
epoch. The state and the totals are donated. The step is deterministic on CPU.

Both steps are written for one global batch; over several devices (`jaxbp.app.parallel`)
they are the same programs, given a replicated state and a batch split over the devices,
and told to leave the new state and totals replicated (`out_sharding`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxbp.registry import HAND


class TrainState(NamedTuple):
    """What a train step carries from one step to the next.

    params: the trainable parameters; opt_state: the optimizer's state; model_state: the
    layers' non-trainable state (batch norm's running statistics; empty dicts for most);
    step: the number of steps taken, from which each step's dropout key is drawn.
    """
    params: Any
    opt_state: Any
    model_state: Any
    step: jax.Array


def step_key(seed: int, step) -> jax.Array:
    """The PRNG key of training step `step` of a run seeded `seed`: a function of the two
    alone, so a resumed run draws the same dropout masks as an uninterrupted one."""
    stream = jax.random.fold_in(jax.random.PRNGKey(seed), _DROPOUT_STREAM)
    return jax.random.fold_in(stream, step)


_DROPOUT_STREAM = 1  # the initial parameters use PRNGKey(seed) itself


class Totals(NamedTuple):
    """Running sums over the batches seen so far, kept on the device."""
    loss: jax.Array    # sum over batches of the batch-mean loss (train) or of the loss sum (eval)
    score: jax.Array   # sum over examples of the model's score (`Model.score`)


def zero_totals(dtype) -> Totals:
    return Totals(jnp.zeros((), dtype), jnp.zeros((), dtype))


def training_loss(model, ops=HAND, seed: int = 0, dtype=jnp.float32) -> Callable:
    """`loss(params, images, labels) -> scalar` as the first train step computes it (training
    mode, the initial layer state, step 0's key): what `jaxbp check` and the benchmark
    differentiate through the hand rules and through the twins."""
    def loss(params, images, labels):
        return model.loss(params, images, labels, ops=ops, train=True,
                          rng=step_key(seed, 0), state=model.init_state(dtype))[0]
    return loss


def _jit(fn: Callable, donate: tuple, out_sharding) -> Callable:
    """jit with `donate` donated and, unless None, every output placed by `out_sharding`."""
    placed = {} if out_sharding is None else {"out_shardings": out_sharding}
    return jax.jit(fn, donate_argnums=donate, **placed)


def make_train_step(model, optimizer: optax.GradientTransformation, dtype,
                    ops=HAND, seed: int = 0, out_sharding=None) -> Callable:
    """jit(state, totals, images, labels) -> (state, totals), with state and totals donated;
    `ops` the primitives to run through (the hand rules; the benchmark also times others),
    `seed` the run's, for the dropout keys; `out_sharding` where the new state and totals
    live (None: where jit puts them, on the inputs' device)."""

    def train_step(state: TrainState, totals: Totals, images, labels):
        images = images.astype(dtype)
        (loss, (outputs, model_state)), grads = jax.value_and_grad(model.loss, has_aux=True)(
            state.params, images, labels, ops=ops, train=True,
            rng=step_key(seed, state.step), state=state.model_state)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        score = model.score(outputs, images, labels).astype(totals.score.dtype)
        return (TrainState(params, opt_state, model_state, state.step + 1),
                Totals(totals.loss + loss, totals.score + score))

    return _jit(train_step, (0, 1), out_sharding)


def make_eval_step(model, dtype, out_sharding=None) -> Callable:
    """jit(params, model_state, totals, images, labels) -> totals; totals donated, placed by
    `out_sharding` as in `make_train_step`. Evaluation mode: batch norm uses its running
    statistics, dropout keeps everything."""

    def eval_step(params, model_state, totals: Totals, images, labels):
        images = images.astype(dtype)
        loss, (outputs, _) = model.loss(params, images, labels, ops=HAND, state=model_state)
        score = model.score(outputs, images, labels).astype(totals.score.dtype)
        return Totals(totals.loss + loss * images.shape[0], totals.score + score)

    return _jit(eval_step, (2,), out_sharding)


@jax.jit
def _all_finite(tree):
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]
    return functools.reduce(jnp.logical_and, flags, jnp.bool_(True))


def all_finite(tree) -> bool:
    """Whether every entry of every array in `tree` is finite (one device-to-host read)."""
    return bool(_all_finite(tree))
