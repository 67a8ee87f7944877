"""An OpenAI-compatible door beside gRPC: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

    rudder serve --openai-port 8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="TOKEN or anything")
    client.chat.completions.create(model="default", messages=[...], stream=True,
                                   extra_body={"rudder": {"interventions": [...], "readouts": {...}}})

A thin adapter over the generation core both doors share (server.generation): each body becomes a
`GenerateRequest` and goes through `GenerationCore.generate`, so validation, limits, admission,
metrics and the engine are one path for both doors; authentication, request counting and the
error map are the server's one `Policy` (server.policy), as for gRPC. The body's `rudder` object
is the JSON form of the request's `interventions`, `readouts` and `include_baseline` in protobuf's
own JSON mapping (field names in lowerCamelCase or as in the .proto), so the two doors cannot drift.
Each streamed chunk carries, per choice, `rudder: {token, readouts}` in the same mapping; the
baseline, when asked for, is choice 1. Errors are OpenAI's error object, with the HTTP status the
one map gives the gRPC code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import msgspec
import numpy as np
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rudder.core.errors import InvalidArgument, NotFound
from rudder.server.generation import Event, GenerationCore
from rudder.server.policy import Outcome, Policy, outcome
from rudder.server.wire import response_to_pb
from rudder.v1 import steering_pb2 as pb

log = logging.getLogger(__name__)

ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 429: "rate_limit_error"}
FINISH = {pb.LENGTH: "length", pb.EOS: "stop", pb.STOP_STRING: "stop", pb.GUARD: "content_filter"}
_GONE = object()  # what `_unless_gone` returns when the client disconnected
STEERING_FIELDS = {"interventions", "readouts", "include_baseline", "includeBaseline", "guards"}


class DoorError(Exception):
    """An error answered before or while streaming, as OpenAI's error object, its status from the one map."""

    def __init__(self, out: Outcome, param: str | None = None):
        super().__init__(out.message)
        self.outcome, self.param = out, param

    @classmethod
    def of(cls, e: Exception) -> DoorError:
        return e if isinstance(e, DoorError) else cls(outcome(e, "the OpenAI door"))

    @property
    def status(self) -> int:
        return self.outcome.http

    def body(self) -> dict:
        return {"error": {"message": self.outcome.message, "type": ERROR_TYPE.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}


def _bad(message: str, param: str | None = None) -> DoorError:
    return DoorError(outcome(InvalidArgument(message)), param)


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise _bad(f"{where}: only text content is served (a string, or parts of type 'text')", where)


def _zero(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v == 0


# The body's fields: those served, and (UNSERVED) those not served, each with what a value that asks
# for nothing is. Any other value of an unserved field, and any field in neither, is refused by name
# (400): nothing a client asks for is silently ignored.
SERVED = {"model", "messages", "prompt", "stream", "stream_options", "max_tokens", "max_completion_tokens",
          "temperature", "top_p", "top_k", "seed", "stop", "n", "ignore_eos", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "min_p", "logit_bias", "logprobs", "top_logprobs", "rudder",
          "user"}  # `user`: an end-user id for the caller's own abuse monitoring; it changes no answer
UNSERVED = {
    "tools": lambda v: v == [], "tool_choice": lambda v: v == "none", "functions": lambda v: v == [],
    "function_call": lambda v: v == "none", "parallel_tool_calls": lambda v: isinstance(v, bool),
    "response_format": lambda v: v == {"type": "text"}, "best_of": lambda v: v == 1 and not isinstance(v, bool),
    "echo": lambda v: v is False, "suffix": lambda v: v == "", "store": lambda v: v is False,
    "metadata": lambda v: v == {}, "modalities": lambda v: v == ["text"], "audio": lambda v: False,
    "prediction": lambda v: False, "reasoning_effort": lambda v: False, "web_search_options": lambda v: False,
    "service_tier": lambda v: v in ("auto", "default"), "verbosity": lambda v: False,
}
FLOAT_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")


def _refuse_unserved(body: dict) -> None:
    for name, value in body.items():
        if name in SERVED or value is None:
            continue
        if name not in UNSERVED:
            raise _bad(f"{name}: not a field this server knows; it serves {', '.join(sorted(SERVED))} (steering: "
                       "the rudder object)", name)
        if not UNSERVED[name](value):
            raise _bad(f"{name}: not served by this server (got {json.dumps(value)[:80]}); leave it out", name)


def logprobs_asked(body: dict, chat: bool) -> int | None:
    """How many alternatives per token the body asks for, or None when it asks for no logprobs: chat's
    `logprobs: true` with `top_logprobs: N`; a completion's `logprobs: N`."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if logprobs is not None and not isinstance(logprobs, bool):
            raise _bad(f"logprobs: true or false for a chat completion (alternatives: top_logprobs), got {logprobs!r}",
                       "logprobs")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
            raise _bad(f"top_logprobs: an integer from 0 to 20, got {top!r}", "top_logprobs")
        if top and not logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if logprobs else None
    if top is not None:
        raise _bad("top_logprobs is a chat completion field; a completion asks with logprobs: N", "top_logprobs")
    if logprobs is None:
        return None
    if isinstance(logprobs, bool) or not isinstance(logprobs, int):
        raise _bad(f"logprobs: an integer from 0 to 20 (alternatives per token), got {logprobs!r}", "logprobs")
    return logprobs


def to_request(body: dict, chat: bool, default_max_tokens: int) -> pb.GenerateRequest:
    """The GenerateRequest an OpenAI body asks for. Bad values of the fields it reads are refused by
    name, and so is `n` other than 1; fields it does not serve (tools, response_format, ...) are refused
    by name when they ask for anything (`UNSERVED`), and unknown fields always."""
    _refuse_unserved(body)
    req = pb.GenerateRequest()
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages: a non-empty list of {role, content} is required", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise _bad(f"messages[{i}]: each message needs a role and content", f"messages[{i}]")
            req.chat.messages.add(role=m["role"], content=_text(m["content"], f"messages[{i}].content"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad("prompt: one string is served (not token ids, not a batch)", "prompt")
        req.prompt = prompt
    if body.get("n") not in (None, 1):
        raise _bad("n: one choice per request is served (ask for the unsteered baseline with "
                   "rudder.include_baseline)", "n")
    s = req.sampling
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:  # absent or null: the older field
        max_tokens = body.get("max_tokens")
    for name, value, kind in (("max_tokens", max_tokens, int), ("top_k", body.get("top_k"), int),
                              ("seed", body.get("seed"), int), *((f, body.get(f), float) for f in FLOAT_FIELDS)):
        if value is None:
            continue
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ValueError
            setattr(s, name, kind(value))
        except (ValueError, OverflowError, TypeError):  # NaN, infinities, past the proto's range
            raise _bad(f"{name}: expected {'an integer' if kind is int else 'a finite number'}, got {value!r}",
                       name) from None
    if body.get("temperature") is None:
        s.temperature = 1.0  # OpenAI's default; the gRPC door's default is greedy
    if max_tokens is None:
        s.max_tokens = default_max_tokens  # OpenAI's default: up to the context (the stream ends with LENGTH)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
            raise _bad("stop: a string or a list of strings", "stop")
        s.stop.extend(stops)
    if body.get("ignore_eos"):
        s.ignore_eos = True
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise _bad("logit_bias: an object of token id -> bias from -100 to 100", "logit_bias")
        for token, value in bias.items():
            try:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError
                s.logit_bias[int(token)] = float(value)
            except (ValueError, OverflowError):
                raise _bad(f"logit_bias: {token!r}: {value!r} is not token id -> number", "logit_bias") from None
    s.logprobs = logprobs_asked(body, chat) or 0
    steering = body.get("rudder")
    if steering is not None:
        if not isinstance(steering, dict):
            raise _bad("rudder: an object with interventions, readouts, guards and include_baseline", "rudder")
        unknown = sorted(set(steering) - STEERING_FIELDS)
        if unknown:
            raise _bad(f"rudder: unknown field(s) {', '.join(unknown)}; it takes interventions, readouts, guards "
                       f"and include_baseline (the prompt and sampling are the body's own fields)", "rudder")
        try:
            json_format.ParseDict(steering, req)
        except json_format.ParseError as e:
            raise _bad(f"rudder: {e}", "rudder") from None
    return req


_TINY = float(np.finfo(np.float32).tiny)


def _as_json(m) -> dict:
    return json_format.MessageToDict(m, preserving_proto_field_name=True)


def token_json(msg: pb.GenerateResponse) -> dict:
    """`{token, readouts, guard}` of one message, each exactly as `json_format.MessageToDict(...,
    preserving_proto_field_name=True)` writes it (tests hold them equal), built by hand: the door
    writes one per token, and protobuf's generic printer took a sixth of the server's time.

    Every float of the message is turned into protobuf's form at once: the shortest decimal that
    reads back as the same float32 (numpy's, for finite normal values; anything else, rare,
    goes through protobuf's own printer)."""
    t = msg.token
    floats = [t.logprob, *(a.logprob for a in t.top_logprobs)]
    for r in msg.readouts:
        floats += r.top.values
        floats += r.selected.values
    short = np.fromiter(floats, np.float32, len(floats)).astype(str).astype(np.float64).tolist()
    if not all(_TINY <= abs(v) < math.inf or v == 0 for v in short):  # NaN, infinite or subnormal
        out = {"token": _as_json(t)}
        if msg.readouts:
            out["readouts"] = [_as_json(r) for r in msg.readouts]
    else:
        token = {}
        if t.id:
            token["id"] = t.id
        if t.text:
            token["text"] = t.text
        if t.logprob or math.copysign(1.0, t.logprob) < 0:  # -0.0 is not the default, to protobuf
            token["logprob"] = short[0]
        if t.position:
            token["position"] = t.position
        if t.is_prompt:
            token["is_prompt"] = True
        if t.top_logprobs:
            token["top_logprobs"] = [{**({"id": a.id} if a.id else {}), **({"text": a.text} if a.text else {}),
                                      **({"logprob": v} if a.logprob or math.copysign(1.0, a.logprob) < 0 else {})}
                                     for a, v in zip(t.top_logprobs, short[1:])]
        out = {"token": token}
        if msg.readouts:
            at, readouts = 1 + len(t.top_logprobs), []
            for r in msg.readouts:
                one: dict = {}
                if r.source:
                    one["source"] = r.source
                for name in ("top", "selected"):
                    if r.HasField(name):
                        fv, values = getattr(r, name), {}
                        if fv.ids:
                            values["ids"] = list(fv.ids)
                        if n := len(fv.values):
                            values["values"] = short[at:at + n]
                            at += n
                        one[name] = values
                if r.codes:
                    one["codes"] = [{**({"head": c.head} if c.head else {}),
                                     **({"codes": list(c.codes)} if c.codes else {})} for c in r.codes]
                readouts.append(one)
            out["readouts"] = readouts
    if msg.HasField("guard"):  # a guard stopped the sequence; this chunk withholds the guarded token
        out["guard"] = _as_json(msg.guard)
    return out


async def _messages(events: AsyncIterator[Event]) -> AsyncIterator[pb.GenerateResponse]:
    """The core's events as the gRPC stream's messages, whose JSON mapping the door writes."""
    async with aclosing(events):
        async for event in events:
            yield response_to_pb(event)


def logprobs_json(chat: bool, tokens: list[pb.Token], text_of, offset: int = 0) -> dict:
    """OpenAI's `logprobs` object of a choice (or of a streamed chunk's tokens): a chat completion's
    `content` entries with their `top_logprobs`, or a completion's parallel lists. A token is named
    by its own text (`text_of(id)`, as its alternatives are), not by the text the stream emitted at
    it (empty inside a UTF-8 character, held back at a possible stop string); a completion's
    `text_offset` counts the emitted text from `offset`."""
    if chat:
        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(text_of(t.id), t.logprob), "top_logprobs": [entry(a.text, a.logprob)
                                                                                 for a in t.top_logprobs]}
                            for t in tokens], "refusal": None}
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [text_of(t.id) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{a.text: a.logprob for a in t.top_logprobs} for t in tokens], "text_offset": offsets}


class OpenAIDoor:
    """The Starlette app; `serve(host, port)` runs it with uvicorn on the running event loop."""

    def __init__(self, core: GenerationCore, policy: Policy, tls=None):
        """`policy`: the server's (the same bearer token, counter and error map as gRPC); `tls` (app.Tls):
        serve HTTPS."""
        self.core, self.policy, self.tls = core, policy, tls
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ])
        self.server = None
        self.port: int | None = None

    # ------------------------------------------------------------ plumbing

    def _authorize(self, request: Request) -> None:
        self.policy.admit(request.headers.get("authorization"))

    async def _body(self, request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _bad("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        model = body.get("model")
        if model not in (None, self.core.model_name, "default"):
            raise DoorError(outcome(NotFound(f"model {model!r} is not served here; this server serves "
                                             f"{self.core.model_name!r} (GET /v1/models)")), "model")
        return body

    async def serve(self, host: str, port: int) -> None:
        import uvicorn

        tls = {}
        if self.tls:
            tls = {"ssl_certfile": self.tls.cert, "ssl_keyfile": self.tls.key}
            if self.tls.client_ca:  # mutual TLS, as on the gRPC port
                tls |= {"ssl_ca_certs": self.tls.client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        try:  # bound here, so that a port in use is an OSError for the caller, not uvicorn's sys.exit
            sock = socket.create_server((host, port))
        except OSError as e:
            raise OSError(f"the OpenAI door could not bind {host}:{port}: {e}") from e
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False, **tls)
        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext  # `rudder serve` handles signals for both doors
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"the OpenAI door did not start on {host}:{port}")
            await asyncio.sleep(0.01)
        self.port = sock.getsockname()[1]
        log.info("OpenAI-compatible door on http://%s:%d/v1", host, self.port)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop taking requests; streams in flight get `grace` seconds."""
        if self.server is not None:
            self.server.config.timeout_graceful_shutdown = grace
            self.server.should_exit = True
            await self._task

    # ------------------------------------------------------------ routes

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except Exception as e:  # noqa: BLE001 - answered in OpenAI's shape
            err = DoorError.of(e)
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse({"object": "list", "data": [
            {"id": self.core.model_name, "object": "model", "created": 0, "owned_by": "rudder"}]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        method = "ChatCompletions" if chat else "Completions"
        try:
            self._authorize(request)
            body = await self._body(request)
            req = to_request(body, chat, self.core.limits.max_tokens)
            messages = _messages(self.core.generate(req))
            meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": self.core.model_name}
            stream = bool(body.get("stream"))
            logprobs = logprobs_asked(body, chat) is not None

            async def started():  # errors before the first token answer with a status
                first = await anext(messages, None)
                return first if stream else await self._collect(chat, meta, first, messages, logprobs)

            result = await self._unless_gone(request, started())
            if result is _GONE:  # the client went away: its generation was aborted
                await messages.aclose()
                self.policy.count(method, "CANCELLED")
                return Response(status_code=499)
            if stream:  # counted by _sse, when the stream ends
                usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))
                return StreamingResponse(self._sse(method, chat, meta, result, messages, usage_in_stream, logprobs),
                                         media_type="text/event-stream")
            out = result
        except Exception as e:  # noqa: BLE001 - every error is answered in OpenAI's shape
            err = DoorError.of(e)
            self.policy.count(method, err.outcome.code)
            return JSONResponse(err.body(), status_code=err.status)
        except BaseException:
            self.policy.count(method, "CANCELLED")
            raise
        self.policy.count(method, "OK")
        return JSONResponse(out)

    @staticmethod
    async def _unless_gone(request: Request, work):
        """Await `work`, unless the client disconnects first: then `work` is cancelled (closing the
        service's stream, which aborts the generation) and `_GONE` comes back. Covers the wait for a
        stream's first token and the whole of a collected (not streamed) completion; once streaming,
        Starlette's StreamingResponse watches the connection itself."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":  # the body is read: only that is left
                pass

        task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            if watch.done() and not watch.cancelled():
                return _GONE
            raise

    async def _all(self, first, messages) -> AsyncIterator[pb.GenerateResponse]:
        async with aclosing(messages):
            if first is not None:
                yield first
                async for msg in messages:
                    yield msg

    async def _collect(self, chat: bool, meta: dict, first, messages, logprobs: bool) -> dict:
        choices: dict[int, dict] = {}
        usage = None
        async for msg in self._all(first, messages):
            i = 1 if msg.baseline else 0
            c = choices.setdefault(i, {"index": i, "text": "", "finish_reason": None, "tokens": [], "logprobs": []})
            if not msg.token.is_prompt:
                c["text"] += msg.token.text
                if logprobs and not msg.HasField("guard"):
                    c["logprobs"].append(msg.token)
            c["tokens"].append(token_json(msg))
            if msg.stop_reason:
                c["finish_reason"] = FINISH[msg.stop_reason]
                if not msg.baseline:
                    usage = {"prompt_tokens": msg.usage.prompt_tokens,
                             "completion_tokens": msg.usage.completion_tokens,
                             "total_tokens": msg.usage.prompt_tokens + msg.usage.completion_tokens}
        out_choices = []
        for i in sorted(choices):
            c = choices[i]
            body = ({"message": {"role": "assistant", "content": c["text"]}} if chat else {"text": c["text"]})
            lp = logprobs_json(chat, c["logprobs"], self.core.token_text) if logprobs else None
            out_choices.append({"index": i, **body, "logprobs": lp,
                                "finish_reason": c["finish_reason"],
                                "rudder": {"baseline": i == 1, "tokens": c["tokens"]}})
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": out_choices,
                "usage": usage}

    async def _sse(self, method: str, chat: bool, meta: dict, first, messages, usage_in_stream: bool,
                   logprobs: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(payload: dict) -> bytes:
            return b"data: " + msgspec.json.encode(payload) + b"\n\n"

        def chunk(i: int, delta: str | None, finish: str | None, extra: dict | None, role: bool = False,
                  lp: dict | None = None) -> dict:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": i, "delta": d, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": i, "text": delta or "", "logprobs": lp, "finish_reason": finish}
            if extra is not None:
                choice["rudder"] = extra
            return {**meta, "object": kind, "choices": [choice], **({"usage": None} if usage_in_stream else {})}

        code = "OK"
        started: set[int] = set()
        emitted: dict[int, int] = {}  # characters streamed per choice: a completion's text_offset
        usage = None
        every = self._all(first, messages)
        try:
            async for msg in every:
                i = 1 if msg.baseline else 0
                if chat and i not in started:
                    started.add(i)
                    yield event(chunk(i, None, None, None, role=True))
                text = None if msg.token.is_prompt else msg.token.text
                finish = FINISH[msg.stop_reason] if msg.stop_reason else None
                lp = None
                if logprobs and text is not None and not msg.HasField("guard"):
                    lp = logprobs_json(chat, [msg.token], self.core.token_text, emitted.get(i, 0))
                if text:
                    emitted[i] = emitted.get(i, 0) + len(text)
                yield event(chunk(i, text, finish, {"baseline": msg.baseline, **token_json(msg)}, lp=lp))
                if msg.stop_reason and not msg.baseline:
                    usage = {"prompt_tokens": msg.usage.prompt_tokens, "completion_tokens": msg.usage.completion_tokens,
                             "total_tokens": msg.usage.prompt_tokens + msg.usage.completion_tokens}
            if usage_in_stream:
                yield event({**meta, "object": kind, "choices": [], "usage": usage})
        except Exception as e:  # noqa: BLE001 - after the headers, an error is an event
            err = DoorError.of(e)
            code = err.outcome.code
            yield event(err.body())
        except BaseException:
            code = "CANCELLED"  # the client went away; closing the stream aborts the generation
            raise
        finally:
            await every.aclose()  # closes the service's stream now, not at garbage collection
            self.policy.count(method, code)
        yield b"data: [DONE]\n\n"
