"""llm-serve."""

__version__ = "0.1.0"
