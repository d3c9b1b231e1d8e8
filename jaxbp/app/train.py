"""Training and evaluation of a config's network: the epoch loop, in the manner of Flax's
examples/mnist.

`train` is the thin driver: the experiment (`jaxbp.app.experiment`), the jitted steps
(`jaxbp.app.steps`), the devices (`jaxbp.app.parallel`: all local ones by default, the state
replicated, each batch split over them; `jaxbp.app.distributed`: those of several processes),
the run folder (`jaxbp.app.rundir`, `checkpoint`, `report`).

Reproducibility: initial parameters depend only on `train.seed`, the batch order
only on (`train.seed`, epoch), and the step is deterministic on CPU. A resumed
run restarts its interrupted epoch from the start, so it ends with the same
parameters, bit for bit, as a run never interrupted.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jaxbp.app import checkpoint, data, distributed, norms, parallel, report, rundir
from jaxbp.app.config import dump_config
from jaxbp.app.experiment import (Experiment, RunError, build, initial_state, parameter_count,
                                  setup, steps_per_epoch, use_precision)
from jaxbp.app.model import format_summary
from jaxbp.app.optim import make_optimizer
from jaxbp.app.steps import (TrainState, TrainSteps, all_finite, make_eval_step,
                             make_train_steps, zero_totals)

__all__ = ["NonFiniteLoss", "RunError", "build", "use_precision", "train", "fit",
           "evaluate", "evaluate_checkpoint", "train_epoch"]


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the run stopped before saving that epoch."""


def evaluate(eval_step: Callable, params, model_state, split, batch_size: int, dtype,
             mesh: Mesh) -> tuple[float, float]:
    """(mean loss, metric) over the whole split, in order, the last batch possibly smaller;
    `params` and `model_state` replicated on `mesh`, each batch split over its devices (a
    remainder the devices do not divide runs whole on each)."""
    totals = parallel.replicate(zero_totals(dtype), mesh)
    for batch in data.epoch_batches(split, batch_size, 0, 0, shuffle=False,
                                    drop_remainder=False):
        for images, labels in parallel.put_batch(*batch, mesh):
            totals = eval_step(params, model_state, totals, images, labels)
    loss, score = jax.device_get((totals.loss, totals.score))
    n = len(split.labels)
    return float(loss) / n, float(score) / n


RECONSTRUCTED = 8  # test examples shown beside their reconstructions


def reconstruct(exp: Experiment, state: TrainState, count: int):
    """(inputs, outputs) of the first `count` test examples, in evaluation mode, each of the
    model's input shape, as NumPy arrays."""
    images = jax.numpy.asarray(exp.test.images[:count], exp.dtype)
    outputs, _ = exp.model.apply(state.params, images, state=state.model_state)
    shape = (len(images), *exp.model.input_shape)
    return np.reshape(np.asarray(images), shape), np.reshape(np.asarray(outputs), shape)


def compile_train_step(step: Callable, state: TrainState, exp: Experiment, mesh: Mesh
                       ) -> Callable:
    """Compiles `step` ahead of time for the train batches split over `mesh` (`state`
    replicated on it), so epoch 1's timing excludes it."""
    batch_size, sharded = exp.cfg.data.batch_size, parallel.batch_sharded(mesh)
    images = jax.ShapeDtypeStruct((batch_size, *exp.train.images.shape[1:]),
                                  exp.train.images.dtype, sharding=sharded)
    labels = jax.ShapeDtypeStruct((batch_size,), exp.train.labels.dtype, sharding=sharded)
    totals = parallel.replicate(zero_totals(exp.dtype, exp.model), mesh)
    return step.lower(state, totals, images, labels).compile()


def _refresh_every(steps: int) -> int:
    return max(1, min(50, steps // 10))


def train_epoch(train_steps: TrainSteps, state: TrainState, exp: Experiment, epoch: int,
                steps: int, mesh: Mesh, augment: data.Augment = data.Augment()
                ) -> tuple[TrainState, float, float, float, dict]:
    """One pass over the shuffled (and augmented) train split: (state, mean loss, metric,
    seconds, the layers' mean delta and gradient norms as `norms.epoch_norms` gives them);
    `state` replicated on `mesh`, each batch split over its devices (this process reading and
    augmenting only its rows of it).

    The progress bar (stderr, only on a terminal, only process 0's) is the only reason to
    read the totals before the epoch ends; a non-finite running loss it shows ends the epoch
    early in a single process (over several, the others could not know: the epoch runs on,
    and the loss is checked after it as always).
    """
    batch_size = exp.cfg.data.batch_size
    totals = parallel.replicate(zero_totals(exp.dtype, exp.model), mesh)
    start = time.perf_counter()
    bar = tqdm(total=steps * batch_size, desc=f"epoch {epoch}", unit="img", leave=False,
               file=sys.stderr, disable=not (sys.stderr.isatty() and distributed.is_primary()))
    refresh, done = _refresh_every(steps), 0
    with bar:
        seed, rows = exp.cfg.train.seed, parallel.process_rows(batch_size, mesh)
        batches = data.augmented(
            data.epoch_batches(exp.train, batch_size, seed, epoch, rows=rows),
            augment, seed, epoch, batch_size, rows)
        for i, (images, labels) in enumerate(batches, 1):
            step = train_steps.at(i - 1)
            state, totals = step(state, totals, *parallel.shard_batch((images, labels), mesh))
            if not bar.disable and (i % refresh == 0 or i == steps):
                loss, score = jax.device_get((totals.loss, totals.score))
                bar.update((i - done) * batch_size)
                bar.set_postfix(loss=f"{loss / i:.4f}",
                                **{exp.model.metric: f"{score / (i * batch_size):.4f}"})
                done = i
                if not np.isfinite(loss) and jax.process_count() == 1:
                    break
    loss, score, delta_sums, grad_sums = jax.device_get(totals)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    return (state, float(loss) / steps, float(score) / (steps * batch_size), seconds,
            norms.epoch_norms(exp.model, delta_sums, grad_sums, norms.measured_steps(steps)))


def fit(exp: Experiment, state: TrainState, records: list[dict], optimizer, steps: int,
        out_dir: str, echo: Callable, mesh: Mesh) -> tuple[TrainState, list[dict], float]:
    """Trains the epochs after `records` on the devices of `mesh`; returns the state (on
    them), all records and the compile time. Every process runs it; process 0 writes
    metrics.jsonl."""
    tcfg, batch_size = exp.cfg.train, exp.cfg.data.batch_size
    state, on_all = parallel.replicate(state, mesh), parallel.replicated(mesh)
    start = time.perf_counter()
    train_steps = make_train_steps(exp.model, optimizer, exp.dtype, tcfg.seed, on_all).map(
        lambda step: compile_train_step(step, state, exp, mesh))
    compile_time = time.perf_counter() - start
    eval_step = make_eval_step(exp.model, exp.dtype, on_all)
    augment = data.Augment.of(exp.cfg.data.augment, exp.train)
    with checkpoint.CheckpointWriter(out_dir) as writer:
        for epoch in range(len(records) + 1, tcfg.epochs + 1):
            state, loss, train_metric, seconds, layer_norms = train_epoch(
                train_steps, state, exp, epoch, steps, mesh, augment)
            if not (np.isfinite(loss) and all_finite((state.params, state.model_state))):
                raise NonFiniteLoss(rundir.divergence_message(loss, epoch, out_dir))
            test = None
            if rundir.evaluates(tcfg, epoch):
                test = evaluate(eval_step, state.params, state.model_state, exp.test,
                                batch_size, exp.dtype, mesh)
            records.append(report.epoch_record(epoch, loss, train_metric, test, seconds,
                                               steps * batch_size, exp.model.metric,
                                               layer_norms))
            echo(report.format_epoch(records[-1], tcfg.epochs))
            if rundir.checkpoints(tcfg, epoch):
                writer.save(epoch, state.params, state.opt_state,
                            {"epoch": epoch, "step": epoch * steps, "metrics": records,
                             "config": exp.cfg.to_dict()}, state.model_state)
            if distributed.is_primary():
                report.write_metrics(out_dir, records)
    if records[-1]["test_loss"] is None:  # resumed at or past the end, never evaluated
        test_loss, test_metric = evaluate(eval_step, state.params, state.model_state,
                                          exp.test, batch_size, exp.dtype, mesh)
        records[-1] = dict(records[-1], test_loss=test_loss,
                           **{f"test_{exp.model.metric}": test_metric})
    return state, records, compile_time


def _prepare(cfg: Mapping, out_dir: str, resume: bool, mesh: Mesh):
    """What every process needs before training: the experiment, the checkpoint to resume
    from, the state (replicated on `mesh`), the records so far and the config changes since
    that checkpoint."""
    exp = setup(cfg)
    choice = rundir.check_run_dir(out_dir, resume)
    steps = steps_per_epoch(exp)
    optimizer = make_optimizer(cfg.optimizer, steps, cfg.train.epochs)
    state, records, changes = initial_state(exp.model, optimizer, cfg.train.seed, exp.dtype), [], []
    if choice.epoch is not None:
        state, records, changes = rundir.resumed(out_dir, choice.epoch, state, cfg,
                                                 parallel.replicated(mesh))
    return exp, choice, steps, optimizer, state, records, changes


def _open_run_dir(cfg: Mapping, exp: Experiment, out_dir: str, resume: bool,
                  choice: checkpoint.Choice, changes: list[str], echo: Callable) -> None:
    """Says what the run starts from, sets damaged checkpoints aside, writes config.yaml."""
    echo(dump_config(cfg).rstrip())
    echo(format_summary(exp.model))
    for note in rundir.set_aside(out_dir, choice.damaged):
        echo(note)
    if choice.epoch is not None:
        if not choice.verified:
            echo(rundir.unverified_note(choice.epoch))
        echo(f"resuming from the checkpoint of epoch {choice.epoch}"
             + (", the newest intact one" if choice.damaged else ""))
        for change in changes:
            echo(f"note: config changed since that checkpoint: {change}")
    elif resume:
        echo(f"no checkpoint in {checkpoint.checkpoint_dir(out_dir)}; starting afresh")
    os.makedirs(out_dir, exist_ok=True)
    report.write_atomic(os.path.join(out_dir, report.CONFIG_FILE), dump_config(cfg))


def train(cfg: Mapping, out_dir: str, resume: bool = False, echo: Callable = print) -> dict:
    """Trains as configured, writing reports and checkpoints to `out_dir`; returns the summary.

    In a multi-process run (`jaxbp.app.distributed`) every process calls it with the same
    arguments; process 0 alone prints (`echo`) and writes the reports, all write the
    checkpoints. Raises RunError/ConfigError/DataError (nothing written yet) for unusable
    input, a run whose checkpoints are all damaged included (in every process, when it
    happened in one); NonFiniteLoss when the loss diverges (checkpoints of earlier epochs
    kept).
    """
    primary = distributed.is_primary()
    # Every process sees every device: a misfit fails in all of them alike.
    mesh = parallel.make_mesh(parallel.mesh_devices(cfg.train.devices))
    parallel.check_batch_size(cfg.data.batch_size, mesh)
    # Process 0 prepares the data set first: processes that share a disk find it ready.
    distributed.agree(data.prepare, cfg.data, primary_only=True)
    exp, choice, steps, optimizer, state, records, changes = distributed.agree(
        _prepare, cfg, out_dir, resume, mesh)
    distributed.agree(_open_run_dir, cfg, exp, out_dir, resume, choice, changes, echo,
                      primary_only=True)
    if not primary:
        echo = _quiet

    state, records, compile_time = fit(exp, state, records, optimizer, steps, out_dir, echo,
                                       mesh)
    summary = report.summarize(records, steps=records[-1]["epoch"] * steps,
                               precision=cfg.train.precision,
                               parameters=parameter_count(state.params),
                               compile_time_s=compile_time,
                               devices=parallel.device_count(mesh),
                               processes=jax.process_count())
    metric = exp.model.metric
    # Every process computes (the state lives on all of them); process 0 draws.
    pairs = reconstruct(exp, state, RECONSTRUCTED) if exp.model.target == "input" else None
    if primary:
        report.write_summary(out_dir, summary)
        report.plot_curves(records, os.path.join(out_dir, report.CURVES_FILE),
                           norms.layer_names(exp.model))
        if pairs is not None:
            report.plot_reconstructions(pairs, os.path.join(out_dir,
                                                            report.RECONSTRUCTIONS_FILE))
    echo(f"test {metric.replace('_', ' ')} {summary[f'test_{metric}']:.4f}, "
         f"test loss {summary['test_loss']:.4f}; "
         f"wrote {out_dir}")
    return summary


def _quiet(_line: str) -> None:
    """The console of a process other than 0: nothing."""


def evaluate_checkpoint(cfg: Mapping, run_dir: str, echo: Callable = print) -> dict:
    """Test loss and metric of the newest intact checkpoint in `run_dir` under the config's
    model; says which damaged ones it skipped (none is moved or deleted)."""
    mesh = parallel.make_mesh(parallel.mesh_devices(cfg.train.devices))
    exp = setup(cfg, splits=("test",))
    epoch, params, model_state = rundir.restore_newest(run_dir, exp.model, exp.dtype, echo)
    eval_step = make_eval_step(exp.model, exp.dtype, parallel.replicated(mesh))
    params, model_state = parallel.replicate((params, model_state), mesh)
    loss, value = evaluate(eval_step, params, model_state, exp.test, cfg.data.batch_size,
                           exp.dtype, mesh)
    return {"epoch": epoch, "test_loss": loss, f"test_{exp.model.metric}": value}
