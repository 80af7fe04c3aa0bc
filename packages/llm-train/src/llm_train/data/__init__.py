"""grain data pipelines: document sources, tokenizers, packing and batching."""
