"""Tokenizer wrapper: chat templates (the tokenizer's own and the default) and the streaming
detokenizer (multi-byte characters, stop strings split over tokens)."""

from __future__ import annotations

import json

from conftest import hf_tokenizer, tiny_tokenizer

from llm_serve.tokenizer import TextStream, Tokenizer, default_chat_template

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_default_chat_template():
    assert default_chat_template(MESSAGES) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert tiny_tokenizer().apply_chat_template(MESSAGES) == default_chat_template(MESSAGES)


def test_tokenizer_config_chat_template_and_eos(tmp_path):
    hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    config = {"chat_template": template, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_file(tmp_path)
    assert tok.eos_token_id == hf_tokenizer().token_to_id("</s>")
    assert tok.apply_chat_template(MESSAGES) == "[system] Be brief.</s>[user] Hi</s>[assistant] "


def stream_all(tok, text, stop):
    s = TextStream(tok, stop)
    out = []
    for i in tok.encode(text):
        out.append(s.push(i))
        if s.stopped:
            break
    if not s.stopped:
        out.append(s.flush())
    return out, s.stopped


def test_stream_reassembles_text_with_multibyte_characters():
    tok = tiny_tokenizer()
    text = "héllo wörld — ünïcode ✓ the quick brown fox"
    pieces, stopped = stream_all(tok, text, [])
    assert "".join(pieces) == text and not stopped
    assert all("\ufffd" not in p for p in pieces)


def test_stream_stops_before_a_stop_string_split_over_tokens():
    tok = tiny_tokenizer()
    text = "the quick brown fox jumps over the lazy dog"
    pieces, stopped = stream_all(tok, text, ["fox jumps", "zzz"])
    assert stopped and "".join(pieces) == "the quick brown "
    # no piece ever showed text that the stop string later took back
    assert "fox" not in "".join(pieces)


def test_stream_releases_a_held_back_prefix_that_was_no_stop():
    tok = tiny_tokenizer()
    pieces, stopped = stream_all(tok, "the lazy dog", ["the lazy cat"])
    assert not stopped and "".join(pieces) == "the lazy dog"
