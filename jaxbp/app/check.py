"""`jaxbp check`: the whole network's hand-derived gradient against `jax.grad` of its plain twin.

On the first training batch (epoch 1's order), the gradient of the first train step's loss
(training mode: batch statistics, the same dropout masks through both) with respect to every
parameter is computed through the hand-derived `custom_vjp` rules (`ops=HAND`) and by JAX
differentiating the plain twins (`ops=REFERENCE`).

In float64 the hand gradient is held to the twin's: per parameter,
`jaxbp.testing.relative_error` (max|hand - reference| / max|reference|) at most
`jaxbp.testing.TOLERANCE["float64"]` (1e-10), the error measure and tolerance of the layer
tests and `check_rule`.

In float32 two float32 gradients can differ by more than rounding suggests, and neither is
the better judge: each long reduction (batch norm sums 100,000 values per channel at batch
128) rounds differently, and cancellation in the backward magnifies it. So both float32
gradients are measured against the twins' gradient in float64 on the same values (the
truth, up to 1e-16). A parameter passes when the hand rule's error is at most the float32
tolerance (1e-4) or at most twice the largest error autodiff makes in float32 anywhere in
the network: rounding errors travel through the layers, and which parameter they land on
differs between two ways of computing the same gradient, so the network's float32 noise
level is the yardstick, not one parameter's. (A deep batch-norm network at initialisation
on real images reaches 6e-3 in float32, through the hand rules and through autodiff alike.)
A wrong rule is off by far more (a factor 2 in a delta: 0.5 relative); float64, the default,
is the proof at 1e-10.

A gradient that is zero in exact arithmetic but not in floating point, such as a conv bias
right before batch norm (the normalisation removes any per-channel constant, so its delta
sums to 0 over each channel), holds only rounding noise, and noise divided by noise is no
error measure: a parameter whose exact gradient is below the tolerance times the largest
gradient entry of the whole network is measured against that largest entry (`scale:
network` in the table).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.app import data
from jaxbp.app.experiment import init_params, setup
from jaxbp.app.report import write_atomic
from jaxbp.app.steps import training_loss
from jaxbp.registry import HAND, REFERENCE
from jaxbp.testing import TOLERANCE, relative_error

CHECK_FILE = "check.json"


AUTODIFF_MARGIN = 2.0  # in float32, a hand error up to this multiple of autodiff's passes


def _error(actual, truth, tolerance: float, network_scale: float) -> tuple[float, str]:
    """(relative error, "own" or "network"): see the module docstring."""
    if float(np.max(np.abs(truth), initial=0.0)) < tolerance * network_scale:
        return float(np.max(np.abs(actual - truth), initial=0.0)) / network_scale, "network"
    return relative_error(actual, truth), "own"


def compare(name: str, hand, truth, tolerance: float, network_scale: float = 0.0,
            autodiff=None) -> dict:
    """One table row: the error of `hand` against `truth`, and in float32 (`autodiff`, the
    twins' float32 gradient, given) autodiff's error against the same truth. `ok` holds the
    hand error to `tolerance`; `gradient_check` widens it in float32."""
    hand, truth = np.asarray(hand, np.float64), np.asarray(truth, np.float64)
    rel_error, scale = _error(hand, truth, tolerance, network_scale)
    row = {"parameter": name, "shape": list(hand.shape),
           "max_abs_error": float(np.max(np.abs(hand - truth), initial=0.0)),
           "max_rel_error": rel_error, "scale": scale, "ok": bool(rel_error <= tolerance)}
    if autodiff is not None:
        row["autodiff_rel_error"] = _error(np.asarray(autodiff, np.float64), truth, tolerance,
                                           network_scale)[0]
    return row


def _gradients(model, ops, params, images, labels, seed: int):
    loss = training_loss(model, ops, seed, images.dtype)
    return jax.jit(jax.value_and_grad(loss))(params, images, labels)


def gradient_check(model, params, images, labels, tolerance: float, seed: int = 0) -> dict:
    """Rows for the loss value and for every parameter's gradient, plus the overall verdict
    (float64 params and images: hand against the twins; float32: both against the twins in
    float64)."""
    hand_loss, hand_grads = _gradients(model, HAND, params, images, labels, seed)
    ref_loss, ref_grads = _gradients(model, REFERENCE, params, images, labels, seed)
    autodiff = None
    if images.dtype != jnp.float64:
        with jax.enable_x64(True):
            wide = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                          (params, images))
            autodiff = (ref_loss, ref_grads)
            ref_loss, ref_grads = jax.device_get(
                _gradients(model, REFERENCE, *wide, labels, seed))
    named_hand = jax.tree_util.tree_flatten_with_path(hand_grads)[0]
    truths = jax.tree_util.tree_leaves(ref_grads)
    autodiffs = ([None] * len(truths) if autodiff is None
                 else jax.tree_util.tree_leaves(autodiff[1]))
    network_scale = max((float(np.max(np.abs(r))) for r in truths), default=0.0)
    rows = [compare("(loss value)", hand_loss, ref_loss, tolerance,
                    autodiff=None if autodiff is None else autodiff[0])]
    for (path, hand), truth, auto in zip(named_hand, truths, autodiffs):
        rows.append(compare(jax.tree_util.keystr(path, simple=True, separator="/"),
                            hand, truth, tolerance, network_scale, auto))
    result = {"tolerance": tolerance, "rows": rows}
    if autodiff is not None:
        noise = max(r["autodiff_rel_error"] for r in rows)
        allowed = max(tolerance, AUTODIFF_MARGIN * noise)
        rows = [dict(r, ok=bool(r["max_rel_error"] <= allowed)) for r in rows]
        result.update(rows=rows, autodiff_worst_rel_error=noise, allowed=allowed)
    return {**result, "ok": all(r["ok"] for r in rows)}


def format_table(result: dict) -> str:
    float32 = "autodiff_rel_error" in result["rows"][0]
    header = ("parameter", "shape", "max abs error", "max rel error",
              *(("autodiff rel error",) if float32 else ()), "scale", "ok")
    lines = [(r["parameter"], "x".join(map(str, r["shape"])) or "()", f"{r['max_abs_error']:.3e}",
              f"{r['max_rel_error']:.3e}",
              *((f"{r['autodiff_rel_error']:.3e}",) if float32 else ()),
              r["scale"], "ok" if r["ok"] else "FAIL") for r in result["rows"]]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    verdict = "all gradients agree" if result["ok"] else "GRADIENTS DISAGREE"
    if float32:
        limit = (f"error against the twins in float64 at most {result['allowed']:.1e}: the "
                 f"tolerance {result['tolerance']:g}, or {AUTODIFF_MARGIN:g}x autodiff's worst "
                 f"float32 error {result['autodiff_worst_rel_error']:.1e}")
    else:
        limit = f"tolerance {result['tolerance']:g} relative against the twins"
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*row) for row in lines),
                      f"{verdict} ({limit}, {result['precision']})"])


def run_check(cfg: Mapping, out_dir: str, echo: Callable = print) -> dict:
    """Checks the config's network on its first training batch; writes `out_dir`/check.json."""
    precision = cfg.train.precision
    exp = setup(cfg, splits=("train",))
    images, labels = next(iter(data.epoch_batches(exp.train, cfg.data.batch_size,
                                                  cfg.train.seed, 1)))
    params = init_params(exp.model, cfg.train.seed, exp.dtype)
    result = gradient_check(exp.model, params, jnp.asarray(images, exp.dtype),
                            jnp.asarray(labels), TOLERANCE[precision], cfg.train.seed)
    result = {"precision": precision, "batch_size": len(labels), **result}
    echo(format_table(result))
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, CHECK_FILE), json.dumps(result, indent=2) + "\n")
    return result
