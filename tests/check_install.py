"""Run inside a venv holding one package: fail if it pulled in what that package must not need.

`flax` itself requires optax and orbax-checkpoint (and llm-core uses orbax for native checkpoints), so
those arrive through llm-core; llm-convert itself must not ask for them.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement

FORBIDDEN = {
    "llm-convert": {"grain", "fastapi", "uvicorn", "starlette", "llm-train", "llm-serve"},
}
NOT_OURS = {"llm-convert": {"optax", "orbax-checkpoint", "grain"}}


def main(package: str) -> int:
    installed = {d.metadata["Name"].lower() for d in metadata.distributions()}
    pulled = sorted(installed & FORBIDDEN[package])
    direct = {
        Requirement(r).name.lower()
        for r in (metadata.requires(package) or [])
        if "extra ==" not in r
    }
    declared = sorted(direct & NOT_OURS[package])
    if pulled or declared:
        print(f"FAIL: {package} pulled in {pulled}; our packages declare {declared}")
        return 1
    print(
        f"ok: {package} installs {len(installed)} distributions, none of {sorted(FORBIDDEN[package])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
