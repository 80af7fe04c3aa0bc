"""The one end-of-sequence policy (llm-train appends it, llm-serve stops on it)."""

import json

from llm_core.tokens import configured_eos, find_eos

VOCAB = {"<|endoftext|>": 5, "</s>": 2, "<|im_end|>": 9}


def test_configured_eos_wins_when_the_vocabulary_has_it(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|im_end|>"}})
    )
    assert configured_eos(tmp_path) == "<|im_end|>"
    assert find_eos(VOCAB.get, configured_eos(tmp_path)) == ("<|im_end|>", 9)


def test_candidates_in_order_then_none(tmp_path):
    assert configured_eos(tmp_path) is None
    assert find_eos(VOCAB.get) == ("</s>", 2)
    assert find_eos(VOCAB.get, "<missing>") == ("</s>", 2)
    assert find_eos({"a": 1}.get) == (None, None)
