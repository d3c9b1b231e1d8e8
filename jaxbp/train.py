"""Training and evaluation of a config's network, in the manner of Flax's examples/mnist.

`train` is the thin driver; the work happens in two jit-compiled functions:
the train step (value_and_grad of `model.loss` through the hand-derived rules,
`ops=HAND`, then the optax update; the state and running totals are donated) and
the eval step. Running totals (loss sum, correct count) stay on the device; the
host reads them once per epoch, and every few steps only while a progress bar
is shown.

Reproducibility: initial parameters depend only on `train.seed`, the batch order
only on (`train.seed`, epoch), and the step is deterministic on CPU. A resumed
run restarts its interrupted epoch from the start, so it ends with the same
parameters, bit for bit, as a run never interrupted.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxbp import checkpoint, data, report
from jaxbp.config import ConfigError, dump_config
from jaxbp.nn import HAND, build_model, format_summary
from jaxbp.optim import make_optimizer


class RunError(Exception):
    """A run that cannot go ahead as asked (bad model shapes, a run folder in use); one line."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the run stopped before saving that epoch."""


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


class Totals(NamedTuple):
    """Running sums over the batches seen so far, kept on the device."""
    loss: jax.Array      # sum over batches of the batch-mean loss (train) or of the loss sum (eval)
    correct: jax.Array   # number of correctly classified images


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A config's model and data, ready to train or evaluate."""
    cfg: dict
    model: Any
    dtype: np.dtype
    train: Any
    test: Any


def use_precision(precision: str) -> np.dtype:
    """The parameter dtype for "float32"/"float64", switching on jax x64 for the latter."""
    if precision == "float64":
        jax.config.update("jax_enable_x64", True)
    return jnp.dtype(precision)


def build(cfg: dict):
    """The config's model; a shape or hyperparameter error becomes a one-line RunError."""
    name = cfg["data"]["name"]
    try:
        return build_model(cfg["model"], cfg["loss"], data.input_shape(name),
                           data.num_classes(name))
    except ConfigError:
        raise
    except ValueError as exc:  # a layer's own check that build_model did not translate
        raise RunError(f"model: {exc}") from None


def setup(cfg: dict, splits=("train", "test")) -> Experiment:
    """Builds the model and loads (preparing on demand) the requested splits."""
    dtype = use_precision(cfg["train"]["precision"])
    model = build(cfg)
    loaded = {split: data.load(cfg["data"], split) for split in splits}
    return Experiment(cfg, model, dtype, loaded.get("train"), loaded.get("test"))


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
        loss, grads = jax.value_and_grad(model.loss)(state.params, images, labels, ops=ops)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = count_correct(model.apply(state.params, images, ops=ops), labels)
        return TrainState(params, opt_state), Totals(totals.loss + loss, totals.correct + correct)

    return train_step


def make_eval_step(model, dtype) -> Callable:
    """jit(params, totals, images, labels) -> totals; totals donated."""

    @functools.partial(jax.jit, donate_argnums=(1,))
    def eval_step(params, totals: Totals, images, labels):
        images = images.astype(dtype)
        loss = model.loss(params, images, labels, ops=HAND) * images.shape[0]
        correct = count_correct(model.apply(params, images, ops=HAND), labels)
        return Totals(totals.loss + loss, totals.correct + correct)

    return eval_step


def evaluate(eval_step: Callable, params, split, batch_size: int, dtype) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole split, in order, the last batch possibly smaller."""
    totals = zero_totals(dtype)
    for images, labels in data.epoch_batches(split, batch_size, 0, 0, shuffle=False,
                                             drop_remainder=False):
        totals = eval_step(params, totals, jax.device_put(images), jax.device_put(labels))
    loss, correct = jax.device_get(totals)
    n = len(split.labels)
    return float(loss) / n, float(correct) / n


def compile_train_step(step: Callable, state: TrainState, exp: Experiment) -> Callable:
    """Compiles `step` ahead of time for the train batches, so epoch 1's timing excludes it."""
    batch_size = exp.cfg["data"]["batch_size"]
    images = jax.ShapeDtypeStruct((batch_size, *exp.train.images.shape[1:]),
                                  exp.train.images.dtype)
    labels = jax.ShapeDtypeStruct((batch_size,), exp.train.labels.dtype)
    return step.lower(state, zero_totals(exp.dtype), images, labels).compile()


def _refresh_every(steps: int) -> int:
    return max(1, min(50, steps // 10))


def train_epoch(step: Callable, state: TrainState, exp: Experiment, epoch: int,
                steps: int) -> tuple[TrainState, float, float, float]:
    """One pass over the shuffled train split: (state, mean loss, accuracy, seconds).

    The progress bar (stderr, only on a terminal) is the only reason to read the
    totals before the epoch ends; a non-finite running loss ends the epoch early.
    """
    batch_size = exp.cfg["data"]["batch_size"]
    totals = zero_totals(exp.dtype)
    start = time.perf_counter()
    bar = tqdm(total=steps * batch_size, desc=f"epoch {epoch}", unit="img", leave=False,
               file=sys.stderr, disable=not sys.stderr.isatty())
    refresh, done = _refresh_every(steps), 0
    with bar:
        batches = data.epoch_batches(exp.train, batch_size, exp.cfg["train"]["seed"], epoch)
        for i, (images, labels) in enumerate(batches, 1):
            state, totals = step(state, totals, jax.device_put(images), jax.device_put(labels))
            if not bar.disable and (i % refresh == 0 or i == steps):
                loss, correct = jax.device_get(totals)
                bar.update((i - done) * batch_size)
                bar.set_postfix(loss=f"{loss / i:.4f}", acc=f"{correct / (i * batch_size):.4f}")
                done = i
                if not np.isfinite(loss):
                    break
    loss, correct = jax.device_get(totals)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    return state, float(loss) / steps, float(correct) / (steps * batch_size), seconds


@jax.jit
def _all_finite(tree):
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]
    return functools.reduce(jnp.logical_and, flags, jnp.bool_(True))


def all_finite(tree) -> bool:
    """Whether every entry of every array in `tree` is finite (one device-to-host read)."""
    return bool(_all_finite(tree))


def run_once(fn: Callable, *args):
    """`fn(*args)` compiled without XLA's backend optimisations, for code that runs once.

    The optimising CPU backend spends seconds on each truncated-normal
    initialiser (lecun_normal, ...); unoptimised, the whole init compiles in about one.
    """
    compiled = jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*args)


def init_params(model, seed: int, dtype):
    """The model's parameters drawn from `seed`."""
    return run_once(lambda key: model.init(key, dtype=dtype), jax.random.PRNGKey(seed))


def initial_state(model, optimizer, seed: int, dtype) -> TrainState:
    """Parameters drawn from `seed` and the optimizer's initial state."""
    def init(key):
        params = model.init(key, dtype=dtype)
        return TrainState(params, optimizer.init(params))

    return run_once(init, jax.random.PRNGKey(seed))


def resume_state(out_dir: str, epoch: int, template: TrainState) -> tuple[TrainState, dict]:
    """The state and meta of checkpoint `epoch`, in the template's structure and dtypes."""
    abstract = jax.eval_shape(lambda: template)
    try:
        restored = checkpoint.restore(out_dir, epoch, abstract.params, abstract.opt_state)
    except ValueError as exc:
        raise RunError(f"the checkpoint of epoch {epoch} in {checkpoint.checkpoint_dir(out_dir)} "
                       f"does not fit this config's model/optimizer: "
                       f"{str(exc).splitlines()[0]}") from None
    return TrainState(restored.params, restored.opt_state), restored.meta


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs, as "key: old -> new"."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def check_run_dir(out_dir: str, resume: bool) -> Optional[int]:
    """The epoch to resume from (None: start afresh); refuses to overwrite another run."""
    latest = checkpoint.latest_epoch(out_dir)
    if resume:
        return latest
    if latest is not None:
        raise RunError(f"{out_dir} already holds checkpoints of a run (up to epoch {latest}); "
                       f"pass --resume to continue it, or choose another --out")
    if os.path.exists(os.path.join(out_dir, report.METRICS_FILE)):
        raise RunError(f"{out_dir} already holds the {report.METRICS_FILE} of a run; pass "
                       f"--resume to train it again from its last checkpoint (or from the "
                       f"start if it has none), or choose another --out")
    return None


def parameter_count(params) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def evaluates(tcfg: dict, epoch: int) -> bool:
    """Every `eval_every` epochs and after the last."""
    return epoch % tcfg["eval_every"] == 0 or epoch == tcfg["epochs"]


def checkpoints(tcfg: dict, epoch: int) -> bool:
    """Every `checkpoint_every` epochs and after the last; never when it is 0."""
    every = tcfg["checkpoint_every"]
    return every > 0 and (epoch % every == 0 or epoch == tcfg["epochs"])


def steps_per_epoch(exp: Experiment) -> int:
    batch_size, n = exp.cfg["data"]["batch_size"], len(exp.train.labels)
    steps = data.num_batches(n, batch_size, True)
    if steps == 0:
        raise RunError(f"data.batch_size={batch_size} is larger than the {n} training images")
    return steps


def start_state(exp: Experiment, optimizer, out_dir: str, latest: Optional[int]
                ) -> tuple[TrainState, list[dict], list[str]]:
    """The fresh state, or checkpoint `latest`'s state, metrics so far and config changes."""
    state = initial_state(exp.model, optimizer, exp.cfg["train"]["seed"], exp.dtype)
    if latest is None:
        return state, [], []
    state, meta = resume_state(out_dir, latest, state)
    changes = config_changes(meta["config"], json.loads(json.dumps(exp.cfg)))
    return state, list(meta["metrics"]), changes


def fit(exp: Experiment, state: TrainState, records: list[dict], optimizer, steps: int,
        out_dir: str, echo: Callable) -> tuple[TrainState, list[dict], float]:
    """Trains the epochs after `records`; returns the state, all records and the compile time."""
    tcfg, batch_size = exp.cfg["train"], exp.cfg["data"]["batch_size"]
    start = time.perf_counter()
    train_step = compile_train_step(make_train_step(exp.model, optimizer, exp.dtype), state, exp)
    compile_time = time.perf_counter() - start
    eval_step = make_eval_step(exp.model, exp.dtype)
    with checkpoint.CheckpointWriter(out_dir) as writer:
        for epoch in range(len(records) + 1, tcfg["epochs"] + 1):
            state, loss, accuracy, seconds = train_epoch(train_step, state, exp, epoch, steps)
            if not (np.isfinite(loss) and all_finite(state.params)):
                raise NonFiniteLoss(_divergence_message(loss, epoch, out_dir))
            test = None
            if evaluates(tcfg, epoch):
                test = evaluate(eval_step, state.params, exp.test, batch_size, exp.dtype)
            records.append(report.epoch_record(epoch, loss, accuracy, test, seconds,
                                               steps * batch_size))
            echo(report.format_epoch(records[-1], tcfg["epochs"]))
            if checkpoints(tcfg, epoch):
                writer.save(epoch, state.params, state.opt_state,
                            {"epoch": epoch, "step": epoch * steps, "metrics": records,
                             "config": exp.cfg})
            report.write_metrics(out_dir, records)
    if records[-1]["test_accuracy"] is None:  # resumed at or past the end, never evaluated
        test_loss, test_accuracy = evaluate(eval_step, state.params, exp.test, batch_size,
                                            exp.dtype)
        records[-1] = dict(records[-1], test_loss=test_loss, test_accuracy=test_accuracy)
    return state, records, compile_time


def train(cfg: dict, out_dir: str, resume: bool = False, echo: Callable = print) -> dict:
    """Trains as configured, writing reports and checkpoints to `out_dir`; returns the summary.

    Raises RunError/ConfigError/DataError (nothing written yet) for unusable input,
    NonFiniteLoss when the loss diverges (checkpoints of earlier epochs kept).
    """
    exp = setup(cfg)
    latest = check_run_dir(out_dir, resume)
    steps = steps_per_epoch(exp)
    optimizer = make_optimizer(cfg["optimizer"], steps, cfg["train"]["epochs"])
    state, records, changes = start_state(exp, optimizer, out_dir, latest)
    echo(dump_config(cfg).rstrip())
    echo(format_summary(exp.model))
    if latest is not None:
        echo(f"resuming from the checkpoint of epoch {latest}")
        for change in changes:
            echo(f"note: config changed since that checkpoint: {change}")
    elif resume:
        echo(f"no checkpoint in {checkpoint.checkpoint_dir(out_dir)}; starting afresh")
    os.makedirs(out_dir, exist_ok=True)
    report.write_atomic(os.path.join(out_dir, report.CONFIG_FILE), dump_config(cfg))

    state, records, compile_time = fit(exp, state, records, optimizer, steps, out_dir, echo)
    summary = report.summarize(records, steps=records[-1]["epoch"] * steps,
                               precision=cfg["train"]["precision"],
                               parameters=parameter_count(state.params),
                               compile_time_s=compile_time)
    report.write_summary(out_dir, summary)
    report.plot_curves(records, os.path.join(out_dir, report.CURVES_FILE))
    echo(f"test accuracy {summary['test_accuracy']:.4f}, test loss {summary['test_loss']:.4f}; "
         f"wrote {out_dir}")
    return summary


def _divergence_message(loss: float, epoch: int, out_dir: str) -> str:
    latest = checkpoint.latest_epoch(out_dir)
    kept = (f"the last good checkpoint (epoch {latest}) is kept in "
            f"{checkpoint.checkpoint_dir(out_dir)}" if latest is not None
            else "no checkpoint had been written yet")
    return (f"training diverged in epoch {epoch}: loss {loss}, or non-finite parameters "
            f"(learning rate too high?); stopped, {kept}")


def evaluate_checkpoint(cfg: dict, run_dir: str) -> dict:
    """Test loss and accuracy of the newest checkpoint in `run_dir` under the config's model."""
    exp = setup(cfg, splits=("test",))
    latest = checkpoint.latest_epoch(run_dir)
    if latest is None:
        raise RunError(f"no checkpoint found in {checkpoint.checkpoint_dir(run_dir)}")
    abstract = jax.eval_shape(lambda: exp.model.init(jax.random.PRNGKey(0), dtype=exp.dtype))
    try:
        params = checkpoint.restore(run_dir, latest, abstract).params
    except ValueError as exc:
        raise RunError(f"the checkpoint of epoch {latest} does not fit this config's model: "
                       f"{str(exc).splitlines()[0]}") from None
    eval_step = make_eval_step(exp.model, exp.dtype)
    loss, accuracy = evaluate(eval_step, params, exp.test, cfg["data"]["batch_size"], exp.dtype)
    return {"epoch": latest, "test_loss": loss, "test_accuracy": accuracy}
