"""OpenAI-compatible HTTP server (FastAPI): completions, chat completions, models, health, metrics.

    app = create_app(scheduler, tokenizer, model_name="tiny")   # the scheduler thread starts with it
    uvicorn.run(app, host="127.0.0.1", port=8000)

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


def create_app(scheduler, tokenizer, model_name: str, metrics: ServeMetrics | None = None):
    metrics = metrics or scheduler.metrics or ServeMetrics()
    scheduler.metrics = metrics
    max_len = scheduler.engine.max_len

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
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

    def prompt_ids(ids: list[int], param: str) -> list[int]:
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
        return ids

    def submit(ids, sampling):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        req = EngineRequest(
            ids, sampling, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        )
        try:
            scheduler.submit(req)
        except QueueFull as err:
            raise P.APIError(
                429, f"Server busy: {err}. Retry shortly.", None, "queue_full"
            ) from None
        except ValueError as err:
            raise P.APIError(400, str(err), "max_tokens") from None
        return req, queue

    def echoed(parsed: P.ParsedRequest, ids: list[int], req) -> tuple[str, dict | None]:
        """Completions with echo: the prompt text and (logprobs asked) its logprobs object."""
        text = parsed.prompt if isinstance(parsed.prompt, str) else tokenizer.decode(ids)
        if parsed.sampling.logprobs is None:
            return text, None
        return text, P.echo_logprobs(tokenizer, ids, req, parsed.sampling.logprobs)

    async def run(parsed: P.ParsedRequest, ids: list[int], chat: bool):
        req, queue = submit(ids, parsed.sampling)
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        if parsed.stream:
            return StreamingResponse(
                stream(req, queue, rid, parsed, ids, chat), media_type="text/event-stream"
            )
        events = []
        try:
            while True:
                ev = await queue.get()
                events.append(ev)
                if ev.finish_reason:
                    break
        finally:
            if not req.finished:
                scheduler.cancel(req)
        text = "".join(e.text for e in events)
        use = P.usage(len(ids), len(req.generated))
        want = parsed.sampling.logprobs is not None
        if chat:
            lp = P.chat_logprobs(tokenizer, events) if want else None
            return P.chat_body(rid, parsed.model, text, events[-1].finish_reason, lp, use)
        if not parsed.echo:
            lp = P.completion_logprobs(tokenizer, events) if want else None
            return P.completion_body(rid, parsed.model, text, events[-1].finish_reason, lp, use)
        if events[-1].finish_reason == "abort":
            raise P.APIError(
                503, "The request was aborted (engine failure or cancellation) before it finished."
            )
        prompt_text, lp = echoed(parsed, ids, req)
        if want:
            lp = P.join_logprobs(lp, P.completion_logprobs(tokenizer, events, len(prompt_text)))
        finish = events[-1].finish_reason
        return P.completion_body(rid, parsed.model, prompt_text + text, finish, lp, use)

    async def stream(req, queue, rid, parsed, ids, chat):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        want = parsed.sampling.logprobs is not None
        offset = 0
        try:
            if chat:
                yield sse(P.chat_chunk(rid, parsed.model, {"role": "assistant", "content": ""}))
            echo = not chat and parsed.echo
            while True:
                ev = await queue.get()
                if echo and ev.finish_reason != "abort":  # the prompt is scored by now
                    echo = False
                    text, lp = echoed(parsed, ids, req)
                    yield sse(P.completion_chunk(rid, parsed.model, text, None, lp))
                    offset += len(text)
                if ev.finish_reason:
                    if chat:
                        yield sse(P.chat_chunk(rid, parsed.model, {}, ev.finish_reason))
                    else:
                        yield sse(P.completion_chunk(rid, parsed.model, "", ev.finish_reason))
                    if parsed.include_usage:
                        body = (
                            P.chat_chunk(rid, parsed.model, {})
                            if chat
                            else P.completion_chunk(rid, parsed.model, "")
                        )
                        body["choices"] = []
                        body["usage"] = P.usage(len(req.prompt_ids), len(req.generated))
                        yield sse(body)
                    yield "data: [DONE]\n\n"
                    return
                if chat:
                    lp = P.chat_logprobs(tokenizer, [ev]) if want else None
                    yield sse(P.chat_chunk(rid, parsed.model, {"content": ev.text}, None, lp))
                else:
                    lp = P.completion_logprobs(tokenizer, [ev], offset) if want else None
                    yield sse(P.completion_chunk(rid, parsed.model, ev.text, None, lp))
                offset += len(ev.text)
        finally:
            if not req.finished:
                scheduler.cancel(req)

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = P.parse_completion(await read_json(request))
        check_model(parsed)
        if isinstance(parsed.prompt, str):
            ids = prompt_ids(tokenizer.encode(parsed.prompt), "prompt")
        else:
            ids = prompt_ids(list(parsed.prompt), "prompt")
        return await run(parsed, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed = P.parse_chat(await read_json(request))
        check_model(parsed)
        text = tokenizer.apply_chat_template(parsed.messages)
        ids = prompt_ids(tokenizer.encode(text), "messages")
        return await run(parsed, ids, chat=True)

    app.state.started = time.time()
    return app
