"""Training checkpoints with orbax-checkpoint, verified when read back.

A checkpoint holds the train state (step, adapter tree, optimizer state) and
a JSON `meta` (data position, seed, the config it was written under). Orbax
writes each step into `<step>.orbax-checkpoint-tmp` and renames it into place
when complete, so a save cut short by `kill -9` is never listed as a
checkpoint; such leftovers are reported and removed when the next run opens
the directory.

A finished checkpoint can still be damaged later (a bad disk, a partial
copy). Orbax notices missing or garbled metadata, but a flipped byte in an
array file restores silently as a different number (measured with orbax
0.12.8: OCDBT data files carry no checksum). So each save also records a
fingerprint of the state and a digest of the meta, and `restore` compares
them. `restore_latest` walks back from the newest checkpoint: one that cannot
be read or fails the check is renamed to `<step>.corrupt` (kept for
inspection, out of orbax's way; it would otherwise block a new save of that
step and count against `keep`) and the previous one is tried, with a warning.

Several processes: every process calls `save` and `restore` (orbax
synchronises them with barriers); each writes only the shards its devices
hold, and process 0 alone writes the metadata and the JSON `meta` and
finalises the step. The arrays are stored by global index (OCDBT), not by
process, so a checkpoint restores onto any process count and mesh shape.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger("train.checkpoint")

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's atomicity_types.TMP_DIR_SUFFIX


class CorruptCheckpoint(ValueError):
    """No checkpoint of the run could be read back intact."""


# What damaged files make the readers raise (orbax, tensorstore and json:
# ValueError and its kin; a missing file). Anything else -- out of memory, an
# I/O error of the file system, an interrupt -- says nothing about the files
# and propagates, so a sound checkpoint is never set aside for it.
_DAMAGED = (ValueError, KeyError, TypeError, EOFError, FileNotFoundError, NotADirectoryError)


@jax.jit
def _fingerprint(leaves: list) -> jax.Array:
    """A uint32 checksum of the bits of every leaf, position-weighted by odd
    numbers so a flipped bit, a zeroed block or swapped elements all change
    it. Integer sums are exact in any order, so it is the same on any mesh,
    computed where the (possibly sharded) arrays live."""
    total = jnp.uint32(0)
    for j, x in enumerate(leaves):
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).ravel()
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1
        total = total + jnp.sum(bits * weights, dtype=jnp.uint32) * jnp.uint32(2 * j + 1)
    return total


def fingerprint(tree: Any) -> int:
    return int(_fingerprint(jax.tree_util.tree_leaves(tree)))


def _digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [""])[0][:200]) or type(e).__name__


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int):
        self.directory = pathlib.Path(directory).resolve()
        if self.directory.is_dir() and jax.process_index() == 0:
            leftovers = sorted(p.name for p in self.directory.iterdir() if TMP_SUFFIX in p.name)
            if leftovers:
                log.warning("%s: %d incomplete checkpoint save(s) of an interrupted run (%s) "
                            "were never finished; they are ignored and removed",
                            self.directory, len(leftovers), ", ".join(leftovers))
            for p in self.directory.iterdir():
                if p.name.isdigit() and not p.is_dir():  # would block the save of that step
                    self._set_aside(int(p.name), ValueError("not a directory"), reload=False)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max(keep, 1), create=True, enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
                # Every process takes part (active_processes=None: orbax's
                # barriers wait for all) and process 0 finalises each step.
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=0, active_processes=None)))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint (not yet verified: see restore_latest)."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        meta = {**meta, "integrity": {"state": fingerprint(state), "meta": _digest(meta)}}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def _read_meta(self, step: int) -> tuple[dict, int | None]:
        """(meta of `step`, checked against its digest; the state's fingerprint)."""
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        integrity = meta.pop("integrity", None)
        if integrity is None:
            log.warning("checkpoint %s was written without a fingerprint (by an older "
                        "version); it is restored unverified", self.directory / str(step))
            return meta, None
        if not isinstance(integrity, dict) or integrity.get("meta") != _digest(meta):
            raise CorruptCheckpoint(f"step {step}: the meta does not match its digest")
        return meta, integrity.get("state")

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restores onto the shardings and dtypes of `like` (arrays of the
        current run), so a checkpoint restores onto any mesh; raises
        CorruptCheckpoint if what was read is not what was written."""
        meta, expected = self._read_meta(step)
        return self._read_state(step, like, expected), meta

    def _read_state(self, step: int, like: Any, expected: int | None) -> Any:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        if expected is not None and fingerprint(state) != expected:
            raise CorruptCheckpoint(f"step {step}: the restored arrays do not match the "
                                    "fingerprint written with them")
        return state

    def restore_latest(self, like: Any, check_meta: Callable[[dict], None] = lambda m: None
                       ) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that reads back intact,
        or None when there is none. `check_meta(meta)` may raise to refuse a
        readable checkpoint (e.g. a different config): that is not corruption,
        so it propagates and nothing is moved."""
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta, expected = self._read_meta(step)
            except _DAMAGED as e:
                failed.append(self._set_aside(step, e))
                continue
            check_meta(meta)
            try:
                state = self._read_state(step, like, expected)
            except _DAMAGED as e:
                failed.append(self._set_aside(step, e))
                continue
            return step, state, meta
        if failed:
            raise CorruptCheckpoint(
                f"no checkpoint in {self.directory} reads back intact ({'; '.join(failed)}); "
                "rerun with --overwrite to start over, or choose another output_dir")
        return None

    def _set_aside(self, step: int, error: BaseException, reload: bool = True) -> str:
        src = self.directory / str(step)
        dst = src.with_name(f"{step}.corrupt")
        n = 0
        while dst.exists():
            n += 1
            dst = src.with_name(f"{step}.corrupt-{n}")
        if jax.process_index() == 0:
            src.rename(dst)
        if reload:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
            self.manager.reload()
        why = f"step {step}: {type(error).__name__}: {_first_line(error)}"
        log.warning("checkpoint %s cannot be restored (%s); moved to %s, trying the one "
                    "before it", src, why, dst.name)
        return why

    def close(self) -> None:
        self.manager.close()
