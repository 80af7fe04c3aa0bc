"""Python's cyclic garbage collector, paused while a run starts.

Importing jax and flax and tracing the train step create hundreds of thousands of objects; each full
collection walks them all. On bench-small the collector's three full collections during start-up
cost 0.1 s of the imports and 0.1 s of the train step's lowering, single-threaded time that comes
straight off the first step. `llm-train` and the quick start pause it when they start; the trainer
resumes it once the first step is done (its collections then find the start-up's garbage).
"""

from __future__ import annotations

import gc

_paused = False


def pause_gc() -> None:
    """Turn the collector off until `resume_gc` (nothing if it is already off)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_gc() -> None:
    """Turn the collector back on if `pause_gc` turned it off."""
    global _paused
    if _paused:
        _paused = False
        gc.enable()
