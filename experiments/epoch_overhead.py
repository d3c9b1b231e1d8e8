"""Where an epoch of `jaxbp train` goes, against steps × the step time
(`experiments/bench.py --epoch-overhead [CONFIG]`).

In one process, on the config's data and devices, interleaved over rounds:

  step        the CLI's compiled train step (the plain one, without the training view's
              norms) on one batch already on the device, waited for after each call: the
              benchmark's step time (`bench.py`'s `hand` column, with the config's optimizer);
  pipelined   the same step called back to back, waited for once: what the device alone takes;
  feed        one epoch's batches drawn, augmented and put on the device, no step;
  train pass  `jaxbp.app.train.train_epoch`, the CLI's own loop (the `epoch_time_s` it logs),
              its steps 0, 16, 32, ... also measuring the layers' norms (`jaxbp.app.norms`);
  evaluate    `jaxbp.app.train.evaluate` over the test split;
  checkpoint  one orbax checkpoint with its manifest (`CheckpointWriter.save`);
  report      metrics.jsonl rewritten (curves.png is drawn once, after the last epoch).

The overhead is train pass / (steps × step) − 1; the whole epoch adds evaluate, checkpoint
and report.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable, Dict, List


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(cfg, rounds: int, step_samples: int = 50) -> dict:
    """Seconds of each part (median over `rounds`; the step's over all its samples)."""
    import jax
    from jaxbp.app import checkpoint, data, parallel, report
    from jaxbp.app.experiment import initial_state, setup, steps_per_epoch
    from jaxbp.app.optim import make_optimizer
    from jaxbp.app.steps import make_eval_step, make_train_steps, zero_totals
    from jaxbp.app.train import compile_train_step, evaluate, train_epoch

    mesh = parallel.make_mesh(parallel.mesh_devices(cfg.train.devices))
    exp = setup(cfg)
    steps = steps_per_epoch(exp)
    batch_size, seed = cfg.data.batch_size, cfg.train.seed
    optimizer = make_optimizer(cfg.optimizer, steps, cfg.train.epochs)
    on_all = parallel.replicated(mesh)
    state = parallel.replicate(initial_state(exp.model, optimizer, seed, exp.dtype), mesh)
    train_steps = make_train_steps(exp.model, optimizer, exp.dtype, seed, on_all).map(
        lambda fn: compile_train_step(fn, state, exp, mesh))
    step = train_steps.plain
    eval_step = make_eval_step(exp.model, exp.dtype, on_all)
    augment = data.Augment.of(cfg.data.augment, exp.train)
    batch = parallel.shard_batch((exp.train.images[:batch_size],
                                  exp.train.labels[:batch_size]), mesh)
    holder = {"state": state}

    def zero():
        return parallel.replicate(zero_totals(exp.dtype, exp.model), mesh)

    def one_step():
        holder["state"], totals = step(holder["state"], zero(), *batch)
        jax.block_until_ready((holder["state"], totals))

    def pipelined():
        totals = zero()
        for _ in range(step_samples):
            holder["state"], totals = step(holder["state"], totals, *batch)
        jax.block_until_ready((holder["state"], totals))

    def feed():
        last = None
        for images, labels in data.augmented(data.epoch_batches(exp.train, batch_size, seed, 1),
                                             augment, seed, 1):
            last = parallel.shard_batch((images, labels), mesh)
        jax.block_until_ready(last)

    def train_pass():
        holder["state"] = train_epoch(train_steps, holder["state"], exp, 1, steps, mesh, augment)[0]

    def evaluation():
        evaluate(eval_step, holder["state"].params, holder["state"].model_state, exp.test,
                 batch_size, exp.dtype, mesh)

    def save(writer, epoch, s):
        writer.save(epoch, s.params, s.opt_state, {"epoch": epoch, "metrics": records},
                    s.model_state)

    records = [report.epoch_record(1, 0.5, 0.5, (0.5, 0.5), 1.0, steps * batch_size,
                                   exp.model.metric)]
    times: Dict[str, List[float]] = {k: [] for k in ("step", "pipelined", "feed", "train pass",
                                                     "evaluate", "checkpoint", "report")}
    one_step(), pipelined(), evaluation()  # warm: first calls allocate
    with tempfile.TemporaryDirectory() as out_dir:
        with checkpoint.CheckpointWriter(out_dir) as writer:
            for r in range(rounds):
                parts = {
                    "step": lambda: times["step"].extend(_timed(one_step)
                                                         for _ in range(step_samples)),
                    "pipelined": lambda: times["pipelined"].append(_timed(pipelined)
                                                                   / step_samples),
                    "feed": lambda: times["feed"].append(_timed(feed)),
                    "train pass": lambda: times["train pass"].append(_timed(train_pass)),
                    "evaluate": lambda: times["evaluate"].append(_timed(evaluation)),
                    "checkpoint": lambda: times["checkpoint"].append(_timed(
                        lambda: save(writer, r + 1, holder["state"]))),
                    "report": lambda: times["report"].append(_timed(
                        lambda: report.write_metrics(out_dir, records))),
                }
                names = list(parts)
                for name in names[r % len(names):] + names[:r % len(names)]:
                    parts[name]()
    medians = {k: statistics.median(v) for k, v in times.items()}
    ideal = steps * medians["step"]
    whole = medians["train pass"] + medians["evaluate"] + medians["checkpoint"] + medians["report"]
    return {"steps": steps, "batch_size": batch_size, "devices": parallel.device_count(mesh),
            "seconds": medians, "spread": {k: [min(v), max(v)] for k, v in times.items()},
            "steps_x_step_s": ideal, "train_pass_overhead": medians["train pass"] / ideal - 1,
            "whole_epoch_s": whole, "whole_epoch_overhead": whole / ideal - 1}


def markdown(result: dict, config: str) -> List[str]:
    s = result["seconds"]
    ms = {k: v * 1e3 for k, v in s.items()}
    lines = [f"Config `{config}`: {result['steps']} steps of {result['batch_size']} on "
             f"{result['devices']} device(s) per epoch.", "",
             "| part | time | note |", "|---|---|---|",
             f"| step (waited for) | {ms['step']:.2f} ms | × {result['steps']} = "
             f"{result['steps_x_step_s']:.2f} s |",
             f"| step (back to back) | {ms['pipelined']:.2f} ms | the device alone |",
             f"| feed | {s['feed']:.2f} s | draw, augment and place one epoch's batches |",
             f"| **train pass** | **{s['train pass']:.2f} s** | `epoch_time_s`: "
             f"**{100 * result['train_pass_overhead']:+.1f}%** over steps × step |",
             f"| evaluate | {s['evaluate']:.2f} s | whole test split |",
             f"| checkpoint | {s['checkpoint']:.2f} s | orbax save + SHA-256 manifest |",
             f"| report | {1e3 * s['report']:.1f} ms | metrics.jsonl |",
             f"| whole epoch | {result['whole_epoch_s']:.2f} s | "
             f"{100 * result['whole_epoch_overhead']:+.1f}% over steps × step |"]
    return lines


def run(config_path: str, overrides: List[str], rounds: int) -> dict:
    from jaxbp.app.config import load_config
    cfg = load_config(config_path, overrides)
    return measure(cfg, rounds)


__all__ = ["measure", "markdown", "run"]
