"""Supervised fine-tuning: loss masks from real chat templates, packing, learning, bad records."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from llm_core import ConfigError, build_model
from llm_train.data.pipeline import _finish, _pad_sft, sft_dataset
from llm_train.data.sft import RecordEncoder, load_chat_template
from llm_train.data.sources import DataError
from llm_train.data.tokenizer import Tokenizer
from llm_train.step import token_loss

pytestmark = pytest.mark.cpu

DATA = Path(__file__).parent / "data"
SPECIALS = [
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
]
# (template file, what closes an assistant turn in that template)
TEMPLATES = {
    "llama3": ("llama3_style.jinja", "<|eot_id|>"),
    "chatml": ("chatml_style.jinja", "<|im_end|>\n"),
}
CHAT = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green, mostly."},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with Llama-3 and ChatML special tokens, trained here."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tok")
    corpus = folder / "corpus.txt"
    corpus.write_text(
        " ".join(m["content"] for m in CHAT) * 20 + "\nsystem user assistant 0123456789 + = \n"
    )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(corpus)], trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _encoder(tokenizer_dir, template: str | None, **kw) -> RecordEncoder:
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer(HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json")), "<|endoftext|>")
    path = str(DATA / TEMPLATES[template][0]) if template else ""
    return RecordEncoder(tok, load_chat_template(path, str(tokenizer_dir)), **kw)


def _runs(tokens, mask) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens."""
    runs, cur = [], []
    for t, m in zip(tokens, mask, strict=True):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_chat_mask_is_exactly_the_assistant_turns(tokenizer_dir, template):
    enc = _encoder(tokenizer_dir, template)
    out = enc.encode({"messages": CHAT}, "test:1")
    decode = enc.tokenizer.tok.decode
    end = TEMPLATES[template][1]
    trained = [decode(run, skip_special_tokens=False) for run in _runs(out.tokens, out.mask)]
    assert trained == ["Blue." + end, "Green, mostly." + end]
    # every other token, rendered back, is the template's text around the assistant turns
    full = decode(out.tokens.tolist(), skip_special_tokens=False)
    assert full == enc.template.render(CHAT, add_generation_prompt=False)
    assert full.count("What colour is the sky?") == 1


def test_prompt_completion_trains_the_completion_and_eos(tokenizer_dir):
    enc = _encoder(tokenizer_dir, None)
    out = enc.encode({"prompt": "2 + 3 =", "completion": " 5"}, "test:1")
    (run,) = _runs(out.tokens, out.mask)
    assert enc.tokenizer.tok.decode(run, skip_special_tokens=False) == " 5<|endoftext|>"
    assert out.mask[0] == 0


def test_plain_text_records_train_every_token(tokenizer_dir):
    out = _encoder(tokenizer_dir, None).encode({"text": "Blue sky."}, "test:1")
    assert out.mask.all()


@pytest.mark.parametrize(
    ("record", "template", "match"),
    [
        ({"prompt": "x"}, None, r"f\.jsonl:3: record has no field 'completion'"),
        ({"prompt": "x", "completion": "  "}, None, r"f\.jsonl:3: 'completion' is empty"),
        ({"messages": CHAT}, None, r"f\.jsonl:3: chat record .* no chat template"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "chatml", r"messages\[0\]\.role="),
        ({"messages": CHAT[:2]}, "chatml", r"no assistant message"),
        ({"title": "x"}, None, r"f\.jsonl:3: record has none of 'messages'"),
    ],
)
def test_bad_records_name_file_and_line(tokenizer_dir, record, template, match):
    with pytest.raises(DataError, match=match):
        _encoder(tokenizer_dir, template).encode(record, "f.jsonl:3")


def test_skip_bad_records_counts_them(tokenizer_dir):
    enc = _encoder(tokenizer_dir, None, skip_bad_records=True)
    assert enc(("f.jsonl:1", {"prompt": "x"})) is None
    assert enc(("f.jsonl:2", {"prompt": "x", "completion": "y"})) is not None
    assert len(enc.skipped) == 1 and "f.jsonl:1" in enc.skipped[0]


def _examples(tokenizer_dir, n=6):
    enc = _encoder(tokenizer_dir, "chatml")
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        chat = [
            {"role": "user", "content": f"{a} + {b} ="},
            {"role": "assistant", "content": str(a + b)},
        ]
        out.append(enc.encode({"messages": chat}, f"ex:{i}"))
    return out


def test_packing_keeps_whole_examples_with_their_masks(tmp_path, tokenizer_dir):
    examples = _examples(tokenizer_dir)
    cfg = tiny_config(tmp_path, seq_len=63, global_batch_size=2, packing=True)
    batch = next(iter(sft_dataset(cfg, examples, seed=0, shuffle=False)))
    known = {tuple(e.tokens.tolist()): e.mask for e in examples}
    segments = 0
    for row in range(2):
        seg = batch["segment_ids"][row]
        for s in set(seg.tolist()) - {0}:
            idx = np.flatnonzero(seg == s)
            tokens = batch["inputs"][row][idx]
            weights = batch["weights"][row][idx]
            if idx[-1] == len(seg) - 1:  # the row's last example: its last token is a target only
                tokens = np.append(tokens, batch["targets"][row][idx[-1]])
                weights = np.append(weights, 0)
            mask = known[tuple(tokens.tolist())]  # a whole example, never split across rows
            # target i is token i + 1 of the same example; the example's last token has none
            np.testing.assert_array_equal(weights, np.append(mask[1:], 0))
            segments += 1
    assert segments >= 4


def test_packed_loss_equals_unpacked(tmp_path, tokenizer_dir):
    """One packed row of four examples gives the summed loss and token count of the four
    examples padded into rows of their own."""
    examples = _examples(tokenizer_dir, 4)
    cfg = tiny_config(tmp_path, seq_len=127, max_position_embeddings=128)
    n = cfg.seq_len + 1
    tokens = np.concatenate([e.tokens for e in examples])
    seg = np.concatenate([np.full(len(e.tokens), i + 1) for i, e in enumerate(examples)])
    mask = np.concatenate([e.mask for e in examples])
    assert len(tokens) <= n
    pad = n - len(tokens)
    packed = _finish(
        np.pad(tokens, (0, pad)).astype(np.int32),
        np.pad(seg, (0, pad)).astype(np.int32),
        np.pad(mask, (0, pad)).astype(np.int32),
    )
    rows = [_pad_sft(cfg)({"tokens": e.tokens, "mask": e.mask}) for e in examples]
    unpacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    model = build_model(cfg, rngs=nnx.Rngs(0))

    def loss(b):
        b = {k: jnp.asarray(v) for k, v in b.items()}
        logits, _, _ = model.forward(
            b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"]
        )
        nll, _, count = token_loss(logits, b["targets"], b["weights"])
        return float(nll), float(count)

    packed_batch = {k: v[None] for k, v in packed.items()}
    (nll_p, n_p), (nll_u, n_u) = loss(packed_batch), loss(unpacked)
    assert n_p == n_u == sum(float(e.mask[1:].sum()) for e in examples) > 0
    np.testing.assert_allclose(nll_p, nll_u, rtol=1e-5)


def _write_records(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(0, 10, 2))
            chat = [
                {"role": "user", "content": f"{a} + {b} ="},
                {"role": "assistant", "content": f"{a + b}"},
            ]
            f.write(json.dumps({"messages": chat}) + "\n")


def test_sft_run_raises_held_out_assistant_likelihood(tmp_path, tokenizer_dir):
    from llm_train.trainer import train

    data = tmp_path / "chat.jsonl"
    _write_records(data, 200, seed=1)
    cfg = tiny_config(
        tmp_path,
        dataset_kind="jsonl",
        dataset_format="sft",
        dataset_path=str(data),
        tokenizer_path=str(tokenizer_dir),
        chat_template=str(DATA / "chatml_style.jinja"),
        vocab_size=320,
        eval_fraction=0.1,
        eval_every=5,
        eval_batches=2,
        steps=60,
        seq_len=63,
        learning_rate=3e-3,
        warmup_steps=5,
    )
    result = train(cfg)
    first, last = result.eval_losses[5], result.eval_losses[60]  # assistant tokens only
    assert last < 0.6 * first, result.eval_losses


def test_sft_needs_a_record_source(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset_format=sft .* dataset_kind='synthetic'"):
        tiny_config(tmp_path, dataset_format="sft", dataset_kind="synthetic")


def test_templates_parse_as_transformers_parses_them(tmp_path, tokenizer_dir):
    """Loop controls (used by real templates) work; a template that does not parse names its file."""
    from llm_train.data.sft import load_chat_template

    good = tmp_path / "skip_system.jinja"
    good.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    out = load_chat_template(str(good), str(tokenizer_dir)).render(CHAT, False)
    assert "You answer in one word." not in out and "Green, mostly." in out
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(
        ConfigError, match=r"chat_template=.*bad\.jinja: the chat template does not parse"
    ):
        load_chat_template(str(bad), str(tokenizer_dir))


@pytest.mark.parametrize("kind", ["parquet", "hf"])
def test_records_from_parquet_and_hf_datasets(tmp_path, tokenizer_dir, kind):
    """The same chat record read from Parquet and from a saved HF dataset encodes identically to
    the JSONL one, and errors name the row."""
    from llm_train.data.sft import open_records

    records = [{"messages": CHAT}, {"prompt": "2 + 3 =", "completion": " 5"}]
    rows_in = [
        {"messages": CHAT, "prompt": None, "completion": None},
        {"messages": None, **records[1]},
    ]
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows_in), path)
    else:
        import datasets

        path = tmp_path / "ds"
        datasets.Dataset.from_list(rows_in).save_to_disk(str(path))
    rows = open_records(kind, str(path), "train")
    assert [w.rsplit(" ", 1)[-1] for w, _ in rows] == ["0", "1"]
    enc = _encoder(tokenizer_dir, "chatml")
    for (_, got), want in zip(rows, records, strict=True):  # null columns count as absent
        a, b = enc.encode(got, "x"), enc.encode(want, "y")
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.mask, b.mask)
