"""The jitted steps, as in Flax's examples/mnist: train (value_and_grad with `has_aux`, so
the forward runs once for the loss and the score, then the optax update) and eval.

Running totals (loss sum, score sum: correct answers, or squared reconstruction errors; in
training, each layer's delta norm and parameter-gradient norm, `jaxbp.app.norms`) stay on the
device; the host reads them once per epoch. The state and the totals are donated. The step is
deterministic on CPU.

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

from jaxbp.app import norms
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
    # Training with norms only (`TrainSteps`), else (): sums over the measuring steps of each
    # layer's delta norm, `(len(model.top_rows),)`, and gradient norm,
    # `(len(norms.trained_layers(model)),)`.
    delta_norms: Any = ()
    grad_norms: Any = ()


def zero_totals(dtype, model=None) -> Totals:
    """Zero totals; given the model, with the zero norm sums of `TrainSteps`."""
    sums = () if model is None else norms.zero_sums(model, dtype)
    return Totals(jnp.zeros((), dtype), jnp.zeros((), dtype), *sums)


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
                    ops=HAND, seed: int = 0, out_sharding=None,
                    with_norms: bool = False) -> Callable:
    """jit(state, totals, images, labels) -> (state, totals), with state and totals donated;
    `ops` the primitives to run through (the hand rules; the benchmark also times others),
    `seed` the run's, for the dropout keys; `out_sharding` where the new state and totals
    live (None: where jit puts them, on the inputs' device). `with_norms`: also add the
    layers' delta and gradient norms (`jaxbp.app.norms`) to the totals' sums, which must
    then be there (`zero_totals(dtype, model)`); without, the step passes any sums through.
    Either way the new state is the same."""

    def train_step(state: TrainState, totals: Totals, images, labels):
        images = images.astype(dtype)

        def objective(params, probes):
            return model.loss(params, images, labels, ops=ops, train=True,
                              rng=step_key(seed, state.step), state=state.model_state,
                              probes=probes)

        probes = norms.zero_probes(model, dtype, images.shape[0]) if with_norms else None
        (loss, (outputs, model_state)), (grads, squares) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True)(state.params, probes)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        score = model.score(outputs, images, labels).astype(totals.score.dtype)
        sums = totals[2:]
        if with_norms:
            values = norms.step_norms(model, grads, squares, images.shape[0])
            sums = [total + value for total, value in zip(sums, values)]
        return (TrainState(params, opt_state, model_state, state.step + 1),
                Totals(totals.loss + loss, totals.score + score, *sums))

    return _jit(train_step, (0, 1), out_sharding)


class TrainSteps(NamedTuple):
    """The train steps of an epoch that logs the layers' norms: `measuring` (with norms) on
    its steps 0, EVERY, 2·EVERY, ... (`norms.EVERY`), `plain` on the others, both given
    `zero_totals(dtype, model)`. Two programs rather than a `lax.cond` between the two
    inside one: under a conditional, XLA's CPU backend ran a LeNet-5 step 90 times slower."""
    plain: Callable
    measuring: Callable

    def at(self, i: int) -> Callable:
        """The step to run as the epoch's i-th (from 0)."""
        return self.measuring if i % norms.EVERY == 0 else self.plain

    def map(self, fn: Callable) -> TrainSteps:
        return TrainSteps(*(fn(step) for step in self))


def make_train_steps(model, optimizer: optax.GradientTransformation, dtype, seed: int = 0,
                     out_sharding=None) -> TrainSteps:
    """`make_train_step` without and with norms, as `jaxbp train` runs them."""
    return TrainSteps(*(make_train_step(model, optimizer, dtype, seed=seed,
                                        out_sharding=out_sharding, with_norms=with_norms)
                        for with_norms in (False, True)))


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
