"""hf-to-native streams: with slabs and chunks shrunk so every 2-D weight of a tiny model goes
through the slab path (transposed Linear weights by columns, embeddings by rows), the streamed
checkpoint loads to the same logits and exports back to identical tensors in several shards."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_hf import build_hf_model

import llm_core
import llm_core.streamed
from llm_convert import hf_to_native, load_hf, native_to_hf

pytestmark = pytest.mark.convert


def test_slab_streaming_round_trip(tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("llm_convert.hf_to_native")
    slabs = []
    real = module._stream_in_slabs

    def counting(*args, **kwargs):
        used = real(*args, **kwargs)
        slabs.append(used)
        return used

    monkeypatch.setattr(module, "SLAB_BYTES", 4096)
    monkeypatch.setattr(module, "_stream_in_slabs", counting)
    monkeypatch.setattr(llm_core.streamed, "CHUNK_BYTES", 2048)
    hf_dir = tmp_path / "hf"
    build_hf_model("llama3", hf_dir)
    native = hf_to_native(hf_dir, tmp_path / "native")
    assert sum(slabs) >= 10  # embedding, head and every MLP / attention weight took the slab path
    ids = np.random.default_rng(0).integers(0, 256, (1, 12)).astype(np.int32)
    np.testing.assert_array_equal(
        np.asarray(llm_core.load(native)(ids)), np.asarray(load_hf(hf_dir)(ids))
    )
    back = native_to_hf(native, tmp_path / "back", max_shard_bytes=100_000)
    original, round_trip = {}, {}
    for f in hf_dir.glob("*.safetensors"):
        original.update(load_file(str(f)))
    for f in back.glob("*.safetensors"):
        round_trip.update(load_file(str(f)))
    assert len(list(back.glob("*.safetensors"))) > 2
    assert sorted(original) == sorted(round_trip)
    for name, value in original.items():
        np.testing.assert_array_equal(round_trip[name], value, err_msg=name)
