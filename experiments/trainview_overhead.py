#!/usr/bin/env python3
"""What the training view's norms cost: `jaxbp train`'s jitted steps with and without them.

    python3 experiments/trainview_overhead.py                       # lenet5 at 128, seed002 at 32
    python3 experiments/trainview_overhead.py --configs configs/wide.yaml --batch 128 --rounds 21

For each config: the model and optimizer as `jaxbp train` builds them, float32, random images
and labels of the config's data set, and three ways to run steps, each compiled once:

  plain      `make_train_step(with_norms=False)` on every step: training as it was before
             the norms, the baseline.
  epoch      what `jaxbp train` runs (`steps.TrainSteps`): the step with norms on every
             `norms.EVERY`-th step, the plain one on the others.
  measuring  `make_train_step(with_norms=True)` on every step: the price of one measuring
             step, for the record.

After warm-up they take turns in rounds, in one process (the order reversed every other
round); a round times a multiple of `norms.EVERY` consecutive steps of one, about `--seconds`
long (counted at warm-up), and its time per step is the total over them, both wall-clock and
this process's CPU time (on a machine other jobs share, the CPU time is the steadier: it
leaves out the time other processes hold the cores). Printed for each against plain: the
median ms per step over the rounds, and the median and quartiles of the per-round ratios.
A measurement, never a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxbp.app import data, norms  # noqa: E402
from jaxbp.app.config import load_config  # noqa: E402
from jaxbp.app.experiment import build, initial_state  # noqa: E402
from jaxbp.app.optim import make_optimizer  # noqa: E402
from jaxbp.app.steps import TrainSteps, make_train_steps, zero_totals  # noqa: E402

DEFAULTS = (("configs/lenet5.yaml", 128), ("configs/seed002.yaml", 32))
KINDS = ("plain", "epoch", "measuring")


class Variant:
    """One way to run steps, with its own state; `run` times consecutive steps."""

    def __init__(self, kind: str, model, cfg, images, labels):
        optimizer = make_optimizer(cfg.optimizer, 1000, cfg.train.epochs)
        self.state = initial_state(model, optimizer, 0, jnp.float32)
        self.zero = lambda: zero_totals(jnp.float32, model)
        self.images, self.labels = images, labels
        steps = make_train_steps(model, optimizer, jnp.float32).map(
            lambda step: step.lower(self.state, self.zero(), images, labels).compile())
        self.steps = {"plain": TrainSteps(steps.plain, steps.plain),
                      "epoch": steps,
                      "measuring": TrainSteps(steps.measuring, steps.measuring)}[kind]

    def run(self, steps: int) -> tuple[float, float]:
        """(wall-clock, CPU) seconds per step over `steps` steps, as an epoch's first."""
        totals = self.zero()
        jax.block_until_ready((self.state, totals))
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(steps):
            self.state, totals = self.steps.at(i)(self.state, totals, self.images,
                                                  self.labels)
        jax.block_until_ready((self.state, totals))
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def measure(path: str, batch: int, rounds: int, seconds: float) -> dict:
    cfg = load_config(path)
    model = build(cfg)
    rng = np.random.default_rng(0)
    shape = (batch, *data.input_shape(cfg.data.name))
    images = jnp.asarray(rng.random(shape, np.float32))
    labels = jnp.asarray(rng.integers(0, data.num_classes(cfg.data.name), batch), jnp.int32)
    variants = {kind: Variant(kind, model, cfg, images, labels) for kind in KINDS}
    warm = min(variant.run(norms.EVERY)[0] for variant in variants.values())
    steps = norms.EVERY * max(1, round(seconds / warm / norms.EVERY))
    times = {kind: [] for kind in KINDS}
    for r in range(rounds):
        for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
            times[kind].append(variants[kind].run(steps))
    result = {"config": os.path.basename(path), "batch": batch, "rounds": rounds,
              "steps": steps}
    for clock, index in (("cpu", 1), ("wall", 0)):
        base = [t[index] for t in times["plain"]]
        for kind in KINDS:
            these = [t[index] for t in times[kind]]
            ratios = [a / b for a, b in zip(these, base)]
            quartiles = statistics.quantiles(ratios, n=4)
            result[clock, kind] = {"ms": statistics.median(these) * 1e3,
                                   "ratio": statistics.median(ratios),
                                   "q1": quartiles[0], "q3": quartiles[2]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="*", help="configs (default: lenet5, seed002)")
    parser.add_argument("--batch", type=int, help="batch size (default: 128, 32)")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="about how long each round runs one variant")
    args = parser.parse_args()
    runs = ([(c, args.batch or 128) for c in args.configs] if args.configs
            else [(c, args.batch or b) for c, b in DEFAULTS])
    print(f"devices: {jax.devices()}, norms.EVERY = {norms.EVERY}, "
          f"load average: {os.getloadavg()}")
    print("| config | batch | rounds x steps | clock | plain ms/step | epoch ms/step "
          "| epoch / plain: median [quartiles] | measuring ms/step | measuring / plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path, batch in runs:
        r = measure(path, batch, args.rounds, args.seconds)
        for clock in ("cpu", "wall"):
            plain, epoch, measuring = (r[clock, kind] for kind in KINDS)
            print(f"| {r['config']} | {r['batch']} | {r['rounds']} x {r['steps']} | {clock} "
                  f"| {plain['ms']:.3f} | {epoch['ms']:.3f} | {epoch['ratio']:.4f} "
                  f"[{epoch['q1']:.3f}-{epoch['q3']:.3f}] | {measuring['ms']:.3f} "
                  f"| {measuring['ratio']:.3f} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
