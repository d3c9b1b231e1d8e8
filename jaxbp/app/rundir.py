"""The run-folder policy: never overwrite another run, resume from its newest checkpoint,
say what changed in the config since, and keep the last good checkpoint when training
diverges."""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import jax

from jaxbp.app import checkpoint, report
from jaxbp.app.experiment import RunError
from jaxbp.app.steps import TrainState


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


def resume_state(out_dir: str, epoch: int, template: TrainState) -> tuple[TrainState, dict]:
    """The state and meta of checkpoint `epoch`, in the template's structure and dtypes."""
    abstract = jax.eval_shape(lambda: template)
    try:
        restored = checkpoint.restore(out_dir, epoch, abstract.params, abstract.opt_state,
                                      abstract.model_state)
    except ValueError as exc:
        raise RunError(f"the checkpoint of epoch {epoch} in {checkpoint.checkpoint_dir(out_dir)} "
                       f"does not fit this config's model/optimizer: "
                       f"{str(exc).splitlines()[0]}") from None
    step = jax.numpy.asarray(restored.meta["step"], template.step.dtype)
    return TrainState(restored.params, restored.opt_state, restored.model_state,
                      step), restored.meta


def resumed(out_dir: str, latest: int, fresh: TrainState, cfg: Mapping
            ) -> tuple[TrainState, list[dict], list[str]]:
    """Checkpoint `latest`'s state, the metrics so far and the config changes since."""
    state, meta = resume_state(out_dir, latest, fresh)
    changes = config_changes(meta["config"], json.loads(json.dumps(cfg.to_dict())))
    return state, list(meta["metrics"]), changes


def evaluates(tcfg: Mapping, epoch: int) -> bool:
    """Every `eval_every` epochs and after the last."""
    return epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs


def checkpoints(tcfg: Mapping, epoch: int) -> bool:
    """Every `checkpoint_every` epochs and after the last; never when it is 0."""
    every = tcfg.checkpoint_every
    return every > 0 and (epoch % every == 0 or epoch == tcfg.epochs)


def divergence_message(loss: float, epoch: int, out_dir: str) -> str:
    latest = checkpoint.latest_epoch(out_dir)
    kept = (f"the last good checkpoint (epoch {latest}) is kept in "
            f"{checkpoint.checkpoint_dir(out_dir)}" if latest is not None
            else "no checkpoint had been written yet")
    return (f"training diverged in epoch {epoch}: loss {loss}, or non-finite parameters "
            f"(learning rate too high?); stopped, {kept}")
