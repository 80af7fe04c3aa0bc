"""The model zoo: one decoder skeleton; families are choices of blocks made in config files."""

from llm_core.models.transformer import DecoderLayer, Transformer, build_model, output_logits

__all__ = ["DecoderLayer", "Transformer", "build_model", "output_logits"]
