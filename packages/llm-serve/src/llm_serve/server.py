"""OpenAI-compatible HTTP server (FastAPI): completions, chat completions (n choices), models, health,
metrics, and vLLM's /tokenize and /detokenize.

    app = create_app(scheduler, tokenizer, model_name="tiny")   # the scheduler thread starts with it
    uvicorn.run(app, host="127.0.0.1", port=8000)

`GET /health` answers 503 `{"status": "loading"}` until the scheduler has warmed up (compiled the
model), then 200 `{"status": "ok", ...}`; 503 with an error if the engine has failed.

Errors are OpenAI error objects `{"error": {"message", "type", "param", "code"}}`: 400 for a bad body
(the `param` names the field), 404 for an unknown model or route, 429 when the waiting queue is full,
503 when the engine has failed. A streaming client that disconnects is cancelled at once: its slot and
KV pages are free after the current step.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_serve import protocol as P
from llm_serve.metrics import CONTENT_TYPE, ServeMetrics
from llm_serve.scheduler import QueueFull
from llm_serve.scheduler import Request as EngineRequest


def create_app(
    scheduler, tokenizer, model_name: str, metrics: ServeMetrics | None = None, warmup_ids=None
):
    """`warmup_ids`: a prompt the scheduler generates from first (compiling the model) while
    /health answers 503 "loading"."""
    metrics = metrics or scheduler.metrics or ServeMetrics()
    scheduler.metrics = metrics
    max_len = scheduler.engine.max_len

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start(warmup_ids)
        yield
        scheduler.stop()

    app = FastAPI(title="llm-serve", lifespan=lifespan)

    @app.exception_handler(P.APIError)
    async def api_error(request, err: P.APIError):
        metrics.rejected.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        status = err.status_code
        return JSONResponse(P.APIError(status, str(err.detail)).body(), status_code=status)

    @app.get("/health")
    async def health():
        if scheduler.error is not None:
            raise P.APIError(503, f"engine failed: {scheduler.error!r}; restart the server.")
        if not scheduler.ready.is_set():
            return JSONResponse({"status": "loading", **scheduler.stats()}, status_code=503)
        return {"status": "ok", **scheduler.stats()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "llm-serve"}
        return {"object": "list", "data": [card]}

    async def read_json(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise P.APIError(
                400, f"The body is not valid JSON: {err}.", None, "invalid_json"
            ) from None

    def check_model(parsed: P.ParsedRequest) -> None:
        if parsed.model != model_name:
            raise P.APIError(
                404,
                f"The model '{parsed.model}' does not exist; this server serves '{model_name}'.",
                "model",
                "model_not_found",
            )

    def prompt_ids(ids: list[int], param: str, parsed: P.ParsedRequest) -> list[int]:
        if not ids:
            raise P.APIError(400, f"'{param}' encodes to no tokens; send some text.", param)
        if len(ids) >= max_len:
            raise P.APIError(
                400,
                f"'{param}' has {len(ids)} tokens; this server's context holds {max_len} tokens "
                "(prompt plus at least one generated token). Shorten it.",
                param,
                "context_length_exceeded",
            )
        if any(not 0 <= i < tokenizer.vocab_size for i in ids):
            raise P.APIError(400, f"'{param}' holds token ids outside the vocabulary.", param)
        field = parsed.max_tokens_field
        if field and len(ids) + parsed.sampling.max_tokens > max_len:
            raise P.APIError(
                400,
                f"'{field}' is {parsed.sampling.max_tokens}, but '{param}' has {len(ids)} tokens "
                f"and this server's context holds {max_len}: at most {max_len - len(ids)} can be "
                "generated. Lower it.",
                field,
                "context_length_exceeded",
            )
        return ids

    def check_logit_bias(parsed: P.ParsedRequest) -> None:
        outside = [t for t in parsed.sampling.logit_bias if t >= tokenizer.vocab_size]
        if outside:
            raise P.APIError(
                400,
                f"'logit_bias' names token id(s) {outside[:5]} outside the vocabulary "
                f"[0, {tokenizer.vocab_size}).",
                "logit_bias",
            )

    def submit(prompts: list[list[int]], parsed: P.ParsedRequest):
        """Every prompt's candidates (best_of, or n) as one scheduler group each; events arrive as
        (global candidate index, Event), candidate j of prompt p at p * per_prompt + j."""
        per_prompt = parsed.best_of
        if per_prompt > len(scheduler.slots):
            param = "best_of" if parsed.best_of > parsed.n else "n"
            raise P.APIError(
                400,
                f"'{param}' is {per_prompt}; this server decodes at most {len(scheduler.slots)} "
                "sequences at once (max_decode_slots).",
                param,
            )
        if len(prompts) > scheduler.max_queue:
            raise P.APIError(
                400,
                f"'prompt' holds {len(prompts)} prompts; this server queues at most "
                f"{scheduler.max_queue} (max_queue_size). Send fewer per request.",
                "prompt",
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(i):
            return lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

        reqs: list = []
        try:
            for ids in prompts:
                group = [
                    EngineRequest(list(ids), parsed.sampling.for_choice(j), sink(len(reqs) + j))
                    for j in range(per_prompt)
                ]
                scheduler.submit_group(group)
                reqs.extend(group)
        except QueueFull as err:
            cancel_unfinished(reqs)
            raise P.APIError(
                429, f"Server busy: {err}. Retry shortly.", None, "queue_full"
            ) from None
        except ValueError as err:
            cancel_unfinished(reqs)
            raise P.APIError(400, str(err), "max_tokens") from None
        return reqs, queue

    def cancel_unfinished(reqs) -> None:
        for r in reqs:
            if not r.finished and not r.cancelled:
                scheduler.cancel(r)  # its whole group

    def echoed(prompt, ids: list[int], req, logprobs) -> tuple[str, dict | None]:
        """Completions with echo: the prompt text and (logprobs asked) its logprobs object."""
        text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
        if logprobs is None:
            return text, None
        return text, P.echo_logprobs(tokenizer, ids, req, logprobs)

    def usage_of(prompts, reqs) -> dict:
        return P.usage(sum(len(ids) for ids in prompts), sum(len(r.generated) for r in reqs))

    async def run(parsed: P.ParsedRequest, prompts: list[list[int]], chat: bool):
        reqs, queue = submit(prompts, parsed)
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        if parsed.stream:
            return StreamingResponse(
                stream(reqs, queue, rid, parsed, prompts, chat), media_type="text/event-stream"
            )
        events: list[list] = [[] for _ in reqs]
        try:
            left = len(reqs)
            while left:
                i, ev = await queue.get()
                events[i].append(ev)
                left -= bool(ev.finish_reason)
        finally:
            cancel_unfinished(reqs)
        use = usage_of(prompts, reqs)
        want = parsed.sampling.logprobs is not None
        if not chat and parsed.echo and any(e[-1].finish_reason == "abort" for e in events):
            raise P.APIError(
                503, "The request was aborted (engine failure or cancellation) before it finished."
            )
        choices = []
        k = parsed.best_of
        for p, ids in enumerate(prompts):
            candidates = list(range(p * k, (p + 1) * k))
            if k > parsed.n:  # best_of: the n most likely candidates, in that order
                candidates.sort(key=lambda c: -reqs[c].cum_logprob)
            for rank, c in enumerate(candidates[: parsed.n]):
                req, evs, index = reqs[c], events[c], p * parsed.n + rank
                text, finish = "".join(e.text for e in evs), evs[-1].finish_reason
                if chat:
                    lp = P.chat_logprobs(tokenizer, evs) if want else None
                    choices.append(P.chat_choice(index, text, finish, lp))
                elif not parsed.echo:
                    lp = P.completion_logprobs(tokenizer, evs) if want else None
                    choices.append(P.completion_choice(index, text, finish, lp))
                else:
                    prompt = parsed.prompts[p]
                    prompt_text, lp = echoed(prompt, ids, req, parsed.sampling.logprobs)
                    if want:
                        more = P.completion_logprobs(tokenizer, evs, len(prompt_text))
                        lp = P.join_logprobs(lp, more)
                    choices.append(P.completion_choice(index, prompt_text + text, finish, lp))
        body = P.chat_body if chat else P.completion_body
        return body(rid, parsed.model, choices, use)

    async def stream(reqs, queue, rid, parsed, prompts, chat):
        """Streamed choices (best_of == n here: candidate i is choice i)."""

        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        want = parsed.sampling.logprobs is not None
        n = len(reqs)
        offsets = [0] * n
        echo = [not chat and parsed.echo] * n
        try:
            if chat:
                for i in range(n):
                    delta = {"role": "assistant", "content": ""}
                    yield sse(P.chat_chunk(rid, parsed.model, delta, index=i))
            left = n
            while left:
                i, ev = await queue.get()
                if echo[i] and ev.finish_reason != "abort":  # the prompt is scored by now
                    echo[i] = False
                    p = i // parsed.n
                    text, lp = echoed(
                        parsed.prompts[p], prompts[p], reqs[i], parsed.sampling.logprobs
                    )
                    yield sse(P.completion_chunk(rid, parsed.model, text, None, lp, index=i))
                    offsets[i] += len(text)
                if ev.finish_reason:
                    left -= 1
                    if chat:
                        yield sse(P.chat_chunk(rid, parsed.model, {}, ev.finish_reason, index=i))
                    else:
                        chunk = P.completion_chunk(rid, parsed.model, "", ev.finish_reason, index=i)
                        yield sse(chunk)
                    continue
                if chat:
                    lp = P.chat_logprobs(tokenizer, [ev]) if want else None
                    delta = {"content": ev.text}
                    yield sse(P.chat_chunk(rid, parsed.model, delta, None, lp, index=i))
                else:
                    lp = P.completion_logprobs(tokenizer, [ev], offsets[i]) if want else None
                    yield sse(P.completion_chunk(rid, parsed.model, ev.text, None, lp, index=i))
                offsets[i] += len(ev.text)
            if parsed.include_usage:
                body = (
                    P.chat_chunk(rid, parsed.model, {})
                    if chat
                    else P.completion_chunk(rid, parsed.model, "")
                )
                body["choices"] = []
                body["usage"] = usage_of(prompts, reqs)
                yield sse(body)
            yield "data: [DONE]\n\n"
        finally:
            cancel_unfinished(reqs)

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = P.parse_completion(await read_json(request))
        check_model(parsed)
        check_logit_bias(parsed)
        many = len(parsed.prompts) > 1
        prompts = [
            prompt_ids(
                tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt),
                f"prompt[{p}]" if many else "prompt",
                parsed,
            )
            for p, prompt in enumerate(parsed.prompts)
        ]
        return await run(parsed, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed = P.parse_chat(await read_json(request))
        check_model(parsed)
        check_logit_bias(parsed)
        text = tokenizer.apply_chat_template(parsed.messages)
        ids = prompt_ids(tokenizer.encode(text), "messages", parsed)
        return await run(parsed, [ids], chat=True)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        prompt, messages = P.parse_tokenize(await read_json(request))
        text = prompt if messages is None else tokenizer.apply_chat_template(messages)
        ids = tokenizer.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        ids = P.parse_detokenize(await read_json(request), tokenizer.vocab_size)
        return {"prompt": tokenizer.decode(ids)}

    app.state.started = time.time()
    return app
