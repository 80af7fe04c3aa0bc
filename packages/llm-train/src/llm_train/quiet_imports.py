"""Imports that skip optional dependencies they would load for nothing.

Some libraries import a heavy optional package as soon as it is installed, only to offer an
integration llm-train does not use; on a cold start that import sits before the first step. Hiding
the package for the duration of the import makes their `import` of it raise ImportError, which they
handle by leaving the integration out.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def without(*names: str) -> Iterator[None]:
    """Hide the not yet loaded modules `names` (`import` of them raises ImportError) inside the
    block; a module already loaded is left alone, so callers that use it keep working."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
