#!/usr/bin/env python3
"""Speed of one training step: jaxbp's hand-derived rules against jax.grad and PyTorch.

    python3 experiments/bench.py                      # seed002, lenet5, wide at batch 128, 1024
    python3 experiments/bench.py --quick              # a smaller run (a minute or two)
    python3 experiments/bench.py --models wide --batches 128 --rounds 9
    python3 experiments/bench.py --devices 2 --models lenet5 --batches 128,512  # data parallel

One step = forward, backward and an SGD update (the config's learning rate), on random
float32 images (batch, 28, 28, 1) and labels, channels-last. In ONE process, after warm-up,
the candidates take turns in repeated rounds (the order rotating each round) and each
candidate's median step time is reported:

  hand      jaxbp's hand-derived rules, exactly as `jaxbp train` runs a step
            (`jaxbp.app.steps.make_train_step`, ops=HAND) under jaxbp's runtime defaults.
  autodiff  the same step with the ops swapped for `jaxbp.reference` (jax.grad through the
            plain twins), same process, same settings.
  tuned     autodiff as the issue's "tuned" column ran it: the same, except that max pooling
            whose windows tile the input is a reshape and a max (whose gradient XLA runs far
            faster than `reduce_window`'s). Its loss and gradients are checked against
            `autodiff`'s before timing.
  defaults  autodiff with JAX's defaults (JAXBP_TUNING=0, the user's own XLA_FLAGS). XLA reads
            its flags when its backend starts and malloc settings belong to the process, so
            this runs in a child process after the main rounds: not interleaved with them,
            and with at most 2 rounds after 1 warm-up step (wide at batch 1024 takes ~15 s a
            step there). The child also times `hand` under defaults (JAXBP_TUNING=0 also
            turns off the per-shape formulations), to show what the settings give it.
  library   the hand step as a library user writes it (`jaxbp.nn` layers, `jax.value_and_grad`,
            SGD as a tree_map, one `jax.jit` donating parameters and state: README's
            "Networks, training mode and state"), timed after the main rounds in a child process
            whose step is built and compiled from jaxbp alone (its import applies the runtime
            defaults), not the CLI's `jaxbp.app`; `--no-library` skips it. That child then
            builds a PyTorch twin and times the two interleaved, so library/PyTorch is a
            side-by-side ratio like the others, not one across processes.
  torch     PyTorch eager (optional extra `bench`), the same layers in NCHW, on the CPU with
            OMP_WAIT_POLICY=PASSIVE unless set (spinning OpenMP threads starve everything else
            on a shared 2-core machine), or on CUDA when JAX's backend is a GPU and torch sees
            one. Skipped with a note when torch is missing.
  matmul    a 2048^3 float32 matmul under the same settings, the ceiling that GFLOP/s are
            compared with.

Printed and written to experiments/results/bench.{json,md} (bench-quick.* for --quick): ms
per step, the ratios hand/autodiff and hand/torch (each with its range over the rounds, the
ratio of the two candidates' medians round by round: how far drift moved it within the run),
images/s, GFLOP/s (model FLOPs: forward, input deltas except the first layer's, weight
gradients) and their share of the matmul ceiling, and the bytes of residuals each saves for
its backward (the leaves of the `jax.vjp` closure that are not inputs or parameters;
PyTorch's saved tensors through `saved_tensors_hooks`). The machine's load (loadavg, other
processes' CPU) is recorded before and after, since these machines are shared. These are
measurements, never pass/fail tests.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")  # before jaxbp.runtime adds its own

from jaxbp import runtime  # noqa: E402  (importing jaxbp applies its runtime defaults)

MATMUL_SIZE = 2048
MODELS = ("seed002", "lenet5_classic", "lenet5", "wide", "resnet")
BATCHES = (128, 1024)
QUICK = dict(batches=(128,), rounds=3)
TARGET_ROUND_SECONDS = 0.3  # steps per round: enough that small models are timed many times


# ---------------------------------------------------------------- machine load

def _cpu_ticks() -> Dict[int, tuple]:
    """{pid: (name, utime + stime ticks)} of every process readable in /proc."""
    ticks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        ticks[int(entry)] = (name, int(fields[11]) + int(fields[12]))
    return ticks


def machine_load(window: float = 1.0) -> dict:
    """Load averages and the CPU share of other processes over `window` seconds."""
    if not os.path.isdir("/proc"):
        return {"loadavg": list(os.getloadavg())}
    mine = {os.getpid(), os.getppid()}
    before = _cpu_ticks()
    time.sleep(window)
    after = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    others = sorted(((after[p][1] - before[p][1]) / hz / window * 100, p, after[p][0])
                    for p in after if p in before and p not in mine)[::-1]
    busy = [(round(pct), pid, name) for pct, pid, name in others if pct >= 5]
    return {"loadavg": [round(v, 2) for v in os.getloadavg()],
            "other_cpu_percent": round(sum(pct for pct, _, _ in others)),
            "busiest_others": [{"pid": p, "name": n, "cpu_percent": c} for c, p, n in busy[:5]]}


# ---------------------------------------------------------------- model FLOPs

def step_flops(model) -> int:
    """FLOPs of one example's step: 2 x (forward MACs + input-delta MACs + weight-gradient
    MACs), each layer's forward MACs from its registration (`flops`; layers without one
    count nothing); the first counted layer computes no input delta."""
    from jaxbp import registry
    from jaxbp.app.model import RESIDUAL
    total, first = 0, True
    for row in model.summary:
        if row.type == RESIDUAL:  # its layers have rows of their own
            continue
        count = registry.get(row.type).flops
        macs = count(row.input_shape, row.output_shape, row.param_shapes) if count else 0
        if macs:
            total += macs * (2 if first else 3)
            first = False
    return 2 * total


# ---------------------------------------------------------------- JAX candidates

def residual_bytes(model, ops, params, images, labels) -> int:
    """Bytes of the arrays the backward of the loss keeps beyond parameters and inputs."""
    from jaxbp.testing import residual_bytes as saved_bytes
    from jaxbp.app.steps import training_loss
    return saved_bytes(training_loss(model, ops), params, images, labels)


def reshape_max_pool(x, window, *, stride=None, padding="VALID"):
    """`jaxbp.reference.max_pool`, but a reshape and a max where the windows tile the input
    without padding (the issue's tuned autodiff baseline); `reduce_window` elsewhere."""
    import jax.numpy as jnp
    from jaxbp import reference
    from jaxbp.reference.pooling import pool_geometry
    geometry = pool_geometry("max_pool", x, window, stride, padding)
    if not geometry.tiles or any(side for pair in geometry.pads for side in pair):
        return reference.max_pool(x, window, stride=stride, padding=padding)
    cropped = x[(slice(None), *(slice(0, e) for e in geometry.extent))]
    split = [x.shape[0]]
    for out, k in zip(geometry.out_sizes, geometry.window):
        split += [out, k]
    rank = len(geometry.window)
    return jnp.max(cropped.reshape(*split, x.shape[-1]), axis=tuple(range(2, 2 * rank + 1, 2)))


def tuned_reference_ops():
    """`jaxbp.registry.REFERENCE` with `reshape_max_pool`."""
    from jaxbp.registry import REFERENCE
    return REFERENCE.replace("reference-reshape-pool", max_pool=reshape_max_pool)


def check_same_gradients(model, ops, baseline, params, images, labels) -> None:
    """Raises unless `ops` gives `baseline`'s loss and gradients on the first 8 examples in
    float64, within `jaxbp.testing`'s tolerance (the one `jaxbp check` uses)."""
    import jax
    import jax.numpy as jnp
    from jaxbp.app.steps import training_loss
    from jaxbp.testing import relative_error, tolerance
    with jax.enable_x64(True):
        wide = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        x = jnp.asarray(images[:8], jnp.float64)
        got, want = (jax.jit(jax.value_and_grad(training_loss(model, o, dtype=jnp.float64)))(
            wide, x, labels[:8]) for o in (ops, baseline))
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            error = relative_error(a, b)
            if error > tolerance(jnp.float64):
                raise AssertionError(f"{ops.name} disagrees with {baseline.name}: a leaf of "
                                     f"shape {jnp.shape(b)} has relative error {error:.1e}")


class JaxCandidate:
    """The CLI's compiled train step for one ops namespace; `run()` times one step. With a
    `mesh` (`jaxbp.app.parallel`), as `jaxbp train` runs it there: the state replicated, the
    batch split over the devices."""

    def __init__(self, model, ops, lr: float, images, labels, mesh=None):
        import jax.numpy as jnp
        import optax
        from jaxbp.app import experiment, parallel, steps
        optimizer = optax.sgd(lr)
        self.state = experiment.initial_state(model, optimizer, 0, jnp.float32)
        self.residuals = residual_bytes(model, ops, self.state.params, images, labels)
        self._zero, out_sharding = (lambda: steps.zero_totals(jnp.float32)), None
        if mesh is not None:
            images, labels = parallel.shard_batch((images, labels), mesh)
            self.state = parallel.replicate(self.state, mesh)
            self._zero = lambda: parallel.replicate(steps.zero_totals(jnp.float32), mesh)
            out_sharding = parallel.replicated(mesh)
        self.images, self.labels = images, labels
        step = steps.make_train_step(model, optimizer, jnp.float32, ops,
                                     out_sharding=out_sharding)
        self.step = step.lower(self.state, self._zero(), images, labels).compile()

    def run(self) -> float:
        import jax
        totals = self._zero()
        jax.block_until_ready(totals)
        start = time.perf_counter()
        self.state, totals = self.step(self.state, totals, self.images, self.labels)
        jax.block_until_ready((self.state, totals))
        return time.perf_counter() - start


class MatmulCandidate:
    """A square float32 matmul: the FLOP rate the steps are compared with."""

    flops = 2 * MATMUL_SIZE ** 3

    def __init__(self):
        import jax
        import numpy as np
        rng = np.random.default_rng(0)
        self.a, self.b = (jax.device_put(rng.standard_normal((MATMUL_SIZE,) * 2, np.float32))
                          for _ in range(2))
        self.fn = jax.jit(lambda a, b: a @ b).lower(self.a, self.b).compile()

    def run(self) -> float:
        start = time.perf_counter()
        self.fn(self.a, self.b).block_until_ready()
        return time.perf_counter() - start


# ---------------------------------------------------------------- PyTorch twin

def torch_net(torch, model, layers, loss_name: str, num_classes: int):
    """The config's network in PyTorch (NCHW), each layer from its registered twin
    (`jaxbp.torch_twins`), a residual block as `torch_twins.residual`, and its
    loss(out, labels)."""
    from jaxbp import registry, torch_twins
    from jaxbp.app.model import RESIDUAL
    rows = {row.path: row for row in model.summary}

    def sequence(items, prefix: str):
        return torch.nn.Sequential(*(module(item, f"{prefix}{i}")
                                     for i, item in enumerate(items)))

    def module(item, path: str):
        if item.type == RESIDUAL:
            return torch_twins.residual(torch, sequence(item.layers, f"{path}.layers."),
                                        sequence(item.shortcut, f"{path}.shortcut."))
        made = registry.get(item.type).torch_module(torch, rows[path].input_shape,
                                                    item.hyperparameters)
        if made is None:
            raise torch_twins.Unsupported(f"layer type {item.type}")
        return made

    net = sequence(layers, "")
    if registry.get(loss_name, "loss").targets == "one_hot":
        def loss(out, labels):
            target = torch.nn.functional.one_hot(labels, num_classes).to(out.dtype)
            return 0.5 * ((out - target) ** 2).sum() / out.shape[0]
    else:
        loss = torch.nn.functional.cross_entropy
    return net, loss


def torch_device(torch) -> str:
    """"cuda" when JAX computes on a GPU and torch sees one too, else "cpu": both frameworks
    on the same kind of device."""
    import jax
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


class TorchCandidate:
    def __init__(self, torch, cfg, model, batch: int, device: str = "cpu"):
        self.torch = torch
        shape = model.input_shape
        self.net, self.loss = torch_net(torch, model, cfg.model.layers, cfg.loss,
                                        model.num_classes)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((batch, shape[-1], *shape[:-1]), generator=generator)
        y = torch.randint(0, model.num_classes, (batch,), generator=generator)
        self.net.to(device)
        self.x, self.y = x.to(device), y.to(device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=cfg.optimizer.learning_rate)
        self.residuals = self._saved_bytes()

    def _saved_bytes(self) -> int:
        owned = {p.data_ptr() for p in self.net.parameters()} | {self.x.data_ptr()}
        saved = {}

        def pack(t):
            if t.data_ptr() not in owned:
                saved[t.data_ptr()] = t.untyped_storage().nbytes()
            return t

        with self.torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.loss(self.net(self.x), self.y)
        return sum(saved.values())

    def run(self) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        out = self.net(self.x)
        self.loss(out, self.y).backward()
        self.opt.step()
        # The accuracy count the CLI's step makes too; reading it waits for a GPU to finish.
        int((out.argmax(1) == self.y).sum())
        return time.perf_counter() - start


def import_torch():
    """torch with one intra-op thread per core and passive OpenMP waits, or (None, why)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        return None, "torch not installed (pip install 'jaxbp[bench]' or torch==2.13.0)"
    torch.set_num_threads(os.cpu_count() or 1)
    return torch, None


# ---------------------------------------------------------------- timing

def time_rounds(candidates: Dict[str, object], rounds: int,
                warmup_steps: int) -> Dict[str, List[List[float]]]:
    """Per candidate, the step times of each of `rounds` interleaved rounds, after warm-up.

    Each round every candidate runs `repeat` steps back to back (so a round takes about
    TARGET_ROUND_SECONDS each); the order rotates from round to round.
    """
    repeat = {}
    for name, candidate in candidates.items():
        warm = [candidate.run() for _ in range(warmup_steps)]
        repeat[name] = max(1, min(20, round(TARGET_ROUND_SECONDS / max(min(warm), 1e-4))))
    names = list(candidates)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append([candidates[name].run() for _ in range(repeat[name])])
    return times


def summary(rounds: List[List[float]]) -> dict:
    """Median, min and 90th percentile of all steps (ms), and each round's median."""
    ms = sorted(t * 1e3 for steps in rounds for t in steps)
    return {"median_ms": statistics.median(ms), "min_ms": ms[0],
            "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))], "steps": len(ms),
            "round_medians_ms": [statistics.median(steps) * 1e3 for steps in rounds]}


def round_ratio_range(numerator: dict, denominator: Optional[dict]) -> Optional[List[float]]:
    """[lowest, highest] over the rounds of the ratio of two candidates' round medians.

    The candidates of a round run minutes apart at most, so this spread shows how far the
    machine's drift (other tenants, CPU steal) moves a ratio within one run.
    """
    if denominator is None:
        return None
    ratios = [a / b for a, b in zip(numerator["round_medians_ms"],
                                    denominator["round_medians_ms"])]
    return [min(ratios), max(ratios)]


def setup_jax_case(name: str, batch: int):
    """(cfg, model, images, labels) for a config name or path."""
    import jax
    import numpy as np
    from jaxbp.app.config import load_config
    from jaxbp.app.experiment import build
    cfg = load_config(config_path(name), [])
    model = build(cfg)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.standard_normal((batch, *model.input_shape), np.float32))
    labels = jax.device_put(rng.integers(0, model.num_classes, batch).astype(np.int32))
    return cfg, model, images, labels


def library_spec(name: str, cfg, model, batch: int) -> dict:
    """What `LibraryCandidate` (and the PyTorch twin beside it) needs of a case, as JSON for
    the library child."""
    return {"config": name, "layers": [item.to_dict() for item in cfg.model.layers],
            "input_shape": list(model.input_shape), "loss": cfg.loss,
            "classes": model.num_classes, "batch": batch,
            "learning_rate": cfg.optimizer.learning_rate}


def measure_case(name: str, batch: int, args, torch, include_torch: bool) -> dict:
    from jaxbp.registry import HAND, REFERENCE
    from jaxbp.torch_twins import Unsupported
    cfg, model, images, labels = setup_jax_case(name, batch)
    lr = cfg.optimizer.learning_rate
    candidates, notes = {}, []
    start = time.perf_counter()
    candidates["hand"] = JaxCandidate(model, HAND, lr, images, labels)
    candidates["autodiff"] = JaxCandidate(model, REFERENCE, lr, images, labels)
    if not args.child:
        tuned = tuned_reference_ops()
        check_same_gradients(model, tuned, REFERENCE, candidates["autodiff"].state.params,
                             images, labels)
        candidates["tuned"] = JaxCandidate(model, tuned, lr, images, labels)
    compile_s = time.perf_counter() - start
    if include_torch and torch is not None:
        try:
            candidates["torch"] = TorchCandidate(torch, cfg, model, batch, torch_device(torch))
        except Unsupported as exc:
            notes.append(f"no PyTorch twin: {exc}")
    if not args.child:
        candidates["matmul"] = args.matmul
    times = time_rounds(candidates, args.rounds, args.warmup)
    result = {"model": name, "batch": batch, "flops_per_step": step_flops(model) * batch,
              "compile_s": round(compile_s, 1), "notes": notes, "candidates": {},
              "library_spec": library_spec(name, cfg, model, batch)}
    for cand_name, ts in times.items():
        entry = summary(ts)
        if hasattr(candidates[cand_name], "residuals"):
            entry["residual_bytes"] = candidates[cand_name].residuals
        result["candidates"][cand_name] = entry
    return result


# ---------------------------------------------------------------- defaults child

def run_defaults_child(args) -> Optional[dict]:
    """Runs this script with JAX's defaults in a child process; its results, or None."""
    env = dict(os.environ, **{runtime.TUNING_VARIABLE: "0"})
    if USER_XLA_FLAGS is None:
        env.pop("XLA_FLAGS", None)
    else:
        env["XLA_FLAGS"] = USER_XLA_FLAGS
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "child.json")
        command = [sys.executable, os.path.abspath(__file__), "--child", out,
                   "--models", ",".join(args.models), "--batches",
                   ",".join(map(str, args.batches)), "--rounds", str(min(args.rounds, 2)),
                   "--warmup", "1"]
        done = subprocess.run(command, env=env)
        if done.returncode != 0:
            return None
        with open(out) as f:
            return json.load(f)


# ---------------------------------------------------------------- library child

class LibraryCandidate:
    """The hand step as a library user writes it, in a process that imports only jaxbp: the
    config's layers from `jaxbp.nn.layer`, the loss's hand rule, `jax.value_and_grad`, SGD
    as a tree_map, one `jax.jit` donating the parameters and state, updated in place as
    PyTorch's optimizer and the CLI's step update theirs (the README's way, not the CLI's
    `jaxbp.app` step)."""

    def __init__(self, spec: dict):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jaxbp import nn, registry

        def network(items):
            def one(item):
                if item["type"] == "residual":
                    return nn.residual(network(item["layers"]), network(item["shortcut"]))
                return nn.layer(item["type"], **{k: v for k, v in item.items() if k != "type"})
            return nn.serial(*map(one, items))

        net = network(spec["layers"])
        loss_rule, classes, lr = (registry.get(spec["loss"], "loss"), spec["classes"],
                                  spec["learning_rate"])

        def loss(params, state, x, y, key):
            out, state = net.apply(params, x, train=True, rng=key, state=state)
            if loss_rule.targets == "one_hot":
                y = jax.nn.one_hot(y, classes, dtype=out.dtype)
            return loss_rule.hand(out, y), state

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, state, x, y, key):
            (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params, state, x, y,
                                                                            key)
            params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
            return params, state, value

        rng = np.random.default_rng(0)
        batch, shape = spec["batch"], tuple(spec["input_shape"])
        self.x = jax.device_put(rng.standard_normal((batch, *shape), np.float32))
        self.y = jax.device_put(rng.integers(0, classes, batch).astype(np.int32))
        self.params = net.init(jax.random.PRNGKey(0), shape, jnp.float32)[1]
        self.state = net.init_state(shape, jnp.float32)
        self.key = jax.random.PRNGKey(1)
        self.step = step.lower(self.params, self.state, self.x, self.y, self.key).compile()

    def run(self) -> float:
        import jax
        start = time.perf_counter()
        self.params, self.state, value = self.step(self.params, self.state, self.x, self.y,
                                                   self.key)
        jax.block_until_ready((self.params, value))
        return time.perf_counter() - start


def library_child_main(args) -> int:
    """Times `LibraryCandidate` for each case of the spec file, interleaved with a PyTorch twin
    built after every library step is compiled (building the twin reads the config through
    `jaxbp.app`, which must not have been imported until then)."""
    with open(args.library_child) as f:
        specs = json.load(f)
    library = [LibraryCandidate(spec) for spec in specs]
    app = sorted(m for m in sys.modules if m.startswith("jaxbp.app"))
    if app:
        raise AssertionError(f"the library path imported the app: {', '.join(app)}")
    torch = None if args.no_torch else import_torch()[0]
    from jaxbp.torch_twins import Unsupported
    results = []
    for spec, candidate in zip(specs, library):
        candidates = {"library": candidate}
        if torch is not None:
            cfg, model, _, _ = setup_jax_case(spec["config"], spec["batch"])
            try:
                candidates["torch"] = TorchCandidate(torch, cfg, model, spec["batch"],
                                                     torch_device(torch))
            except Unsupported:  # the main process notes it
                pass
        times = time_rounds(candidates, args.rounds, args.warmup)
        results.append({name: summary(ts) for name, ts in times.items()})
    with open(args.library_child, "w") as f:
        json.dump(results, f)
    return 0


def run_library_child(args, specs: List[dict]) -> Optional[List[dict]]:
    """Runs `LibraryCandidate` for every case in a fresh process (the user's own defaults:
    importing jaxbp applies its runtime settings); its results, or None."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "library.json")
        with open(path, "w") as f:
            json.dump(specs, f)
        command = [sys.executable, os.path.abspath(__file__), "--library-child", path,
                   "--rounds", str(args.rounds), "--warmup", str(args.warmup),
                   *(["--no-torch"] if args.no_torch else [])]
        env = dict(os.environ)
        if USER_XLA_FLAGS is None:
            env.pop("XLA_FLAGS", None)
        else:
            env["XLA_FLAGS"] = USER_XLA_FLAGS
        if subprocess.run(command, env=env).returncode != 0:
            return None
        with open(path) as f:
            return json.load(f)


# ---------------------------------------------------------------- report

def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b


def derived(case: dict, ceiling_gflops: float) -> dict:
    """Ratios, throughput and share of the matmul ceiling of one (model, batch)."""
    c = case["candidates"]
    med = {k: v["median_ms"] for k, v in c.items()}
    defaults = case.get("defaults", {})
    hand = med["hand"]
    library = case.get("library", {}).get("median_ms")
    beside = case.get("library_torch")
    gflops = case["flops_per_step"] / (hand * 1e-3) / 1e9
    return {
        "library_over_hand": ratio(library, hand),
        "library_over_torch": ratio(library, beside and beside["median_ms"]),
        "library_over_torch_rounds": beside and round_ratio_range(case["library"], beside),
        "hand_over_autodiff": ratio(hand, med["autodiff"]),
        "hand_over_autodiff_rounds": round_ratio_range(c["hand"], c["autodiff"]),
        "hand_over_torch_rounds": round_ratio_range(c["hand"], c.get("torch")),
        "hand_over_tuned": ratio(hand, med.get("tuned")),
        "hand_over_torch": ratio(hand, med.get("torch")),
        "hand_over_defaults": ratio(hand, defaults.get("autodiff", {}).get("median_ms")),
        "hand_images_per_s": case["batch"] / (hand * 1e-3),
        "hand_gflops": gflops,
        "hand_share_of_matmul": gflops / ceiling_gflops,
        "residuals_hand_over_autodiff": ratio(c["hand"]["residual_bytes"],
                                              c["autodiff"]["residual_bytes"]),
    }


def _fmt(value, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _with_range(value: Optional[float], spread: Optional[List[float]]) -> str:
    """A ratio, with its range over the rounds in brackets when there is one."""
    if value is None or spread is None:
        return _fmt(value, ".2f")
    return f"{value:.2f} ({spread[0]:.2f}-{spread[1]:.2f})"


def _megabytes(n: Optional[int]) -> Optional[float]:
    return None if n is None else n / 2**20


def library_note(cases: List[dict]) -> str:
    """How the library column was measured, with the PyTorch step timed beside it."""
    beside = [f"{case['model']} {case['batch']} {case['library_torch']['median_ms']:.1f}"
              for case in cases if "library_torch" in case]
    how = ("`library` ran afterwards in a child process whose step was built and compiled from "
           "jaxbp alone: the config's layers from `jaxbp.nn`, `jax.value_and_grad`, SGD as a "
           "tree_map, one `jax.jit` donating parameters and state (the README's way).")
    if not beside:
        return how + " No PyTorch ran beside it: library/PyTorch is blank."
    return (how + " That child then built a PyTorch twin and timed the two in interleaved "
            "rounds; library/PyTorch is their ratio, with its range over the rounds (PyTorch's "
            f"ms there: {', '.join(beside)}).")


def markdown(report: dict) -> str:
    rows = ["| model | batch | hand ms | library ms | autodiff ms | tuned ms | PyTorch ms "
            "| defaults: autodiff / hand ms | hand/autodiff | hand/tuned | hand/PyTorch "
            "| library/PyTorch | hand img/s | hand GFLOP/s | of matmul "
            "| residual MB hand / autodiff / PyTorch |",
            "|" + "---|" * 16]
    for case in report["cases"]:
        c, d = case["candidates"], case["derived"]
        defaults = case.get("defaults", {})
        mb = [_fmt(_megabytes(c.get(k, {}).get("residual_bytes")), ".2f")
              for k in ("hand", "autodiff", "torch")]
        rows.append(
            f"| {case['model']} | {case['batch']} | {c['hand']['median_ms']:.1f} "
            f"| {_fmt(case.get('library', {}).get('median_ms'))} "
            f"| {c['autodiff']['median_ms']:.1f} | {_fmt(c.get('tuned', {}).get('median_ms'))} "
            f"| {_fmt(c.get('torch', {}).get('median_ms'))} "
            f"| {_fmt(defaults.get('autodiff', {}).get('median_ms'))} / "
            f"{_fmt(defaults.get('hand', {}).get('median_ms'))} "
            f"| {_with_range(d['hand_over_autodiff'], d['hand_over_autodiff_rounds'])} "
            f"| {_fmt(d['hand_over_tuned'], '.2f')} "
            f"| {_with_range(d['hand_over_torch'], d['hand_over_torch_rounds'])} "
            f"| {_with_range(d['library_over_torch'], d['library_over_torch_rounds'])} "
            f"| {d['hand_images_per_s']:,.0f} | {d['hand_gflops']:.1f} "
            f"| {100 * d['hand_share_of_matmul']:.0f}% | {' / '.join(mb)} |")
    env = report["environment"]
    lines = [f"# Training-step benchmark ({report['started']})", "",
             f"`{' '.join(report['command'])}`", "",
             f"{env['cpu_count']} CPUs, jax {env['jax']} on {env.get('jax_backend', 'cpu')}, "
             f"torch {env['torch'] or 'absent'} on {env.get('torch_device') or '-'}; "
             f"rounds {report['rounds']}, median of all timed steps after warm-up; in "
             "brackets, a ratio's range over the rounds (each round's medians). "
             f"Matmul ceiling ({MATMUL_SIZE}^3 float32, same process and settings): "
             f"{report['matmul_gflops']:.1f} GFLOP/s.", "",
             f"jaxbp runtime defaults applied: {', '.join(env['runtime_applied']) or 'none'}.",
             *(["`defaults` ran afterwards in a child process with JAXBP_TUNING=0 (JAX's "
                "defaults), not interleaved with the others."]
               if any("defaults" in case for case in report["cases"]) else []),
             *([library_note(report["cases"])]
               if any("library" in case for case in report["cases"]) else []),
             "", *rows, "",
             f"Load before: {json.dumps(report['load_before'])}",
             f"Load after: {json.dumps(report['load_after'])}", ""]
    for case in report["cases"]:
        for note in case["notes"]:
            lines.append(f"- {case['model']} {case['batch']}: {note}")
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def print_case(case: dict) -> None:
    c = case["candidates"]
    parts = [f"{k} {v['median_ms']:.1f} ms" for k, v in c.items() if k != "matmul"]
    for k, v in case.get("defaults", {}).items():
        parts.append(f"defaults-{k} {v['median_ms']:.1f} ms")
    if "library" in case:
        parts.append(f"library {case['library']['median_ms']:.1f} ms")
    if "library_torch" in case:
        parts.append(f"PyTorch beside it {case['library_torch']['median_ms']:.1f} ms")
    print(f"{case['model']:>8} {case['batch']:>5}: " + ", ".join(parts), flush=True)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated config names (configs/NAME.yaml) or YAML paths")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per candidate")
    parser.add_argument("--quick", action="store_true",
                        help="batch 128 only, 3 rounds; writes bench-quick.*")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--no-defaults", action="store_true",
                        help="skip the child process with JAX's defaults")
    parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results"))
    parser.add_argument("--no-library", action="store_true",
                        help="skip the child process timing the library-path step")
    parser.add_argument("--time-to-accuracy", nargs="?", const="lenet5", metavar="CONFIG",
                        help="wall time to --target test accuracy: jaxbp's CLI step, Flax and "
                             "PyTorch, same data and recipe (default config: lenet5); writes "
                             "time_to_accuracy.{json,md}")
    parser.add_argument("--epoch-overhead", nargs="?", const="lenet5", metavar="CONFIG",
                        help="where an epoch of `jaxbp train` goes against steps x the step "
                             "time (default config: lenet5); --rounds rounds")
    parser.add_argument("--target", type=float, default=0.91,
                        help="test accuracy for --time-to-accuracy (default 0.91)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override for --time-to-accuracy")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="images/s of the hand step of each --models config at each "
                             "--batches size, data parallel on 1..N devices (on the CPU, N "
                             "host devices: honest only up to the cores); writes "
                             "bench-devices.{json,md}")
    parser.add_argument("--child", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--library-child", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.rounds = ",".join(map(str, QUICK["batches"])), QUICK["rounds"]
    args.models = [m for m in args.models.split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    return args


def config_path(name: str) -> str:
    """A config name (configs/NAME.yaml) or a YAML path."""
    return name if name.endswith((".yaml", ".yml")) else os.path.join(REPO, "configs",
                                                                      f"{name}.yaml")


def time_to_accuracy_main(args) -> int:
    """`--time-to-accuracy`: see experiments/time_to_accuracy.py."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import time_to_accuracy
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = machine_load()
    torch, torch_note = (None, "PyTorch skipped (--no-torch)") if args.no_torch else import_torch()
    notes = [torch_note] if torch_note else []
    results = time_to_accuracy.run(config_path(args.time_to_accuracy), args.overrides,
                                   args.target, torch, torch_net, notes)
    report = {"started": started, "config": args.time_to_accuracy, "overrides": args.overrides,
              "target": args.target, "command": [os.path.relpath(sys.argv[0], REPO),
                                                 *sys.argv[1:]],
              "load_before": load_before, "load_after": machine_load(), "results": results,
              "notes": notes}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "time_to_accuracy.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# Time to {100 * args.target:.0f}% test accuracy ({started})", "",
             f"`{' '.join(report['command'])}`", "",
             *time_to_accuracy.markdown(results, args.target), "",
             f"Load before: {json.dumps(load_before)}",
             f"Load after: {json.dumps(report['load_after'])}", "",
             *(f"- {note}" for note in notes)]
    text = "\n".join(lines).rstrip() + "\n"
    with open(os.path.join(args.out, "time_to_accuracy.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def epoch_overhead_main(args) -> int:
    """`--epoch-overhead`: see experiments/epoch_overhead.py."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import epoch_overhead
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S"), machine_load()
    result = epoch_overhead.run(config_path(args.epoch_overhead), args.overrides, args.rounds)
    command = [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]
    report = {"started": started, "command": command, "config": args.epoch_overhead,
              "overrides": args.overrides, "rounds": args.rounds, "load_before": load_before,
              "load_after": machine_load(), **result}
    lines = [f"# Where an epoch goes ({started}, {os.cpu_count()} CPUs)", "",
             f"`{' '.join(command)}`; median of {args.rounds} interleaved rounds.", "",
             *epoch_overhead.markdown(result, args.epoch_overhead), "",
             f"Load before: {json.dumps(load_before)}",
             f"Load after: {json.dumps(report['load_after'])}"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "epoch_overhead.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "epoch_overhead.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def devices_main(args) -> int:
    """`--devices N`: the hand step on the first 1..N devices, interleaved rounds."""
    # XLA reads the host device count when its backend starts: nothing has computed yet.
    os.environ["XLA_FLAGS"] = runtime.with_xla_flags(
        os.environ.get("XLA_FLAGS", ""),
        (f"--xla_force_host_platform_device_count={args.devices}",))
    import jax
    from jaxbp.app import parallel
    from jaxbp.registry import HAND
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S"), machine_load()
    rows = []
    for name in args.models:
        for batch in args.batches:
            cfg, model, images, labels = setup_jax_case(name, batch)
            candidates = {n: JaxCandidate(model, HAND, cfg.optimizer.learning_rate, images,
                                          labels, parallel.make_mesh(parallel.mesh_devices(n)))
                          for n in range(1, args.devices + 1) if batch % n == 0}
            for n, rounds in time_rounds(candidates, args.rounds, args.warmup).items():
                entry = summary(rounds)
                rows.append({"model": name, "batch": batch, "devices": n,
                             "median_ms": entry["median_ms"],
                             "images_per_second": batch / (entry["median_ms"] * 1e-3)})
                print(f"{name} batch {batch} on {n} device(s): {entry['median_ms']:.2f} ms, "
                      f"{rows[-1]['images_per_second']:.0f} img/s", flush=True)
    report = {"started": started, "device": str(jax.devices()[0].device_kind),
              "cpu_count": os.cpu_count(), "rows": rows, "load_before": load_before,
              "load_after": machine_load()}
    lines = [f"# One training step on 1..{args.devices} devices ({started}, "
             f"{report['device']}, {report['cpu_count']} CPUs)", "",
             "| model | batch | devices | ms/step | images/s |", "|---|---|---|---|---|",
             *(f"| {r['model']} | {r['batch']} | {r['devices']} | {r['median_ms']:.2f} | "
               f"{r['images_per_second']:.0f} |" for r in rows), "",
             f"Load before: {json.dumps(load_before)}",
             f"Load after: {json.dumps(report['load_after'])}"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench-devices.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "bench-devices.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


def child_main(args) -> int:
    """Times hand and autodiff with whatever settings this process was started with."""
    results = [measure_case(m, b, args, None, False) for m in args.models for b in args.batches]
    with open(args.child, "w") as f:
        json.dump(results, f)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.library_child:
        return library_child_main(args)
    if args.time_to_accuracy:
        return time_to_accuracy_main(args)
    if args.devices:
        return devices_main(args)
    if args.epoch_overhead:
        return epoch_overhead_main(args)
    applied = runtime.applied()  # by `import jaxbp`, before any JAX computation
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = machine_load()
    import jax
    torch, torch_note = (None, "PyTorch skipped (--no-torch)") if args.no_torch else import_torch()
    notes = [torch_note] if torch_note else []
    args.matmul = MatmulCandidate()
    cases = []
    for model_name in args.models:
        for batch in args.batches:
            case = measure_case(model_name, batch, args, torch, True)
            cases.append(case)
            print_case(case)
    specs = [case.pop("library_spec") for case in cases]
    if args.no_library:
        notes.append("library child skipped (--no-library)")
    else:
        print("library, then PyTorch beside it (child process; the step from jaxbp alone) ...",
              flush=True)
        library = run_library_child(args, specs)
        if library is None:
            notes.append("library child process failed")
        for case, entry in zip(cases, library or []):
            case["library"] = entry["library"]
            if "torch" in entry:
                case["library_torch"] = entry["torch"]
            print_case(case)
    if args.no_defaults:
        notes.append("defaults child skipped (--no-defaults)")
    else:
        print("defaults (child process, JAXBP_TUNING=0) ...", flush=True)
        child = run_defaults_child(args)
        if child is None:
            notes.append("defaults child process failed")
        for case, child_case in zip(cases, child or []):
            case["defaults"] = {k: v for k, v in child_case["candidates"].items()}
            print_case(case)
    matmul_times = [t for case in cases for t in [case["candidates"]["matmul"]["median_ms"]]]
    ceiling = MatmulCandidate.flops / (statistics.median(matmul_times) * 1e-3) / 1e9
    for case in cases:
        case["derived"] = derived(case, ceiling)
    report = {
        "started": started, "command": [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]],
        "rounds": args.rounds, "warmup_steps": args.warmup, "matmul_gflops": ceiling,
        "environment": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "jax": jax.__version__, "torch": torch.__version__ if torch else None,
                        "jax_backend": jax.default_backend(),
                        "torch_device": torch_device(torch) if torch else None,
                        "runtime_applied": applied, "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "load_before": load_before, "load_after": machine_load(), "cases": cases,
        "notes": notes}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench-quick" if args.quick else "bench")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
