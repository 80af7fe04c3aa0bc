import json

import numpy as np
import pytest
from conftest import tiny_config

from llm_core import ConfigError
from llm_train.data.pipeline import Data
from llm_train.data.sources import DataError, open_documents
from llm_train.step import BATCH_KEYS


def text_cfg(tmp_path, corpus, tokenizer_file, **kw):
    base = {
        "dataset_kind": "text",
        "dataset_path": str(corpus / "*.py"),
        "tokenizer_path": str(tokenizer_file),
        "vocab_size": 512,
        "global_batch_size": 4,
    }
    return tiny_config(tmp_path, **{**base, **kw})


def check_rows(b, cfg):
    assert set(b) == set(BATCH_KEYS)
    for v in b.values():
        assert v.shape == (cfg.global_batch_size, cfg.seq_len)
    seg, pos, w = b["segment_ids"], b["positions"], b["weights"]
    for r in range(seg.shape[0]):
        for i in range(1, seg.shape[1]):  # positions restart at every new segment
            assert pos[r, i] == (pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0)
        real_next = (seg[r, :-1] == seg[r, 1:]) & (seg[r, :-1] > 0)
        np.testing.assert_array_equal(w[r, :-1], real_next)  # the last target is the extra token
        assert w[r, -1] <= (seg[r, -1] > 0)
    assert (b["targets"][:, :-1] == b["inputs"][:, 1:])[w[:, :-1] > 0].all()


def test_packed_text_pipeline_and_exact_resume(tmp_path, corpus, tokenizer_file):
    cfg = text_cfg(tmp_path, corpus, tokenizer_file)
    data = Data(cfg)
    first = next(data.train_iter)
    check_rows(first, cfg)
    assert (first["segment_ids"] > 0).all()  # packed: no padding
    state = json.loads(json.dumps(data.get_state()))  # the state is JSON (saved in checkpoints)
    want = [next(data.train_iter) for _ in range(3)]
    again = Data(cfg)
    again.set_state(state)
    for w in want:
        got = next(again.train_iter)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(got[k], w[k])
    # the shuffle follows the seed
    other = next(Data(cfg.replace(seed=1)).train_iter)
    assert not np.array_equal(other["inputs"], first["inputs"])


def test_window_shuffle_permutes_packed_rows_and_resumes(tmp_path, corpus, tokenizer_file):
    """shuffle_window=8 (two batches of 4 rows): each window holds the rows the plain pipeline
    makes, in another order, and a state saved mid-window resumes exactly."""
    plain = text_cfg(tmp_path, corpus, tokenizer_file)
    mixed = plain.replace(shuffle_window=8)
    plain_it, mixed_it = Data(plain).train_iter, Data(mixed).train_iter
    for _ in range(2):  # two windows
        want = np.concatenate([next(plain_it)["inputs"] for _ in range(2)])
        got = np.concatenate([next(mixed_it)["inputs"] for _ in range(2)])
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
        assert not np.array_equal(got, want)
    data = Data(mixed)
    next(data.train_iter)  # halfway through the first window
    state = json.loads(json.dumps(data.get_state()))
    want = [next(data.train_iter)["inputs"] for _ in range(3)]
    again = Data(mixed)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again.train_iter)["inputs"], w)


def test_padded_pipeline_and_eval_split(tmp_path, corpus, tokenizer_file):
    cfg = text_cfg(tmp_path, corpus, tokenizer_file, packing=False, seq_len=64, eval_fraction=0.25)
    data = Data(cfg)
    b = next(data.train_iter)
    check_rows(b, cfg)
    assert set(np.unique(b["segment_ids"])) <= {0, 1}
    evals = list(data.eval_batches())
    assert len(evals) == cfg.eval_batches
    again = list(data.eval_batches())  # the same batches every time
    np.testing.assert_array_equal(evals[0]["inputs"], again[0]["inputs"])


def test_synthetic_is_deterministic(tmp_path):
    cfg = tiny_config(tmp_path)
    a, b = Data(cfg), Data(cfg)
    check_rows(next(a.train_iter), cfg)
    next(b.train_iter)
    np.testing.assert_array_equal(next(a.train_iter)["inputs"], next(b.train_iter)["inputs"])


def test_jsonl_parquet_hf_arrayrecord_sources(tmp_path):
    texts = [f"document {i} " * (i + 1) for i in range(5)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert list(open_documents("jsonl", str(jl), "body")) == texts
    with pytest.raises(DataError, match="dataset_field"):
        open_documents("jsonl", str(jl), "text")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
    assert list(open_documents("parquet", str(tmp_path / "*.parquet"), "body")) == texts

    import datasets

    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "hf"))
    hf = open_documents("hf", str(tmp_path / "hf"), "body")
    assert [hf[i] for i in range(len(hf))] == texts
    hf_files = open_documents("hf", str(jl), "body")
    assert [hf_files[i] for i in range(len(hf_files))] == texts

    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for t in texts:
        w.write(json.dumps({"body": t}).encode())
    w.close()
    ar = open_documents("arrayrecord", str(tmp_path / "d.array_record"), "body")
    assert [ar[i] for i in range(len(ar))] == texts


def test_bad_inputs(tmp_path, corpus, tokenizer_file):
    with pytest.raises(DataError, match="dataset_path"):
        Data(text_cfg(tmp_path, corpus, tokenizer_file, dataset_path=str(tmp_path / "nope/*.txt")))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no documents"):
        Data(
            text_cfg(
                tmp_path,
                corpus,
                tokenizer_file,
                dataset_kind="jsonl",
                dataset_path=str(tmp_path / "empty.jsonl"),
            )
        )
    with pytest.raises(ConfigError, match="vocab_size"):
        Data(text_cfg(tmp_path, corpus, tokenizer_file, vocab_size=256))
    with pytest.raises(ConfigError, match="tokenizer_path"):
        Data(text_cfg(tmp_path, corpus, tokenizer_file, tokenizer_path=str(tmp_path / "x.json")))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        tiny_config(tmp_path, seq_len=128)
    with pytest.raises(ConfigError, match="shuffle_window"):
        tiny_config(tmp_path, shuffle_window=-1)


def test_worker_processes_resume_exactly(tmp_path, corpus, tokenizer_file):
    """With data_workers the order is fixed by the worker count, and the state still resumes."""
    cfg = text_cfg(tmp_path, corpus, tokenizer_file, data_workers=1)
    data = Data(cfg)
    check_rows(next(data.train_iter), cfg)
    state = json.loads(json.dumps(data.get_state()))
    want = next(data.train_iter)
    again = Data(cfg)
    again.set_state(state)
    np.testing.assert_array_equal(next(again.train_iter)["inputs"], want["inputs"])
