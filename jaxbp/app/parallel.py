"""Data parallelism on JAX's own sharding: a one-axis device mesh, replicated state, batches
split over the devices, and XLA's partitioner doing the rest.

Under `jax.jit`, arrays carry `NamedSharding`s of a mesh whose single axis is `data`:

  * the train state (parameters, optimizer state, the layers' state such as batch norm's
    running statistics, the step) and the running totals are replicated (`PartitionSpec()`);
  * each batch is split along its first axis over the devices (`PartitionSpec("data")`).

The jitted step is the single-device program, written for the global batch. XLA partitions
it: each device runs the forward and the hand rules' backward on its slice, and where the
program reduces over the batch (the mean loss's gradient with respect to replicated
parameters, batch norm's batch statistics) it inserts the all-reduce, once. So the numbers
are those of one device holding the whole batch, up to the order of floating-point sums.

The mesh's axis is `Auto` (the compiler chooses the intermediate shardings), not
`Explicit`: the hand rules reshape the batch together with other axes (a conv's kernel
gradient sums over batch and positions), which explicit sharding-in-types would make each
rule spell out.

Several processes (`jaxbp.app.distributed`): the mesh lists every process's devices, each
process's together, so each process holds one contiguous block of rows of every batch
(`process_rows`). Each process reads only that block and puts it on its own devices
(`jax.make_array_from_process_local_data`); the replicated state is the same array in every
process. `train.devices` counts the devices taken from each process.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxbp.app.experiment import RunError
from jaxbp.schema import ConfigError

AXIS = "data"


def mesh_devices(count: Optional[int] = None) -> list:
    """The first `count` devices of each process (None: all of them), process by process.

    Raises:
      RunError: `count` exceeds a process's device count, or (None) the processes have
        different device counts.
    """
    per_process = [jax.local_devices(process_index=p) for p in range(jax.process_count())]
    fewest = min(range(len(per_process)), key=lambda p: len(per_process[p]))
    have, platform = len(per_process[fewest]), per_process[fewest][0].platform
    whose = "this process has" if len(per_process) == 1 else f"process {fewest} has"
    if count is not None and count > have:
        raise RunError(f"train.devices={count}, but {whose} only {have} {platform} device(s) "
                       f"(null uses all of them)")
    if count is None and any(len(devices) != have for devices in per_process):
        raise RunError(f"the processes have different device counts ({whose} {have}); set "
                       f"train.devices to use as many of each")
    return [d for devices in per_process for d in devices[:count]]


def make_mesh(devices: Sequence) -> Mesh:
    """A one-axis mesh named `data` over `devices`, in their order."""
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Axis 0 (the batch) split evenly over the devices, the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def device_count(mesh: Mesh) -> int:
    return mesh.devices.size


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the devices.

    Raises:
      ConfigError: naming both numbers.
    """
    n = device_count(mesh)
    if batch_size % n:
        raise ConfigError(f"data.batch_size={batch_size} does not split evenly over {n} "
                          f"devices; choose a multiple of {n}, or set train.devices")


def replicate(tree, mesh: Mesh):
    """`tree`'s arrays copied to every device of `mesh`."""
    return jax.device_put(tree, replicated(mesh))


def process_rows(n: int, mesh: Mesh) -> slice:
    """The rows of an `n`-row batch (a multiple of the device count) that this process's
    devices hold under `batch_sharded(mesh)`: one block, the mesh keeping each process's
    devices together (`mesh_devices`); all `n` rows in a single process."""
    blocks = [index[0].indices(n) for index in
              batch_sharded(mesh).addressable_devices_indices_map((n,)).values()]
    return slice(min(start for start, _, _ in blocks), max(stop for _, stop, _ in blocks))


def shard_batch(arrays, mesh: Mesh):
    """Host arrays holding this process's rows of a batch (`process_rows`: the whole batch in
    a single process), as global arrays split along axis 0 over the devices of `mesh`."""
    sharding = batch_sharded(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), arrays)


def split_for(n: int, mesh: Mesh) -> int:
    """How many of `n` examples split evenly over the devices: the largest multiple of the
    device count not above `n`. The rest (fewer than the devices) go to every device whole."""
    return n - n % device_count(mesh)


def put_batch(images: np.ndarray, labels: np.ndarray, mesh: Mesh) -> list:
    """A whole batch of any size on the mesh, as a list of one or two (images, labels)
    pieces: the part that splits evenly, sharded (this process putting only its rows), then
    the remainder, replicated. Evaluation sums over examples, so the pieces give the batch's
    totals."""
    cut = split_for(len(labels), mesh)
    pieces = []
    if cut:
        rows = process_rows(cut, mesh)
        pieces.append(shard_batch((images[:cut][rows], labels[:cut][rows]), mesh))
    if cut < len(labels):
        pieces.append(replicate((images[cut:], labels[cut:]), mesh))
    return pieces
