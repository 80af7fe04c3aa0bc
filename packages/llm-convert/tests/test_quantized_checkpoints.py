"""MXFP4 (GPT-OSS) and FP8 block-scaled (DeepSeek-V3) checkpoints are dequantized on import: against
independent numpy references, transformers' own MXFP4 routine, and end to end (a GPT-OSS folder
whose experts are stored as MXFP4 converts to the model of the dequantized weights)."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_hf import build_hf_model, torch

from llm_convert import ConversionError, load_hf
from llm_convert.quantized import dequantize_fp8_blocks, dequantize_mxfp4

pytestmark = pytest.mark.convert


def _mxfp4_by_hand(blocks, scales):
    """Value by value: nibble -> sign, exponent, mantissa of e2m1, times 2^(scale - 127)."""
    out = np.zeros((*blocks.shape[:-1], 32), np.float64)
    for idx in np.ndindex(*blocks.shape[:-1]):
        for byte_i, byte in enumerate(blocks[idx]):
            for half, nib in enumerate((byte & 0xF, byte >> 4)):
                sign = -1.0 if nib & 0x8 else 1.0
                exp, man = (nib >> 1) & 0x3, nib & 0x1
                mag = man * 0.5 if exp == 0 else (1 + man * 0.5) * 2.0 ** (exp - 1)
                out[(*idx, 2 * byte_i + half)] = sign * mag * 2.0 ** (int(scales[idx]) - 127)
    return out.reshape(*blocks.shape[:-2], -1)


def test_mxfp4_matches_hand_decoding_and_transformers():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (2, 3, 2, 16), dtype=np.uint8)
    scales = rng.integers(120, 134, (2, 3, 2), dtype=np.uint8)
    ours = dequantize_mxfp4(blocks, scales, "x")
    np.testing.assert_array_equal(ours, _mxfp4_by_hand(blocks, scales).astype(np.float32))
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    theirs = convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
    ).numpy()
    np.testing.assert_array_equal(np.swapaxes(ours, -1, -2), theirs)


def test_fp8_block_dequantization_matches_a_loop():
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(200, 300)).astype(ml_dtypes.float8_e4m3fn)
    scale_inv = rng.uniform(0.5, 2.0, (2, 3)).astype(np.float32)
    want = np.zeros((200, 300), np.float32)
    for i in range(200):
        for j in range(300):
            want[i, j] = float(weight[i, j]) * scale_inv[i // 128, j // 128]
    np.testing.assert_array_equal(dequantize_fp8_blocks(weight, scale_inv, "w"), want)
    with pytest.raises(ConversionError, match="weight_scale_inv of shape"):
        dequantize_fp8_blocks(weight, scale_inv[:, :2], "w")


def _quantize_mxfp4(x: np.ndarray):
    """Exact MXFP4 encoding of values that are e2m1 numbers times a power of two per 32."""
    rows = x.reshape(-1, 32)
    scale = np.array([max(np.abs(r).max(), 1e-30) for r in rows])
    exponent = np.ceil(np.log2(scale / 6.0)).astype(np.int32)
    codes = np.zeros(rows.shape, np.uint8)
    for i, r in enumerate(rows):
        mags = np.abs(r) / 2.0 ** exponent[i]
        table = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
        code = np.abs(mags[:, None] - table[None]).argmin(1)
        codes[i] = code | np.where(r < 0, 8, 0)
    blocks = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return blocks.reshape(*x.shape[:-1], -1, 16), (exponent + 127).astype(np.uint8).reshape(
        *x.shape[:-1], -1
    )


def test_gpt_oss_folder_with_mxfp4_experts_converts(tmp_path, capsys):
    """Experts snapped to MXFP4-representable values, stored as _blocks/_scales: the converted
    model equals the one from the float folder."""
    hf_dir = tmp_path / "hf"
    build_hf_model("gpt_oss", hf_dir)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    quant = dict(tensors)
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            rows_last = np.swapaxes(tensors[name], -1, -2)  # Hub layout: [experts, out, in]
            blocks, scales = _quantize_mxfp4(rows_last)
            snapped = np.swapaxes(dequantize_mxfp4(blocks, scales, name), -1, -2)
            tensors[name] = np.ascontiguousarray(
                snapped, np.float32
            )  # save_file writes raw buffers
            del quant[name]
            quant[name + "_blocks"], quant[name + "_scales"] = blocks, scales
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    q_dir = tmp_path / "q"
    q_dir.mkdir()
    save_file(quant, str(q_dir / "model.safetensors"), metadata={"format": "pt"})
    (q_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    ids = np.random.default_rng(0).integers(0, 256, (1, 12)).astype(np.int32)
    np.testing.assert_allclose(
        np.asarray(load_hf(q_dir)(ids)), np.asarray(load_hf(hf_dir)(ids)), atol=1e-6, rtol=0
    )
    bad = dict(quant)
    key = next(n for n in bad if n.endswith("_scales"))
    bad[key] = bad[key][..., :-1, :]  # one row of scales short
    save_file(bad, str(q_dir / "model.safetensors"), metadata={"format": "pt"})
    from llm_convert.cli import main

    dst = tmp_path / "dst"
    assert main(["hf-to-native", str(q_dir), str(dst)]) == 2  # names the tensor, leaves no dst
    assert key.removesuffix("_scales") in capsys.readouterr().err
    assert not dst.exists() and not list(tmp_path.glob(".dst.tmp-*"))


def test_fp8_weights_in_a_folder_convert(tmp_path):
    """A Llama folder whose q_proj weights are float8 with block scales (DeepSeek-V3's format)
    converts to the dequantized model."""
    hf_dir = tmp_path / "hf"
    build_hf_model("llama3", hf_dir)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    fp8 = {}
    for name in [n for n in tensors if n.endswith("q_proj.weight")]:
        w = tensors[name]
        scale_inv = np.full(
            (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)), 0.01, np.float32
        )
        q = (w / 0.01).astype(ml_dtypes.float8_e4m3fn)
        tensors[name] = q.astype(np.float32) * 0.01  # the float folder holds the same values
        fp8[name], fp8[name + "_scale_inv"] = q, scale_inv
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    q_dir = tmp_path / "q"
    q_dir.mkdir()
    plain = {n: t for n, t in tensors.items() if n not in fp8}
    plain.update({n: t for n, t in fp8.items() if n.endswith("_scale_inv")})
    _write_with_fp8(
        q_dir / "model.safetensors", plain, {n: t for n, t in fp8.items() if not n.endswith("_inv")}
    )
    (q_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    ids = np.random.default_rng(0).integers(0, 256, (1, 12)).astype(np.int32)
    np.testing.assert_allclose(
        np.asarray(load_hf(q_dir)(ids)), np.asarray(load_hf(hf_dir)(ids)), atol=1e-6, rtol=0
    )


def _write_with_fp8(path, plain: dict, fp8: dict) -> None:
    """safetensors' numpy writer has no float8: write through torch."""
    from safetensors.torch import save_file as save_torch

    tensors = {n: torch.from_numpy(np.ascontiguousarray(t)) for n, t in plain.items()}
    for n, t in fp8.items():
        tensors[n] = torch.from_numpy(t.view(np.uint8)).view(torch.float8_e4m3fn)
    save_torch(tensors, str(path), metadata={"format": "pt"})


def test_truncated_fp8_file_names_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    _write_with_fp8(path, {}, {"w.weight": np.zeros((4, 4), ml_dtypes.float8_e4m3fn)})
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header["w.weight"]["dtype"] == "F8_E4M3"
    from llm_convert.quantized import read_fp8

    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises((ConversionError, ValueError)):
        read_fp8(path, "w.weight")
