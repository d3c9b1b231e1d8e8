"""Orbax checkpoints of a run, one per completed epoch, in `<run dir>/checkpoints/<epoch>`.

Each checkpoint holds `params` and `opt_state` (array pytrees, `StandardSave`),
`model_state` where the model keeps any (batch norm's running statistics), and `meta`
(JSON: epoch, step, the metrics records so far, the resolved config). Saving is
synchronous and orbax commits a step by renaming a temporary folder, so a process killed mid-save leaves the previous checkpoint
intact; the leftover temporary folder is removed when the folder is next opened.

Verification: orbax checks no checksums of array data (a flipped byte in a params file is
restored as a silently different number), so once orbax has committed a step, every file
of its folder is listed with its SHA-256 in `<epoch>/sha256.json` (`jaxbp.app.manifest`,
written atomically). `choose` picks the newest checkpoint whose files all match. A
checkpoint without a manifest was either written before jaxbp verified checkpoints or
lost its manifest (a kill between orbax's commit and the manifest, or a deletion): it
counts as *unverified but usable* when no older checkpoint of the run has a manifest (a
run from before verification), and as damaged otherwise (the run was already writing
manifests, so this one was cut short).
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxbp.app import distributed, manifest

CHECKPOINT_DIR = "checkpoints"
KEEP = 3


class Restored(NamedTuple):
    params: Any
    opt_state: Any
    model_state: Any
    meta: dict


class Damaged(NamedTuple):
    """A checkpoint that fails verification: its epoch, folder and what is wrong."""
    epoch: int
    path: str
    problem: str


class Choice(NamedTuple):
    """The newest usable checkpoint of a run (`epoch` None: there is none), whether its
    bytes were verified against its manifest, and the newer checkpoints that failed."""
    epoch: Optional[int]
    verified: bool
    damaged: tuple[Damaged, ...]


def checkpoint_dir(run_dir: str) -> str:
    return os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))


def step_dir(run_dir: str, epoch: int) -> str:
    """The folder of checkpoint `epoch` (orbax names a step's folder by its number)."""
    return os.path.join(checkpoint_dir(run_dir), str(epoch))


def _manager(directory: str, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=KEEP, create=create, enable_async_checkpointing=False,
        cleanup_tmp_directories=create)
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=("params", "opt_state", "model_state", "meta"))


def _holds_arrays(tree) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def epochs(run_dir: str) -> list[int]:
    """The epochs of the committed checkpoints in `run_dir`, oldest first."""
    directory = checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        return []
    with _manager(directory, create=False) as manager:
        return sorted(manager.all_steps())


def latest_epoch(run_dir: str) -> Optional[int]:
    """The epoch of the newest committed checkpoint in `run_dir`, or None if there is none."""
    return max(epochs(run_dir), default=None)


def choose(run_dir: str) -> Choice:
    """The newest checkpoint that verifies (or is unverified but usable, see the module
    docstring), checking from the newest down; older ones are not read."""
    committed = epochs(run_dir)
    damaged = []
    for i in reversed(range(len(committed))):
        folder = step_dir(run_dir, committed[i])
        if not manifest.has_manifest(folder) and not any(
                manifest.has_manifest(step_dir(run_dir, e)) for e in committed[:i]):
            return Choice(committed[i], False, tuple(damaged))
        problem = manifest.problem(folder)
        if problem is None:
            return Choice(committed[i], True, tuple(damaged))
        damaged.append(Damaged(committed[i], folder, problem))
    return Choice(None, False, tuple(damaged))


class CheckpointWriter:
    """Saves one checkpoint per call with its manifest, keeping the newest `KEEP`; use as a
    context manager. In a multi-process run every process saves (and so reads) the same
    folder, which must be one they all see."""

    def __init__(self, run_dir: str):
        self._run_dir = run_dir
        self._manager = _manager(checkpoint_dir(run_dir), create=True)

    def save(self, epoch: int, params, opt_state, meta: dict, model_state=None) -> None:
        items = {"params": ocp.args.StandardSave(params),
                 "opt_state": ocp.args.StandardSave(opt_state), "meta": ocp.args.JsonSave(meta)}
        if _holds_arrays(model_state):
            items["model_state"] = ocp.args.StandardSave(model_state)
        saved = self._manager.save(epoch, args=ocp.args.Composite(**items))
        self._manager.wait_until_finished()
        # Orbax skips an epoch not newer than its latest: bless no older bytes. Every process
        # saves (orbax writing each one's part, process 0 committing); the save returns once
        # the step is committed, and one process lists it.
        if saved and distributed.is_primary():
            manifest.write(step_dir(self._run_dir, epoch))

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_shapes(folder: str, abstract) -> None:
    """Raises ValueError when the array shapes stored in `folder` differ from the abstract
    tree's, leaf by leaf in order."""
    stored = [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(
        ocp.StandardCheckpointHandler().metadata(epath.Path(folder)))]
    wanted = [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(abstract)]
    if stored != wanted:
        raise ValueError(f"stored array shapes {stored} differ from the config's {wanted}")


def restore(run_dir: str, epoch: int, abstract_params, abstract_opt_state=None,
            abstract_model_state=None) -> Restored:
    """Reads checkpoint `epoch` into the structure, shapes and dtypes of the abstract trees.

    With `abstract_opt_state=None` only `params`, the model state and `meta` are read
    (evaluation). A model state without arrays is not stored, and comes back as given.
    Raises ValueError (from orbax) when the stored trees do not fit the abstract ones.
    """
    # Checked before orbax reads: its failed reads leave tasks that print tracebacks later.
    _check_shapes(os.path.join(step_dir(run_dir, epoch), "params"), abstract_params)
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    if _holds_arrays(abstract_model_state):
        items["model_state"] = ocp.args.StandardRestore(abstract_model_state)
    with _manager(checkpoint_dir(run_dir), create=False) as manager:
        out = manager.restore(epoch, args=ocp.args.Composite(**items))
    model_state = out["model_state"] if "model_state" in items else abstract_model_state
    return Restored(out["params"], out.get("opt_state"), model_state, dict(out["meta"]))
