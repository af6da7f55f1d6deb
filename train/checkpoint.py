"""Training checkpoints with orbax-checkpoint.

A checkpoint holds the train state (step, adapter tree, optimizer state) and
a JSON `meta` (data position, seed, the config it was written under). Orbax
writes each step into a temporary directory and renames it into place when
complete (commit_success), so a save interrupted by a crash is never seen
as a checkpoint: `latest_step` only lists finished ones.

Several processes: every process calls `save` and `restore` (orbax
synchronises them with barriers); each writes only the shards its devices
hold, and process 0 alone writes the metadata and the JSON `meta` and
finalises the step. The arrays are stored by global index (OCDBT), not by
process, so a checkpoint restores onto any process count and mesh shape.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int):
        self.directory = pathlib.Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max(keep, 1), create=True, enable_async_checkpointing=False,
                # Every process takes part (active_processes=None: orbax's
                # barriers wait for all) and process 0 finalises each step.
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=0, active_processes=None)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restores onto the shardings and dtypes of `like` (arrays of the
        current run), so a checkpoint restores onto any mesh."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.close()
