"""hf-to-native and native-to-hf stream: with slabs and chunks shrunk so every 2-D weight of a tiny
model goes through the slab paths (transposed Linear weights by columns, embeddings by rows), the
streamed checkpoint loads to the same logits and exports back (header-first safetensors, read here
by the safetensors library) to identical tensors in several shards."""

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
    real = module._slabs

    def counting(*args, **kwargs):
        ranges = real(*args, **kwargs)
        slabs.append(ranges is not None)
        return ranges

    export = importlib.import_module("llm_convert.native_to_hf")
    export_slabs = []
    real_export = export._slabs

    def counting_export(*args, **kwargs):
        for slab in real_export(*args, **kwargs):
            export_slabs.append(slab.shape)
            yield slab

    monkeypatch.setattr(module, "SLAB_BYTES", 4096)
    monkeypatch.setattr(module, "_slabs", counting)
    monkeypatch.setattr(export, "SLAB_BYTES", 4096)
    monkeypatch.setattr(export, "_slabs", counting_export)
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
    assert len(export_slabs) >= 20  # export too streamed its large 2-D weights slab by slab
    assert sorted(original) == sorted(round_trip)
    for name, value in original.items():
        np.testing.assert_array_equal(round_trip[name], value, err_msg=name)


def test_header_first_writer_matches_save_file_and_refuses_short_tensors(tmp_path):
    """Tensors written slab by slab read back exactly with the safetensors library (scalars,
    bf16, several slabs); a producer that falls short of its planned shape is an error naming it."""
    import ml_dtypes
    from safetensors import safe_open

    from llm_convert.errors import ConversionError
    from llm_convert.safetensors_stream import PlannedTensor, write_safetensors

    rng = np.random.default_rng(0)
    big = rng.standard_normal((10, 3)).astype(ml_dtypes.bfloat16)
    scalar = np.asarray(1.5, ml_dtypes.bfloat16)
    tensors = [
        PlannedTensor("a.weight", big.shape, big.dtype, lambda: iter([big[:4], big[4:9], big[9:]])),
        PlannedTensor("b.scale", (), scalar.dtype, lambda: iter([scalar])),
    ]
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        np.testing.assert_array_equal(f.get_tensor("a.weight"), big)
        np.testing.assert_array_equal(f.get_tensor("b.scale"), scalar)
    short = [PlannedTensor("a.weight", big.shape, big.dtype, lambda: iter([big[:4]]))]
    with pytest.raises(ConversionError, match=r"a\.weight"):
        write_safetensors(tmp_path / "y.safetensors", short, {"format": "pt"})

    def failing():  # the slab-making thread's error reaches the caller
        yield big[:4]
        raise OSError("disk read failed")

    with pytest.raises(OSError, match="disk read failed"):
        write_safetensors(
            tmp_path / "z.safetensors",
            [PlannedTensor("a.weight", big.shape, big.dtype, failing)],
            {"format": "pt"},
        )
    wrong = np.zeros((2, 4), big.dtype)  # a slab of the wrong width stops the maker thread
    endless = PlannedTensor("a.weight", big.shape, big.dtype, lambda: iter([wrong] * 1000))
    with pytest.raises(ConversionError, match="slab of shape"):
        write_safetensors(tmp_path / "w.safetensors", [endless], {"format": "pt"})
