"""The one place llm-train reaches for llm-core's model API."""

from __future__ import annotations

from llm_core import build_model, create_mesh, state_shardings

__all__ = ["build_model", "create_mesh", "state_shardings"]
