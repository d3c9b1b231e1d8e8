"""Orbax checkpoints of a run, one per completed epoch, in `<run dir>/checkpoints/<epoch>`.

Each checkpoint holds three items: `params` and `opt_state` (array pytrees,
`StandardSave`) and `meta` (JSON: epoch, step, the metrics records so far, the
resolved config). Saving is synchronous and orbax commits a step by renaming a
temporary folder, so a process killed mid-save leaves the previous checkpoint
intact; the leftover temporary folder is removed when the folder is next opened.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
KEEP = 3


class Restored(NamedTuple):
    params: Any
    opt_state: Any
    meta: dict


def checkpoint_dir(run_dir: str) -> str:
    return os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))


def _manager(directory: str, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=KEEP, create=create, enable_async_checkpointing=False,
        cleanup_tmp_directories=create)
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=("params", "opt_state", "meta"))


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

    def save(self, epoch: int, params, opt_state, meta: dict) -> None:
        self._manager.save(epoch, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore(run_dir: str, epoch: int, abstract_params, abstract_opt_state=None) -> Restored:
    """Reads checkpoint `epoch` into the structure, shapes and dtypes of the abstract trees.

    With `abstract_opt_state=None` only `params` and `meta` are read (evaluation).
    Raises ValueError (from orbax) when the stored trees do not fit the abstract ones.
    """
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    with _manager(checkpoint_dir(run_dir), create=False) as manager:
        out = manager.restore(epoch, args=ocp.args.Composite(**items))
    return Restored(out["params"], out.get("opt_state"), dict(out["meta"]))
