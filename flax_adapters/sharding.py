"""Device mesh, logical axis names and the rules that map them to mesh axes.

One mesh with named axes (data, fsdp, tensor). Model code names the axes of
each parameter logically ('embed', 'heads', 'mlp', 'vocab', ...); the rules
below map a logical name to mesh axes, maxtext-style. A dimension that the
mesh axes do not divide evenly is replicated rather than padded, so any
mesh runs any model (e.g. SmolLM2's 3 kv heads on tensor=2).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch spans data and fsdp (fsdp is data
# parallelism whose parameters are sharded too); parameters shard their
# model dimension over fsdp and their head / MLP / vocab dimension over tensor.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    # Mixtures of experts' stacked kernels (E, in, out): expert parallelism over tensor,
    # where activations are replicated, so each tensor shard runs its own experts on
    # every token and the outputs sum over the shards; 'mlp' in the same leaf then stays
    # whole (a mesh axis shards one dimension). Where tensor does not divide E, the
    # experts are replicated and 'mlp' takes tensor instead.
    "expert": ("tensor",),
    "norm": None,
    "rank": None,  # adapter ranks and bottlenecks are small: replicated
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 takes the remaining devices (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes of `cfg` on `num_devices` devices (-1 resolved)."""
    shape = [cfg.data, cfg.fsdp, cfg.tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh {cfg}: at most one axis may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh {cfg}: {num_devices} devices are not divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} needs "
                         f"{int(np.prod(shape))} devices, but {num_devices} are available")
    return tuple(shape)


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every process's).

    Devices are laid out process by process (then by id), so along the
    flattened mesh each process holds one contiguous block: the batch rows of
    a process's devices are then one contiguous block of the global batch
    too (or, when a tensor group spans processes, the same block on each of
    them), and no batch shard straddles processes needlessly."""
    devices = sorted(devices if devices is not None else jax.devices(),
                     key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices).reshape(mesh_shape(cfg, len(devices))), MESH_AXES)


def abstract_mesh(cfg: MeshConfig, num_devices: int) -> jax.sharding.AbstractMesh:
    """The mesh of `cfg` on `num_devices` devices that need not exist (for
    planning: shardings and shard shapes, no devices touched)."""
    return jax.sharding.AbstractMesh(mesh_shape(cfg, num_devices), MESH_AXES)


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec of one array from its logical axes, replicating any
    dimension the mapped mesh axes do not divide."""
    out, used = [], set()
    for name, dim in zip(axes, shape):
        mesh_axes = RULES.get(name) if name else None
        if mesh_axes:
            mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
            size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
            if mesh_axes and dim % size == 0:
                used.update(mesh_axes)
                out.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
                continue
        out.append(None)
    return P(*out)


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """`x` pinned to the logical `axes` on the current mesh (`on_mesh`, or
    `jax.set_mesh`); unchanged without one, or on a mesh without our axes.

    The models pin their residual stream to ("batch", None, None) and their
    logits to ("batch", None, "vocab"): left to itself, XLA's sharding
    propagation follows the fsdp-sharded 'embed' dimension of the weights into
    the activations and all-reduces whole activations (the full-batch logits
    included) instead of gathering the weights (bench/collectives.py)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh))


def on_mesh(fn: Any, mesh: Mesh) -> Any:
    """`fn`, traced with `mesh` as the current (abstract) mesh, so that the
    models' `constrain` calls apply: wrap a function before `jax.jit`."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    # jit names its computation after this (a partial has no name of its own)
    traced.__name__ = getattr(getattr(fn, "func", fn), "__name__", "traced")
    return traced


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree, given a same-structure tree of logical axes
    (tuples; leaves of `axes_tree`) and of arrays or ShapeDtypeStructs."""
    flat_shapes, treedef = jax.tree_util.tree_flatten(shapes_tree)
    flat_axes = treedef.flatten_up_to(axes_tree)
    return treedef.unflatten([NamedSharding(mesh, spec_for(tuple(a or ()), x.shape, mesh))
                              for a, x in zip(flat_axes, flat_shapes)])


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(batch: dict, accum: int, batch_sh: NamedSharding) -> dict:
    """(B, t) host rows -> (accum, B / accum, t) global arrays laid out by
    `batch_sh` (each process passes the rows its devices hold)."""
    out = {}
    for k, v in batch.items():
        v = v.reshape(accum, v.shape[0] // accum, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sh, v)
    return out


def assemble(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
             make: Any) -> jax.Array:
    """The global array of `shape` laid out by `sharding`, built shard by
    shard: `make(index, device)` returns the single-device array of the
    slice `index` (a tuple of slices, as `addressable_devices_indices_map`
    gives) on `device`. Like `jax.make_array_from_callback`, except that the
    callback knows the device, so it can compute there (e.g. quantize) rather
    than on the default device; a slice that several devices replicate is
    made once and copied."""
    made: dict = {}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
        key = tuple(s.indices(n) for s, n in zip(index, shape))
        if key in made:
            arrays.append(jax.device_put(made[key], device))
        else:
            arrays.append(made.setdefault(key, make(index, device)))
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)
