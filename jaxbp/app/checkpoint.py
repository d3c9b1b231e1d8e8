"""Orbax checkpoints of a run, one per completed epoch, in `<run dir>/checkpoints/<epoch>`.

Each checkpoint holds `params` and `opt_state` (array pytrees, `StandardSave`),
`model_state` where the model keeps any (batch norm's running statistics), and `meta`
(JSON: epoch, step, the metrics records so far, the resolved config). Saving is synchronous and orbax commits a step by renaming a
temporary folder, so a process killed mid-save leaves the previous checkpoint
intact; the leftover temporary folder is removed when the folder is next opened.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
KEEP = 3


class Restored(NamedTuple):
    params: Any
    opt_state: Any
    model_state: Any
    meta: dict


def checkpoint_dir(run_dir: str) -> str:
    return os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))


def _manager(directory: str, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=KEEP, create=create, enable_async_checkpointing=False,
        cleanup_tmp_directories=create)
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=("params", "opt_state", "model_state", "meta"))


def _holds_arrays(tree) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def latest_epoch(run_dir: str) -> Optional[int]:
    """The epoch of the newest committed checkpoint in `run_dir`, or None if there is none."""
    directory = checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        return None
    with _manager(directory, create=False) as manager:
        return manager.latest_step()


class CheckpointWriter:
    """Saves one checkpoint per call, keeping the newest `KEEP`; use as a context manager."""

    def __init__(self, run_dir: str):
        self._manager = _manager(checkpoint_dir(run_dir), create=True)

    def save(self, epoch: int, params, opt_state, meta: dict, model_state=None) -> None:
        items = {"params": ocp.args.StandardSave(params),
                 "opt_state": ocp.args.StandardSave(opt_state), "meta": ocp.args.JsonSave(meta)}
        if _holds_arrays(model_state):
            items["model_state"] = ocp.args.StandardSave(model_state)
        self._manager.save(epoch, args=ocp.args.Composite(**items))
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore(run_dir: str, epoch: int, abstract_params, abstract_opt_state=None,
            abstract_model_state=None) -> Restored:
    """Reads checkpoint `epoch` into the structure, shapes and dtypes of the abstract trees.

    With `abstract_opt_state=None` only `params`, the model state and `meta` are read
    (evaluation). A model state without arrays is not stored, and comes back as given.
    Raises ValueError (from orbax) when the stored trees do not fit the abstract ones.
    """
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    if _holds_arrays(abstract_model_state):
        items["model_state"] = ocp.args.StandardRestore(abstract_model_state)
    with _manager(checkpoint_dir(run_dir), create=False) as manager:
        out = manager.restore(epoch, args=ocp.args.Composite(**items))
    model_state = out["model_state"] if "model_state" in items else abstract_model_state
    return Restored(out["params"], out.get("opt_state"), model_state, dict(out["meta"]))
