"""The OpenAI-compatible server in a real process on 127.0.0.1, driven by the official `openai`
client (and httpx for malformed requests): completions, chat, streaming, stop, seeds, logprobs,
errors naming the field, 429 on a full queue, disconnects freeing slots and pages, metrics."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from conftest import idle, post, tiny_model, tiny_tokenizer

from llm_serve.engine import Engine
from llm_serve.sampling import SamplingParams
from llm_serve.scheduler import Scheduler, generate_text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["total_slots"] == 4


def test_completion_equals_in_process_greedy(client):
    cfg, model = tiny_model()
    engine, params = Engine.from_model(cfg, model)
    tok = tiny_tokenizer()
    want = generate_text(
        Scheduler(engine, params, tok),
        tok.encode("the quick"),
        SamplingParams(temperature=0, max_tokens=10),
    )
    got = client.completions.create(model="tiny", prompt="the quick", max_tokens=10, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(
        tok.encode("the quick")
    ) and got.usage.completion_tokens == len(want.generated)


def test_streaming_equals_non_streaming(client):
    kw = dict(model="tiny", prompt="Hello world", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert len(chunks) > 3  # it streamed


def test_chat_plain_and_streaming(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello!"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    text = whole.choices[0].message.content
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason is not None


def test_stop_strings(client):
    kw = dict(
        model="tiny",
        prompt="numbers:",
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2 :][:2]
    assert stop.strip()
    got = client.completions.create(stop=[stop, "never-there"], **kw).choices[0]
    assert got.finish_reason == "stop"
    assert got.text == full[: full.index(stop)]
    streamed = client.completions.create(stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed) == got.text


def test_seed_reproducibility_and_logprobs(client):
    def run(seed):
        return client.completions.create(
            model="tiny", prompt="a small", max_tokens=12, temperature=1.0, seed=seed, logprobs=2
        ).choices[0]

    a, b, c = run(42), run(42), run(43)
    assert a.text == b.text and a.logprobs.token_logprobs == b.logprobs.token_logprobs
    assert a.logprobs.tokens != c.logprobs.tokens
    assert len(a.logprobs.top_logprobs[0]) == 2
    assert all(lp <= 0 for lp in a.logprobs.token_logprobs)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi"}, 400, "model"),
        ("/v1/completions", {"model": "tiny", "prompt": 5}, 400, "prompt"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "max_tokens": "10"},
            400,
            "max_tokens",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "max_tokens": 0, "echo": False},
            400,
            "max_tokens",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "echo": "yes"}, 400, "echo"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "echo": True, "max_tokens": -1},
            400,
            "max_tokens",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "temperature": "hot"},
            400,
            "temperature",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 0}, 400, "n"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 9}, 400, "n"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 5}, 400, "n"),  # > 4 slots
        ("/v1/chat/completions", {"model": "tiny", "messages": [], "n": 2}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 5},
            400,
            "n",
        ),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"messages": "hi"}, 400, "messages"),
        ("/tokenize", b"[1]", 400, None),
        ("/detokenize", {}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        ("/detokenize", {"tokens": [1, "a"]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1, 99999]}, 400, "tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi " * 1100}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
        ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
        ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"content": "x"}]},
            400,
            "messages[0]",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "max_completion_tokens": 0,
            },
            400,
            "max_completion_tokens",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "max_tokens": 5000},
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "max_completion_tokens": 5000,
            },
            400,
            "max_completion_tokens",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "echo": True},
            400,
            "echo",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "logit_bias": {"99999": 1}},
            400,
            "logit_bias",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "logit_bias": {"a": 1}},
            400,
            "logit_bias",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "logit_bias": {"5": 101}},
            400,
            "logit_bias",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "logit_bias": [5]},
            400,
            "logit_bias",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "n": 2, "best_of": 1},
            400,
            "best_of",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "best_of": 5}, 400, "best_of"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "best_of": 2, "stream": True},
            400,
            "best_of",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", "b", "c", "d", "e"]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [[]]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", [1, 99999]]}, 400, "prompt[1]"),
        ("/v1/nowhere", {}, 404, None),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    r = post(server, path, body, raw=isinstance(body, bytes))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_server_keeps_serving_after_bad_input(client, server):
    post(server, "/v1/completions", b"\xff\xfe garbage", raw=True)
    got = client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0)
    assert got.choices[0].text is not None
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_disconnect_mid_stream_frees_slot_and_pages(server):
    body = {
        "model": "tiny",
        "prompt": "hello",
        "max_tokens": 100,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", server.url + "/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        busy = httpx.get(server.url + "/health").json()
        assert busy["active_slots"] == 1 and busy["free_pages"] < busy["total_pages"]
    t0 = time.time()
    health = idle(server, timeout=5)
    assert health["active_slots"] == 0, health
    assert health["free_pages"] == health["total_pages"]
    assert time.time() - t0 < 2
    # it was cancelled, not finished: 1000 tokens take longer than that
    metrics = httpx.get(server.url + "/metrics").text
    aborted = [
        m for m in metrics.splitlines() if m.startswith('llm_requests_total{finish_reason="abort"}')
    ]
    assert aborted and float(aborted[0].split()[-1]) >= 1


def test_full_queue_answers_429_then_recovers(server):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 300, "ignore_eos": True}

    def one(_):
        return httpx.post(server.url + "/v1/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = [r.status_code for r in pool.map(one, range(16))]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    health = idle(server)
    assert health["free_pages"] == health["total_pages"]
    r = one(0)
    assert r.status_code == 200


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "llm_requests_total",
        "llm_prompt_tokens_total",
        "llm_generation_tokens_total",
        "llm_queue_depth",
        "llm_time_to_first_token_seconds_bucket",
        "llm_inter_token_latency_seconds_bucket",
        "llm_free_kv_pages",
        "llm_rejected_requests_total",
    ):
        assert name in text, name
    ttft = [
        line
        for line in text.splitlines()
        if line.startswith("llm_time_to_first_token_seconds_count")
    ]
    assert float(ttft[0].split()[-1]) >= 1


def test_a_repeated_prompt_prefix_is_served_from_the_prefix_cache(server, client):
    def hits() -> float:
        text = httpx.get(server.url + "/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("llm_prefix_cache_hits_total"))
        return float(line.split()[-1])

    system = "You are a helpful assistant who answers in one word. " * 3
    before = hits()
    answers = [
        client.completions.create(model="tiny", prompt=system + q, max_tokens=4, temperature=0)
        for q in ("Sky?", "Grass?")
    ]
    assert hits() - before >= 16  # the second prompt reused at least one page of the first
    assert all(a.choices[0].text is not None for a in answers)
