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

Single process only: `jax.device_put` of a host array onto the mesh needs every device to
be addressable. Several processes would need `jax.distributed.initialize` first, a mesh
over `jax.devices()` (all processes' devices), and each process putting only its own part
of the global batch (`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxbp.app.experiment import RunError
from jaxbp.schema import ConfigError

AXIS = "data"


def local_devices(count: Optional[int] = None) -> list:
    """The first `count` local devices (None: all of them).

    Raises:
      RunError: `count` exceeds the local device count.
    """
    devices = jax.local_devices()
    if count is None:
        return devices
    if count > len(devices):
        raise RunError(f"train.devices={count}, but this process has only {len(devices)} "
                       f"{devices[0].platform} device(s) (null uses all of them)")
    return devices[:count]


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


def shard_batch(arrays, mesh: Mesh):
    """Host arrays (a batch) split along axis 0 over the devices of `mesh`."""
    return jax.device_put(arrays, batch_sharded(mesh))


def split_for(n: int, mesh: Mesh) -> int:
    """How many of `n` examples split evenly over the devices: the largest multiple of the
    device count not above `n`. The rest (fewer than the devices) go to every device whole."""
    return n - n % device_count(mesh)


def put_batch(images: np.ndarray, labels: np.ndarray, mesh: Mesh) -> list:
    """A batch of any size on the mesh, as a list of one or two (images, labels) pieces: the
    part that splits evenly, sharded, then the remainder, replicated. Evaluation sums over
    examples, so the pieces give the batch's totals."""
    cut = split_for(len(labels), mesh)
    pieces = []
    if cut:
        pieces.append(shard_batch((images[:cut], labels[:cut]), mesh))
    if cut < len(labels):
        pieces.append(replicate((images[cut:], labels[cut:]), mesh))
    return pieces
