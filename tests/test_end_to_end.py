"""Across packages: train -> export -> serve, and -> Hugging Face, where transformers agrees with us.

llm-train trains a tiny Llama for a few steps and exports its parameters; llm-serve decodes greedily
from the export; llm-convert writes it as a Hugging Face folder; transformers loads that folder and
gives the same logits and the same greedy continuation.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import llm_convert  # noqa: E402
from llm_core import load, load_config  # noqa: E402
from llm_serve import Engine, SamplingParams  # noqa: E402
from llm_train.export import export  # noqa: E402
from llm_train.trainer import train  # noqa: E402

TINY = [
    "num_layers=2",
    "emb_dim=64",
    "num_heads=4",
    "num_kv_heads=2",
    "head_dim=16",
    "mlp_dim=128",
    "vocab_size=256",
    "seq_len=32",
    "global_batch_size=4",
    "max_position_embeddings=128",
    "console_progress=false",
    "tensorboard=false",
    "steps=3",
    "learning_rate=1e-2",
    "kv_cache_max_length=64",
    "max_prefill_length=16",
    "max_decode_slots=2",
]
NEW_TOKENS = 8


def _greedy_ours(model, prompt, engine_params=None):
    engine, params = engine_params or Engine.from_model(model.cfg, model)
    state = engine.init_decode_state()
    prefix = engine.prefill(params, prompt, SamplingParams(temperature=0.0))
    state = engine.insert(prefix, state, 0)
    tokens = [int(prefix.first.tokens[0])]
    for _ in range(NEW_TOKENS - 1):
        state, out = engine.generate(params, state)
        tokens.append(int(out.tokens[0]))
    return tokens


def test_train_export_serve_and_convert_to_hf(tmp_path):
    cfg = load_config("pretrain.yml", [*TINY, f"base_output_dir={tmp_path}", "run_name=e2e"])
    result = train(cfg)
    assert result.last_step == 3 and all(np.isfinite(v) for v in result.losses.values())
    native = export(cfg, str(tmp_path / "export"))
    model = load(native)

    hf_dir = llm_convert.native_to_hf(native, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), attn_implementation="eager"
    ).eval()
    ids = np.random.default_rng(0).integers(0, 256, (2, 20)).astype(np.int32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), theirs, atol=1e-4)

    prompt = [5, 17, 42, 99, 3]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    assert _greedy_ours(model, prompt) == out[0, len(prompt) :].tolist()


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _hf_llama_with_chat_tokenizer(folder):
    """A tiny random Llama written by transformers, with a BPE tokenizer and a ChatML template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    corpus = folder / "corpus.txt"
    corpus.write_text("what is one plus two? three. what is two plus two? four. " * 30)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(
        [str(corpus)],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHATML})
    )
    return folder


def _sft_inputs(tmp_path):
    """(HF source folder, chat records file, TINY's architecture keys without the run lengths)."""
    import json

    src = _hf_llama_with_chat_tokenizer(tmp_path / "hf_src")
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for q, a in (("one plus two", "three"), ("two plus two", "four")) * 8:
            chat = [
                {"role": "user", "content": f"what is {q}?"},
                {"role": "assistant", "content": a},
            ]
            f.write(json.dumps({"messages": chat}) + "\n")
    arch = [o for o in TINY if not o.startswith(("vocab_size", "steps", "learning_rate"))]
    return src, data, arch


def test_init_from_hf_then_sft_then_export_back_to_hf(tmp_path):
    """init_from a Hugging Face folder -> SFT on chat records (the folder's chat template) ->
    export -> llm-convert to HF: transformers loads it and agrees with our logits; the run started
    from the HF weights (a few small steps stay close to them)."""
    src, data, arch = _sft_inputs(tmp_path)
    cfg = load_config(
        "sft.yml",
        [*arch, "vocab_size=320", "steps=3", "learning_rate=1e-4", "warmup_steps=0",
         f"init_from={src}", f"dataset_path={data}", f"tokenizer_path={src}",
         f"base_output_dir={tmp_path}", "run_name=sft", "compilation_cache_dir="],
    )  # fmt: skip
    result = train(cfg)
    assert result.last_step == 3
    native = export(cfg, str(tmp_path / "export"))
    model = load(native)
    hf_dir = llm_convert.native_to_hf(native, tmp_path / "hf_out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    before = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ids = np.random.default_rng(0).integers(0, 300, (2, 16)).astype(np.int32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
        original = before(torch.from_numpy(ids).long()).logits.numpy()
    ours = np.asarray(model(ids))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    moved = np.abs(ours - original).max()
    assert 0 < moved < 0.2 * np.abs(original).max(), moved  # trained, starting from the HF weights


def test_lora_sft_from_hf_exports_a_peft_adapter_for_the_hf_base(tmp_path):
    """init_from an HF folder with LoRA -> SFT -> `export_peft_adapter`: peft on the original HF
    model gives the logits of our merged export."""
    peft = pytest.importorskip("peft")
    from llm_train.export import export_peft_adapter

    src, data, arch = _sft_inputs(tmp_path)
    cfg = load_config(
        "sft.yml",
        [*arch, "vocab_size=320", "steps=3", "learning_rate=1e-2", "warmup_steps=0",
         "lora_rank=4", f"init_from={src}", f"dataset_path={data}", f"tokenizer_path={src}",
         f"base_output_dir={tmp_path}", "run_name=lora", "compilation_cache_dir="],
    )  # fmt: skip
    train(cfg)
    merged = load(export(cfg, str(tmp_path / "merged")))
    adapter = export_peft_adapter(cfg, str(tmp_path / "adapter"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = np.random.default_rng(0).integers(0, 300, (2, 16)).astype(np.int32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids).long()).logits.numpy()
        with model.disable_adapter():
            original = model(torch.from_numpy(ids).long()).logits.numpy()
    ours = np.asarray(merged(ids))
    assert np.abs(ours - original).max() > 1e-4  # the adapters were trained
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_weight_quantization_serves_like_the_float_model(tmp_path):
    """llm-convert quantize (int8, per-output-channel scales; int4, groups of 32) -> llm-serve: KL
    to the float model and greedy continuations (measured: int8 KL 7e-6, 16 of 16 prompts identical
    over 8 tokens; int4: KL 2.1e-3, 6 of 16, params/ 0.33x the float one)."""
    import os

    import jax
    from flax import nnx

    from llm_core import Int8Linear
    from llm_core.layers.quantize import Int4Linear

    cfg = load_config(
        "pretrain.yml",
        [*[o for o in TINY if not o.startswith("steps")], "steps=30",
         f"base_output_dir={tmp_path}", "run_name=q", "compilation_cache_dir="],
    )  # fmt: skip
    train(cfg)
    native = export(cfg, str(tmp_path / "export"))
    quantized = llm_convert.quantize_native(native, tmp_path / "int8")
    fp32, int8 = load(native), load(quantized)
    assert int8.cfg.weight_quantization == "int8"
    assert any(isinstance(n, Int8Linear) for _, n in nnx.iter_graph(int8))

    ids = np.random.default_rng(0).integers(0, 256, (4, 32)).astype(np.int32)
    lf = jax.nn.log_softmax(np.asarray(fp32(ids)))
    lq = jax.nn.log_softmax(np.asarray(int8(ids)))
    kl = float(np.mean(np.sum(np.exp(lf) * (lf - lq), -1)))
    assert kl < 1e-4, kl

    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, 6).tolist() for _ in range(16)]
    ef, eq = Engine.from_model(fp32.cfg, fp32), Engine.from_model(int8.cfg, int8)
    same = sum(_greedy_ours(fp32, p, ef) == _greedy_ours(int8, p, eq) for p in prompts)
    assert same >= 14, same

    def size(folder):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)

    assert size(quantized / "params") < 0.5 * size(native / "params")

    # int4, groups of 32 inputs
    q4 = llm_convert.quantize_native(native, tmp_path / "int4", mode="int4", group_size=32)
    int4 = load(q4)
    assert int4.cfg.weight_quantization == "int4"
    assert any(isinstance(n, Int4Linear) for _, n in nnx.iter_graph(int4))
    l4 = jax.nn.log_softmax(np.asarray(int4(ids)))
    kl4 = float(np.mean(np.sum(np.exp(lf) * (lf - l4), -1)))
    e4 = Engine.from_model(int4.cfg, int4)
    same4 = sum(_greedy_ours(fp32, p, ef) == _greedy_ours(int4, p, e4) for p in prompts)
    print(
        f"int8: KL {kl:.2e}, {same}/16 greedy equal; int4: KL {kl4:.2e}, {same4}/16 equal; "
        f"params/ bytes fp32 {size(native / 'params')}, int8 {size(quantized / 'params')}, "
        f"int4 {size(q4 / 'params')}"
    )
    assert kl4 < 1e-2, kl4  # measured 2.1e-3
    # a 30-step model's flat distributions make 8-token greedy runs fragile: measured 6 of 16
    assert same4 >= 3, same4
    assert size(q4 / "params") < size(quantized / "params")
    with pytest.raises(llm_convert.ConversionError, match="--group-size 48"):
        llm_convert.quantize_native(native, tmp_path / "bad", mode="int4", group_size=48)
    with pytest.raises(llm_convert.ConversionError, match="--mode 'int2' is not supported"):
        llm_convert.quantize_native(native, tmp_path / "int2", mode="int2")
