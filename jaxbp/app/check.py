"""`jaxbp check`: the whole network's hand-derived gradient against `jax.grad` of its plain twin.

On the first training batch (epoch 1's order), the gradient of the loss with
respect to every parameter is computed twice: through the hand-derived
`custom_vjp` rules (`ops=HAND`) and by JAX differentiating the plain twins
(`ops=REFERENCE`). Per parameter the error is `jaxbp.testing.relative_error`
(max|hand - reference| / max|reference|, the absolute error where the reference is all
zero) against `jaxbp.testing.TOLERANCE` (1e-10 in float64, 1e-4 in float32): the one
error measure and tolerance of the layer tests, `check_rule` and the benchmark.

One exception: a gradient that is zero in exact arithmetic but not in floating point, such
as a conv bias right before batch norm (the normalisation removes any per-channel constant,
so its delta sums to 0 over each channel), holds only rounding noise, and noise divided by
noise is no error measure. A parameter whose reference gradient is below the tolerance times
the largest gradient entry of the whole network is measured against that largest entry
instead (`scale: network` in the table).
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


def compare(name: str, hand, reference, tolerance: float, network_scale: float = 0.0) -> dict:
    """One table row: the errors of `hand` against `reference`, relative to the largest
    reference entry, or to `network_scale` where that entry is below tolerance times it."""
    hand, reference = np.asarray(hand, np.float64), np.asarray(reference, np.float64)
    abs_error = float(np.max(np.abs(hand - reference), initial=0.0))
    own_scale = float(np.max(np.abs(reference), initial=0.0))
    if own_scale < tolerance * network_scale:
        scale, rel_error = "network", abs_error / network_scale
    else:
        scale, rel_error = "own", relative_error(hand, reference)
    return {"parameter": name, "shape": list(hand.shape), "max_abs_error": abs_error,
            "max_rel_error": rel_error, "scale": scale, "ok": bool(rel_error <= tolerance)}


def gradient_check(model, params, images, labels, tolerance: float, seed: int = 0) -> dict:
    """Rows for the loss value and for every parameter's gradient, plus the overall verdict.

    The loss is the first train step's (training mode: batch statistics, and the same
    dropout masks through both, drawn from `seed`)."""
    def loss_and_grad(ops):
        loss = training_loss(model, ops, seed, images.dtype)
        return jax.jit(jax.value_and_grad(loss))(params, images, labels)

    hand_loss, hand_grads = loss_and_grad(HAND)
    ref_loss, ref_grads = loss_and_grad(REFERENCE)
    rows = [compare("(loss value)", hand_loss, ref_loss, tolerance)]
    named_hand = jax.tree_util.tree_flatten_with_path(hand_grads)[0]
    references = jax.tree_util.tree_leaves(ref_grads)
    network_scale = max((float(jnp.max(jnp.abs(r))) for r in references), default=0.0)
    for (path, hand), ref in zip(named_hand, references):
        rows.append(compare(jax.tree_util.keystr(path, simple=True, separator="/"),
                            hand, ref, tolerance, network_scale))
    return {"tolerance": tolerance, "ok": all(r["ok"] for r in rows), "rows": rows}


def format_table(result: dict) -> str:
    header = ("parameter", "shape", "max abs error", "max rel error", "scale", "ok")
    lines = [(r["parameter"], "x".join(map(str, r["shape"])) or "()", f"{r['max_abs_error']:.3e}",
              f"{r['max_rel_error']:.3e}", r["scale"], "ok" if r["ok"] else "FAIL")
             for r in result["rows"]]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    verdict = "all gradients agree" if result["ok"] else "GRADIENTS DISAGREE"
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*row) for row in lines),
                      f"{verdict} (tolerance {result['tolerance']:g} relative, "
                      f"{result['precision']})"])


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
