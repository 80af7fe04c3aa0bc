"""grain pipelines: documents -> shuffle -> tokenize -> pack (or pad) -> global batch -> rows.

Every pipeline yields this process's rows of the global batch as numpy arrays (see step.BATCH_KEYS)
and is a grain DatasetIterator, so `get_state()` / `set_state()` make resume exact. The order of
the global batches does not depend on the number of processes: a checkpoint resumes on any.
"""

from __future__ import annotations

import jax
import numpy as np

from llm_core import Config
from llm_train.quiet_imports import without

# grain registers orbax handlers for its iterators when orbax is installed; llm-train saves the
# iterator state as JSON itself (checkpoint.py), so orbax loads later, when a checkpoint is written
# or read, rather than before the first step (0.12 s of a cold start).
with without("orbax.checkpoint"):
    import grain
    import grain.experimental as gx
from llm_train.data.sft import RecordEncoder, encode_all, load_chat_template, open_records
from llm_train.data.sources import open_documents
from llm_train.data.tokenizer import Tokenizer, check_vocab, load_tokenizer

EVAL_SEED_OFFSET = 7919


def _finish(
    tokens: np.ndarray, seg: np.ndarray, loss_mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """A row of seq_len + 1 tokens -> next-token inputs / targets with restarted positions.
    `loss_mask` (SFT) marks the tokens that are training targets; others get weight 0."""
    inputs, targets = tokens[:-1], tokens[1:]
    seg_in, seg_next = seg[:-1], seg[1:]
    starts = np.concatenate([[True], seg_in[1:] != seg_in[:-1]])
    idx = np.arange(len(seg_in))
    positions = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    weights = (seg_in == seg_next) & (seg_in > 0)
    if loss_mask is not None:
        weights &= loss_mask[1:] > 0
    weights = weights.astype(np.float32)
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "positions": positions.astype(np.int32),
        "segment_ids": seg_in.astype(np.int32),
        "weights": weights,
    }


def _synthetic_row(cfg: Config, index: int, seed: int) -> dict[str, np.ndarray]:
    """A learnable row: runs of an arithmetic progression (mod vocab) with random start/stride."""
    rng = np.random.default_rng([seed, index])
    n = cfg.seq_len + 1
    start, stride = rng.integers(0, cfg.vocab_size), rng.integers(1, 8)
    tokens = (start + stride * np.arange(n)) % cfg.vocab_size
    return _finish(tokens, np.ones(n, np.int32))


def _local_rows(cfg: Config) -> tuple[int, int]:
    per_process = cfg.global_batch_size // jax.process_count()
    return per_process, jax.process_index() * per_process


def _this_process(it, cfg: Config, rows_per_item: int = 1):
    """Whole global batches, then this process's rows of each. The data order is a function of the
    global batch alone, so every process's iterator is in the same state and a checkpoint resumes
    on any number of processes. The price: every process reads and tokenizes every document."""
    local, offset = _local_rows(cfg)
    it = it.batch(cfg.global_batch_size // rows_per_item, drop_remainder=True)
    if local == cfg.global_batch_size:
        return it
    lo, hi = offset // rows_per_item, (offset + local) // rows_per_item
    return it.map(lambda b: {k: v[lo:hi] for k, v in b.items()})


def synthetic_dataset(cfg: Config, seed: int) -> grain.IterDataset:
    """Row j of global batch b is record b * global_batch_size + j, whatever the process count."""
    local, offset = _local_rows(cfg)
    g = cfg.global_batch_size

    def row(i: int, _):
        b, j = divmod(i, local)
        return _synthetic_row(cfg, b * g + offset + j, seed)

    ds = grain.MapDataset.range(1 << 40).map_with_index(row)
    return ds.batch(local, drop_remainder=True).to_iter_dataset()


def _tokenize_fn(tokenizer: Tokenizer, add_eos: bool):
    def fn(text: str) -> dict[str, np.ndarray]:
        ids = tokenizer.encode(text)
        if add_eos and tokenizer.eos_id is not None:
            ids = [*ids, tokenizer.eos_id]
        return {"tokens": np.asarray(ids, np.int32)}

    return fn


def _pad_sft(cfg: Config):
    def fn(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = cfg.seq_len + 1
        t, m = x["tokens"][:n], x["mask"][:n]
        tokens, seg, mask = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        tokens[: len(t)], seg[: len(t)], mask[: len(t)] = t, 1, m
        return _finish(tokens, seg, mask)

    return fn


def _pad(cfg: Config):
    """A document -> one row cut / padded to seq_len + 1, every token trained."""
    pad = _pad_sft(cfg)
    return lambda x: pad({"tokens": x["tokens"], "mask": np.ones_like(x["tokens"])})


def text_dataset(cfg: Config, docs, tokenizer: Tokenizer, seed: int, shuffle: bool):
    ds = grain.MapDataset.source(docs)
    if len(ds) == 0:
        raise ValueError("No documents to train on: add data.")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat().map(_tokenize_fn(tokenizer, cfg.tokenizer_add_eos))
    ds = ds.filter(lambda x: len(x["tokens"]) > 1)
    it = ds.to_iter_dataset()
    if cfg.packing:
        it = gx.ConcatThenSplitIterDataset(it, length_struct={"tokens": cfg.seq_len + 1})
        it = it.map(lambda x: _finish(x["tokens"], x["tokens_segment_ids"]))
    else:
        it = it.map(_pad(cfg))
    if shuffle and cfg.shuffle_window > 1:
        # a long document fills consecutive rows: without this a batch holds a few documents only
        it = gx.WindowShuffleIterDataset(it, window_size=cfg.shuffle_window, seed=seed)
    it = _this_process(it, cfg)
    if cfg.data_workers > 0:
        from absl import flags  # grain's worker processes read absl flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data_workers))
    return it


def sft_dataset(cfg: Config, examples: list, seed: int, shuffle: bool):
    """Encoded SFT examples -> rows. Packing places whole examples into rows (first fit; an
    example longer than a row is truncated), never splitting one across rows, and keeps them
    apart with segment ids; the loss mask travels with the tokens."""
    ds = grain.MapDataset.source(examples)
    if len(ds) == 0:
        raise ValueError("No SFT examples to train on: add data.")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat().map(lambda e: {"tokens": e.tokens, "mask": e.mask})
    it = ds.to_iter_dataset()
    n = cfg.seq_len + 1
    if cfg.packing:
        it = gx.FirstFitPackIterDataset(
            it,
            length_struct={"tokens": n, "mask": n},
            num_packing_bins=max(cfg.global_batch_size, 2),
            seed=seed,
        )
        it = it.map(lambda x: _finish(x["tokens"], x["tokens_segment_ids"], x["mask"]))
    else:
        it = it.map(_pad_sft(cfg))
    return _this_process(it, cfg)


def preference_dataset(cfg: Config, pairs: list, seed: int, shuffle: bool):
    """(chosen, rejected) encoded pairs -> rows 2i (chosen) and 2i + 1 (rejected), each padded to
    seq_len + 1 (no packing: DPO scores whole responses)."""
    local, _ = _local_rows(cfg)
    if local % 2:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} gives {local} rows per process "
            f"({jax.process_count()} processes); DPO needs an even number (chosen + rejected)."
        )
    ds = grain.MapDataset.source(pairs)
    if len(ds) == 0:
        raise ValueError("No preference pairs to train on: add data.")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    pad = _pad_sft(cfg)

    def rows(pair):
        a, b = (pad({"tokens": e.tokens, "mask": e.mask}) for e in pair)
        return {k: np.stack([a[k], b[k]]) for k in a}

    it = _this_process(ds.repeat().map(rows).to_iter_dataset(), cfg, rows_per_item=2)
    return it.map(lambda b: {k: v.reshape(-1, *v.shape[2:]) for k, v in b.items()})


def _split_docs(docs, eval_fraction: float, seed: int):
    """Deterministic document split: (train indices view, eval indices view)."""
    if eval_fraction <= 0:
        return docs, None
    order = np.random.default_rng(seed + EVAL_SEED_OFFSET).permutation(len(docs))
    n_eval = max(1, round(len(docs) * eval_fraction))
    if n_eval >= len(docs):
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training documents.")
    return _Subset(docs, order[n_eval:]), _Subset(docs, order[:n_eval])


class _Subset:
    def __init__(self, docs, indices):
        self.docs, self.indices = docs, np.sort(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.docs[int(self.indices[i])]


def _tuples_for_packer(state):
    """A JSON round trip turns the packer's `remainder_slices` tuples into lists, and grain's
    ConcatThenSplit compares them with its (-1, -1) "no remainder" tuple: a list reads as a
    remainder and the resumed rows shift. Put the tuples back."""
    if not isinstance(state, dict):
        return state
    return {
        k: {f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _tuples_for_packer(v)
        for k, v in state.items()
    }


class Data:
    """The training iterator (checkpointable) and a factory for fresh eval iterators."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tokenizer: Tokenizer | None = None
        self.skipped_records: list[str] = []
        if cfg.dataset_kind == "synthetic":
            self._train = synthetic_dataset(cfg, cfg.seed)
            self._eval_docs = cfg.eval_fraction > 0 or cfg.eval_every > 0
        elif cfg.dataset_format in ("sft", "preference"):
            self._train = self._open_sft(cfg)
        else:
            docs = open_documents(
                cfg.dataset_kind, cfg.dataset_path, cfg.dataset_field, cfg.dataset_split
            )
            self.tokenizer = load_tokenizer(cfg.tokenizer_path)
            check_vocab(self.tokenizer, cfg)
            train_docs, self._eval_docs = _split_docs(docs, cfg.eval_fraction, cfg.seed)
            self._train = text_dataset(cfg, train_docs, self.tokenizer, cfg.seed, cfg.shuffle_data)
        self.train_iter = iter(self._train)

    def _open_sft(self, cfg: Config):
        records = open_records(cfg.dataset_kind, cfg.dataset_path, cfg.dataset_split)
        self.tokenizer = load_tokenizer(cfg.tokenizer_path)
        check_vocab(self.tokenizer, cfg)
        encoder = RecordEncoder(
            self.tokenizer,
            load_chat_template(cfg.chat_template, cfg.tokenizer_path),
            text_field=cfg.dataset_field,
            skip_bad_records=cfg.skip_bad_records,
            max_pair_tokens=cfg.seq_len + 1,
        )
        train_records, eval_records = _split_docs(records, cfg.eval_fraction, cfg.seed)
        if cfg.dataset_format == "preference":
            encode = encoder.pairs
            make = preference_dataset
        else:
            encode, make = encoder, sft_dataset
        train = encode_all(train_records, encode)
        self._eval_docs = encode_all(eval_records, encode) if eval_records else None
        self.skipped_records = encoder.skipped
        return make(cfg, train, cfg.seed, cfg.shuffle_data)

    def has_eval(self) -> bool:
        return bool(self._eval_docs)

    def eval_batches(self):
        """The first `eval_batches` batches of the eval split (the same ones every time)."""
        cfg = self.cfg
        if cfg.dataset_kind == "synthetic":
            it = iter(synthetic_dataset(cfg, cfg.seed + EVAL_SEED_OFFSET))
        elif cfg.dataset_format in ("sft", "preference"):
            make = preference_dataset if cfg.dataset_format == "preference" else sft_dataset
            it = iter(make(cfg, self._eval_docs, cfg.seed, False))
        else:
            it = iter(
                text_dataset(
                    cfg.replace(data_workers=0), self._eval_docs, self.tokenizer, cfg.seed, False
                )
            )
        for _ in range(cfg.eval_batches):
            yield next(it)

    def get_state(self) -> dict:
        return self.train_iter.get_state()

    def set_state(self, state: dict) -> None:
        self.train_iter.set_state(_tuples_for_packer(state))
