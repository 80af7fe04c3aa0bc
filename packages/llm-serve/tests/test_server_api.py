"""The server's OpenAI API surface beyond plain generation, in a real process driven by the
official `openai` client: echo with prompt log-probs, n choices, /tokenize and /detokenize,
logit_bias, best_of and several prompts per request."""

from __future__ import annotations

import pytest
from conftest import idle, post, tiny_model, tiny_tokenizer


def full_forward_logprobs(ids):
    """log p(ids[i] | ids[:i]) for i >= 1 and the log-softmax rows, from one full forward pass."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    _, model = tiny_model()
    lsm = np.asarray(jax.nn.log_softmax(model(jnp.asarray([ids]))[0].astype(jnp.float32), -1))
    return lsm[np.arange(len(ids) - 1), ids[1:]], lsm


ECHO_PROMPT = "the quick brown fox jumps over the lazy dog. a small model writes small words"


def test_echo_scores_the_prompt(client):
    tok = tiny_tokenizer()
    ids = tok.encode(ECHO_PROMPT)
    assert len(ids) > 1
    want, lsm = full_forward_logprobs(ids)
    got = client.completions.create(
        model="tiny", prompt=ECHO_PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = got.choices[0]
    assert choice.text == ECHO_PROMPT and choice.finish_reason == "length"
    assert got.usage.completion_tokens == 0 and got.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([i]) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want.tolist(), abs=1e-4)
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    best = [max(row) for row in lsm[: len(ids) - 1]]
    assert [next(iter(t.values())) for t in lp.top_logprobs[1:]] == pytest.approx(best, abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # token ids as the prompt: the same scores, the text decoded
    again = client.completions.create(
        model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0
    ).choices[0]
    assert again.text == tok.decode(ids)
    assert again.logprobs.token_logprobs[1:] == pytest.approx(want.tolist(), abs=1e-4)
    assert all(t == {} for t in again.logprobs.top_logprobs[1:])
    # echo without logprobs: the text only
    plain = client.completions.create(model="tiny", prompt=ECHO_PROMPT, max_tokens=0, echo=True)
    assert plain.choices[0].text == ECHO_PROMPT and plain.choices[0].logprobs is None


def test_echo_with_generation_and_streaming(client, server):
    tok = tiny_tokenizer()
    ids = tok.encode("Hello world")
    want, _ = full_forward_logprobs(ids)
    kw = dict(model="tiny", prompt="Hello world", max_tokens=5, temperature=0)
    plain = client.completions.create(logprobs=2, **kw).choices[0]
    echo = client.completions.create(echo=True, logprobs=2, **kw).choices[0]
    assert echo.text == "Hello world" + plain.text
    n = len(ids)
    assert echo.logprobs.tokens == [tok.decode([i]) for i in ids] + plain.logprobs.tokens
    assert echo.logprobs.token_logprobs[1:n] == pytest.approx(want.tolist(), abs=1e-4)
    assert echo.logprobs.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs)
    assert echo.logprobs.text_offset[n:] == [
        o + len("Hello world") for o in plain.logprobs.text_offset
    ]
    # (2 alternatives each; fewer keys where two byte tokens decode to the same text)
    assert all(1 <= len(t) <= 2 for t in echo.logprobs.top_logprobs[1:])
    chunks = list(client.completions.create(echo=True, logprobs=2, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == echo.text
    first = chunks[0].choices[0]
    assert first.text == "Hello world" and first.logprobs.tokens == echo.logprobs.tokens[:n]
    assert idle(server)["active_slots"] == 0


def test_n_choices_completions(client, server):
    kw = dict(model="tiny", prompt="the quick brown", max_tokens=8, n=2, seed=5, logprobs=0)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible
    assert all(c.finish_reason for c in a.choices)
    tokens = [len(c.logprobs.tokens) for c in a.choices]
    assert a.usage.completion_tokens == sum(tokens) and all(0 < t <= 8 for t in tokens)
    assert len(set(c.text for c in a.choices)) == 2  # sampled with seeds 5 and 6
    assert a.usage.prompt_tokens == len(tiny_tokenizer().encode("the quick brown"))
    greedy = client.completions.create(**{**kw, "temperature": 0, "echo": True})
    assert greedy.choices[0].text == greedy.choices[1].text
    assert greedy.choices[0].text.startswith("the quick brown")
    assert greedy.choices[1].logprobs.token_logprobs[0] is None
    chunks = list(client.completions.create(**kw, stream=True))
    texts, finishes = ["", ""], [None, None]
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
            finishes[c.index] = finishes[c.index] or c.finish_reason
    assert texts == [c.text for c in a.choices]
    assert all(finishes)
    health = idle(server)
    assert health["active_slots"] == 0 and health["free_pages"] == health["total_pages"]


def test_n_choices_chat(client, server):
    messages = [{"role": "user", "content": "Hello world!"}]
    kw = dict(model="tiny", messages=messages, max_tokens=6, n=2, seed=3)
    a = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert all(c.finish_reason and c.message.role == "assistant" for c in a.choices)
    texts, finishes = ["", ""], [None, None]
    for ch in client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    ):
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = finishes[c.index] or c.finish_reason
        if ch.usage is not None:
            assert ch.usage.completion_tokens == a.usage.completion_tokens
    assert texts == [c.message.content for c in a.choices]
    assert all(finishes)
    health = idle(server)
    assert health["active_slots"] == 0 and health["free_pages"] == health["total_pages"]


def test_tokenize_detokenize_round_trip(server):
    tok = tiny_tokenizer()
    r = post(server, "/tokenize", {"prompt": "Hello world! the lazy dog"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("Hello world! the lazy dog")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    back = post(server, "/detokenize", {"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "Hello world! the lazy dog"}
    messages = [{"role": "user", "content": "hi"}]
    chat = post(server, "/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(messages))


def test_logit_bias_bans_and_forces_tokens(client, server):
    """-100 on the greedy token moves greedy decoding off it; +100 on another token forces it."""
    tok = tiny_tokenizer()
    ids = tok.encode("the quick brown")
    kw = dict(model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=0)
    plain = client.completions.create(**kw).choices[0]
    first = tok.encode(plain.logprobs.tokens[0])[0]
    banned = client.completions.create(**kw, logit_bias={str(first): -100}).choices[0]
    assert tok.encode(banned.logprobs.tokens[0])[0] != first
    forced_id = next(i for i in range(10, tok.vocab_size) if i != first)
    forced = client.completions.create(**kw, logit_bias={str(forced_id): 100}).choices[0]
    assert forced.text == tok.decode([forced_id] * 3)
    assert idle(server)["active_slots"] == 0


def test_best_of_returns_the_most_likely_candidates(client):
    """best_of=4, n=2 returns the two of the n=4 candidates (same seeds) whose summed token
    log-probs are highest, most likely first; usage counts all four."""
    kw = dict(model="tiny", prompt="Hello world", max_tokens=6, seed=11, logprobs=0)
    every = client.completions.create(**kw, n=4)
    best = client.completions.create(**kw, n=2, best_of=4)
    scores = sorted(((sum(c.logprobs.token_logprobs), c.text) for c in every.choices), reverse=True)
    assert [c.text for c in best.choices] == [text for _, text in scores[:2]]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == every.usage.completion_tokens


def test_several_prompts_in_one_completion_request(client, server):
    """A list of prompts (text and token ids): prompt p's n choices have indices p*n.., each equal
    to the single-prompt answer; usage sums the prompts."""
    tok = tiny_tokenizer()
    kw = dict(model="tiny", max_tokens=5, temperature=0)
    one = client.completions.create(**kw, prompt="the quick").choices[0].text
    two = client.completions.create(**kw, prompt="Hello world").choices[0].text
    got = client.completions.create(**kw, prompt=["the quick", tok.encode("Hello world")], n=2)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [one, one, two, two]
    want = len(tok.encode("the quick")) + len(tok.encode("Hello world"))
    assert got.usage.prompt_tokens == want
    health = idle(server)
    assert health["active_slots"] == 0 and health["free_pages"] == health["total_pages"]
