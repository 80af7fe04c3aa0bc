"""The one place llm-train reaches for llm-core's model API."""

from __future__ import annotations

try:  # pragma: no cover - TEMPORARY until llm-core's model lands on main
    from llm_core import build_model, create_mesh, logical_sharding
except ImportError:  # pragma: no cover
    from llm_train._standin import build_model, create_mesh, logical_sharding

__all__ = ["build_model", "create_mesh", "logical_sharding"]
