"""The run-folder policy: never overwrite another run, resume from its newest intact
checkpoint, say what changed in the config since, and keep the last good checkpoint when
training diverges.

Damaged checkpoints (see `checkpoint.choose`) are never deleted: evaluation skips them;
a resumed run, which is about to write those epochs again, first moves them to
`<run dir>/damaged_checkpoints/<epoch>` (orbax would otherwise keep them as the newest
steps and skip the new saves).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax

from jaxbp.app import checkpoint, report
from jaxbp.app.experiment import RunError
from jaxbp.app.steps import TrainState


DAMAGED_DIR = "damaged_checkpoints"
FRESH = checkpoint.Choice(None, False, ())


def usable_checkpoint(run_dir: str) -> checkpoint.Choice:
    """`checkpoint.choose`; a RunError when the run has checkpoints but none is usable."""
    choice = checkpoint.choose(run_dir)
    if choice.epoch is None and choice.damaged:
        problems = "; ".join(f"epoch {d.epoch}: {d.problem}" for d in choice.damaged)
        raise RunError(f"no intact checkpoint in {checkpoint.checkpoint_dir(run_dir)} "
                       f"({problems}); nothing was changed or deleted")
    return choice


def damage_note(damaged: checkpoint.Damaged) -> str:
    return (f"the checkpoint of epoch {damaged.epoch} in {damaged.path} is damaged "
            f"({damaged.problem})")


def unverified_note(epoch: int) -> str:
    return (f"note: the checkpoint of epoch {epoch} has no checksum manifest (written "
            f"before jaxbp verified checkpoints); using it unverified")


def set_aside(out_dir: str, damaged: Sequence[checkpoint.Damaged]) -> list[str]:
    """Moves damaged checkpoints to `<out_dir>/damaged_checkpoints/<epoch>` (`.2`, `.3`, ...
    when that is taken by an earlier one); says where each went."""
    notes = []
    for d in damaged:
        base = os.path.join(os.path.abspath(out_dir), DAMAGED_DIR, str(d.epoch))
        dest, n = base, 1
        while os.path.exists(dest):
            n += 1
            dest = f"{base}.{n}"
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.rename(d.path, dest)
        notes.append(f"{damage_note(d)}; moved to {dest}, not deleted")
    return notes


def check_run_dir(out_dir: str, resume: bool) -> checkpoint.Choice:
    """The checkpoint to resume from (`FRESH`: start afresh); refuses to overwrite another
    run, or to resume when every checkpoint is damaged."""
    if resume:
        return usable_checkpoint(out_dir)
    latest = checkpoint.latest_epoch(out_dir)
    if latest is not None:
        raise RunError(f"{out_dir} already holds checkpoints of a run (up to epoch {latest}); "
                       f"pass --resume to continue it, or choose another --out")
    if os.path.exists(os.path.join(out_dir, report.METRICS_FILE)):
        raise RunError(f"{out_dir} already holds the {report.METRICS_FILE} of a run; pass "
                       f"--resume to train it again from its last checkpoint (or from the "
                       f"start if it has none), or choose another --out")
    return FRESH


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


def restore(run_dir: str, epoch: int, abstract_params, abstract_opt_state=None,
            abstract_model_state=None) -> checkpoint.Restored:
    """`checkpoint.restore`, its failures as one-line RunErrors."""
    where = f"the checkpoint of epoch {epoch} in {checkpoint.step_dir(run_dir, epoch)}"
    try:
        return checkpoint.restore(run_dir, epoch, abstract_params, abstract_opt_state,
                                  abstract_model_state)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # only an unverified one
        raise RunError(f"{where} is unreadable: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:
        model = "model" if abstract_opt_state is None else "model/optimizer"
        raise RunError(f"{where} does not fit this config's {model}: "
                       f"{str(exc).splitlines()[0]}") from None


def restore_newest(run_dir: str, model, dtype, echo: Callable = print) -> tuple[int, Any, Any]:
    """(epoch, params, model state) of the newest intact checkpoint in `run_dir`, read into
    `model`'s structure in `dtype`; says which damaged ones it skipped (none is moved or
    deleted) and when it is unverified.

    Raises:
      RunError: no checkpoint, none intact, or one that does not fit the model.
    """
    choice = usable_checkpoint(run_dir)
    if choice.epoch is None:
        raise RunError(f"no checkpoint found in {checkpoint.checkpoint_dir(run_dir)}")
    for damaged in choice.damaged:
        echo(f"{damage_note(damaged)}; skipped")
    if not choice.verified:
        echo(unverified_note(choice.epoch))
    if choice.damaged:
        echo(f"using the checkpoint of epoch {choice.epoch}, the newest intact one")
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dtype=dtype))
    abstract_state = jax.eval_shape(lambda: model.init_state(dtype))
    restored = restore(run_dir, choice.epoch, abstract, abstract_model_state=abstract_state)
    return choice.epoch, restored.params, restored.model_state


def resume_state(out_dir: str, epoch: int, template: TrainState, sharding=None
                 ) -> tuple[TrainState, dict]:
    """The state and meta of checkpoint `epoch`, in the template's structure and dtypes;
    its arrays placed by `sharding` (every process reading its part) unless None."""
    abstract = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        jax.eval_shape(lambda: template))
    restored = restore(out_dir, epoch, abstract.params, abstract.opt_state,
                       abstract.model_state)
    step = jax.numpy.asarray(restored.meta["step"], template.step.dtype)
    return TrainState(restored.params, restored.opt_state, restored.model_state,
                      step), restored.meta


def resumed(out_dir: str, latest: int, fresh: TrainState, cfg: Mapping, sharding=None
            ) -> tuple[TrainState, list[dict], list[str]]:
    """Checkpoint `latest`'s state (placed by `sharding`), the metrics so far and the config
    changes since."""
    state, meta = resume_state(out_dir, latest, fresh, sharding)
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
