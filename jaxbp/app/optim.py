"""Optax optimizers and learning-rate schedules from a config's `optimizer` section.

Schedules are written in epochs in the config (see `jaxbp.app.config`) and turned
into steps here, so a config keeps its meaning when the batch size changes.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import optax

_Builder = Callable[[float, dict, int, int], optax.Schedule]


def _piecewise(lr: float, s: dict, steps_per_epoch: int, total: int) -> optax.Schedule:
    del total
    bounds = {round(b * steps_per_epoch): scale for b, scale in zip(s.boundaries, s.scales)}
    return optax.piecewise_constant_schedule(lr, bounds)


_SCHEDULES: Dict[str, _Builder] = {
    "constant": lambda lr, s, spe, total: optax.constant_schedule(lr),
    "cosine": lambda lr, s, spe, total: optax.cosine_decay_schedule(lr, total, s.alpha),
    "exponential": lambda lr, s, spe, total: optax.exponential_decay(
        lr, spe, s.decay_rate, staircase=s.staircase),
    "warmup_cosine": lambda lr, s, spe, total: optax.warmup_cosine_decay_schedule(
        0.0, lr, round(s.warmup_epochs * spe), total, s.alpha * lr),
    "piecewise": _piecewise,
}

_OPTIMIZERS: Dict[str, Callable[[Any, dict], optax.GradientTransformation]] = {
    "sgd": lambda lr, o: optax.sgd(lr),
    "momentum": lambda lr, o: optax.sgd(lr, momentum=o.momentum),
    "nesterov": lambda lr, o: optax.sgd(lr, momentum=o.momentum, nesterov=True),
    "adam": lambda lr, o: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps),
    "adamw": lambda lr, o: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                       weight_decay=o.weight_decay),
}


def make_schedule(opt, steps_per_epoch: int, epochs: int) -> optax.Schedule:
    """The learning rate as a function of the step count.

    Args:
      opt: the validated `optimizer` section of a config.
      steps_per_epoch: optimizer steps in one epoch (batches per epoch).
      epochs: length of the run; decaying schedules end there.
    """
    schedule = opt.schedule
    return _SCHEDULES[schedule.name](opt.learning_rate, schedule, steps_per_epoch,
                                     steps_per_epoch * epochs)


def make_optimizer(opt, steps_per_epoch: int, epochs: int
                   ) -> optax.GradientTransformation:
    """The optax optimizer of a config's `optimizer` section, with its schedule.

    Args:
      opt: the validated `optimizer` section of a config.
      steps_per_epoch: optimizer steps in one epoch (batches per epoch).
      epochs: length of the run.
    """
    return _OPTIMIZERS[opt.name](make_schedule(opt, steps_per_epoch, epochs), opt)
