"""The model zoo: one decoder skeleton; families are choices of blocks made in config files."""

from llm_core.models.placement import LayerKind, Placement, Segment, layer_kinds, layer_placement
from llm_core.models.transformer import DecoderLayer, Transformer, build_model, unstack_layers

__all__ = [
    "DecoderLayer",
    "LayerKind",
    "Placement",
    "Segment",
    "Transformer",
    "build_model",
    "layer_kinds",
    "layer_placement",
    "unstack_layers",
]
