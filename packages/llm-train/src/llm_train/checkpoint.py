"""The one file that talks to orbax-checkpoint (its API moves; keep the churn here).

A training checkpoint is one orbax step folder holding two items saved together:
  state/  the train state pytree (params, optimizer state, step, RNG), sharded arrays
  data/   JSON: every process's grain iterator state, {"processes": [state_0, state_1, ...]}
          (all equal: the pipelines follow one global data order, so any process count resumes)
Orbax writes a step into a temporary folder and renames it when complete, so a save killed half-way
never damages the last good checkpoint.

orbax is imported, and its manager made, on first use: a fresh run's first step does not wait for
it (0.12 s of a cold start).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

STATE, DATA = "state", "data"


def _gather_json(obj) -> list:
    """Every process's JSON-able object, on every process (in process order)."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    every = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, sizes)]


class Checkpointer:
    """Async save every N steps, keep the last K, restore the latest (exact resume)."""

    def __init__(self, directory: str, keep: int = 3, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        self._keep, self._use_async = keep, use_async
        self._manager = None

    @property
    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            options = ocp.CheckpointManagerOptions(
                max_to_keep=self._keep if self._keep > 0 else None,
                enable_async_checkpointing=self._use_async,
                create=True,
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def latest_step(self) -> int | None:
        if self._manager is None and not _listable(self.directory):
            return None  # nothing saved yet: no need for orbax
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        if self._manager is None and not _listable(self.directory):
            return []
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
        import orbax.checkpoint as ocp

        data = {"processes": _gather_json(data_state)}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data)}
            ),
            force=force,
        )

    def restore(self, abstract_state, step: int | None = None):
        """(state, this process's data-iterator state or None) of `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        import orbax.checkpoint as ocp

        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore()}
            ),
        )
        processes = (out[DATA] or {}).get("processes", [])
        data_state = None
        if processes:
            if len(processes) == jax.process_count():
                data_state = processes[jax.process_index()]
            elif all(p == processes[0] for p in processes):
                data_state = processes[0]  # one global data order: any process count resumes
            else:
                raise RuntimeError(
                    f"Checkpoint step {step} in {self.directory} was written by "
                    f"{len(processes)} processes whose data iterators differ (a per-process data "
                    f"order), but {jax.process_count()} are running: the data iterator position "
                    "cannot be carried over; resume with the same process count or start a new "
                    "run_name."
                )
        return out[STATE], data_state

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()


def _listable(directory: str) -> bool:
    """Whether `directory` exists with anything in it (where a checkpoint could be)."""
    return os.path.isdir(directory) and any(os.scandir(directory))
