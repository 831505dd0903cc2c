"""The HTTP API (FastAPI) and its web page.

Routes: POST /v1/translate, POST /v1/generate (server-sent events with "stream": true, in the shape
of text-generation-inference), POST /v1/explain, GET /v1/models, GET /healthz, the
LibreTranslate-compatible POST /translate and GET /languages, and the page at GET /.
Errors are JSON `{"error": "..."}` with a 4xx status for anything a client sent; 503 (with
Retry-After) when the server is too busy; never a 5xx for a client's input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException  # FastAPI's is a subclass; the router raises this one (404, 405)

from aiayn.decode.beam import MAX_ALPHA
from aiayn.serve.batching import DynamicBatcher, QueueFull
from aiayn.serve.models import Limits, Models, decode_precision

STATIC = Path(__file__).parent / "static"
LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "cs": "Czech"}
log = logging.getLogger("aiayn.serve")


class APIError(Exception):
    """A request the server refuses: status code and one line that says why."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ------------------------------------------------------------------------------------ schemas
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TranslateRequest(_Strict):
    text: str | None = Field(None, description="one text (one or more sentences, newlines kept)")
    texts: list[str] | None = Field(None, description="several texts, translated together")
    beam: int | None = Field(None, ge=1, description="beam size; 1 = greedy (default: the server's)")
    alpha: float | None = Field(None, ge=0, le=MAX_ALPHA, description="length penalty (default: the model's)")
    precision: str | None = Field(None, description="fp32, int8 or bf16 (default: the server's)")


class TranslateResponse(BaseModel):
    translation: str | None = None
    translations: list[str] | None = None
    model: str


class GenerateRequest(_Strict):
    prompt: str = Field("", description="text to continue (empty: start a new line)")
    max_new_tokens: int = Field(100, ge=1)
    temperature: float = Field(0.8, ge=0, le=10, description="0 = greedy")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, description="stop once the text holds one of these")
    top_n_tokens: int = Field(0, ge=0, le=10, description="the most likely tokens of each step to report")
    stream: bool = False


class ExplainRequest(_Strict):
    text: str = Field(..., description="the sentence to translate (or, with task lm, the prompt)")
    task: Literal["translation", "lm"] = "translation"
    kinds: list[Literal["encoder", "decoder", "cross"]] | None = Field(
        None, description="which attention (default: cross for a translation, decoder for a language model)")
    layers: list[int] | None = Field(None, description="layer indices from 0 (default: all)")
    heads: list[int] | None = Field(None, description="head indices from 0 (default: all)")
    top_k: int = Field(10, ge=1, le=50, description="next tokens reported per output step")
    max_new_tokens: int | None = Field(None, ge=1, description="output tokens at most")


class LibreTranslateRequest(BaseModel):
    q: str | list[str]
    source: str = "auto"
    target: str | None = None
    format: str = "text"
    api_key: str | None = None
    alternatives: int = Field(0, ge=0)


# -------------------------------------------------------------------------------------- checks
def _check_text(text: str, what: str, limits: Limits, allow_empty: bool = False) -> None:
    if not allow_empty and not text.strip():
        raise APIError(422, f"{what} is empty")
    if len(text) > limits.max_chars:
        raise APIError(413, f"{what} has {len(text)} characters; the limit is {limits.max_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(422, f"{what} is not valid Unicode (a lone surrogate)") from None


def _texts(text: str | None, texts: list[str] | None, limits: Limits, name: str = "text",
           list_name: str | None = None) -> list[str]:
    """The request's text or texts, checked; list_name: the field of the list (default: name + "s")."""
    list_name = list_name or name + "s"
    if (text is None) == (texts is None):
        raise APIError(422, f"give either {name!r} (a string) or {list_name!r} (a list of strings)")
    if texts is not None:
        if not texts:
            raise APIError(422, f"{list_name!r} is an empty list")
        if len(texts) > limits.max_texts:
            raise APIError(413, f"{len(texts)} texts; the limit is {limits.max_texts} per request")
        for i, t in enumerate(texts):
            _check_text(t, f"{list_name}[{i}]", limits)
        return texts
    _check_text(text, name, limits)
    return [text]


def _index(chosen: list[int] | None, n: int, what: str) -> list[int]:
    if chosen is None:
        return list(range(n))
    bad = [i for i in chosen if not 0 <= i < n]
    if bad or not chosen:
        raise APIError(422, f"{what} must be indices in 0..{n - 1}, got {chosen}")
    return list(dict.fromkeys(chosen))


def _round(x: float) -> float:
    return round(float(x), 4)


# -------------------------------------------------------------------------------------- the app
INLINE_CHARS = 1000  # texts up to this many characters in all are split and tokenized on the event loop


class Server:
    """What the routes share: models, limits, the worker thread and the batcher."""

    def __init__(self, models: Models, limits: Limits, api_key: str | None, beam: int, precision: str):
        self.models, self.limits, self.api_key, self.beam = models, limits, api_key, beam
        self.precision = decode_precision(precision, device=models.device)
        self.executor: ThreadPoolExecutor | None = None
        self.batcher: DynamicBatcher | None = None
        self.generations = weakref.WeakSet()  # the generations under way: a generator that is dropped leaves

    async def start(self, warmup: bool) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="aiayn-model")  # all model work, in turn
        if self.models.translation is not None:
            t = self.models.translation
            self.batcher = DynamicBatcher(t.translate_batch, self.executor, self.limits.batch_wait_ms,
                                          self.limits.batch_tokens, self.limits.max_queue, self.limits.batch_gap_ms)
            self.batcher.start()
            if warmup:  # the inference copy, and any kernel compiled at first use, before the first client
                await self.batcher.submit((1, t.alpha, self.precision), ["A man is riding a bicycle."], [1])
        if warmup and self.models.lm is not None:
            await self.run(self.models.lm.inference, self.precision)

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def run(self, fn, *args):
        """fn(*args) in the model's worker thread."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def translation(self):
        if self.models.translation is None:
            raise APIError(404, "this server has no translation model (aiayn serve --model ...)")
        return self.models.translation

    def lm(self):
        if self.models.lm is None:
            raise APIError(404, "this server has no language model (aiayn serve --lm ...)")
        return self.models.lm

    async def translate(self, texts: list[str], beam: int | None, alpha: float | None,
                        precision: str | None) -> list[str]:
        from aiayn.translate import join_texts, split_texts

        t = self.translation()
        beam = self.beam if beam is None else beam
        if beam > self.limits.max_beam:
            raise APIError(422, f"beam must be <= {self.limits.max_beam}, got {beam}")
        try:
            precision = decode_precision(precision, self.precision, self.models.device)
        except ValueError as e:
            raise APIError(422, str(e)) from None
        key = (beam, t.alpha if alpha is None else alpha, precision)

        def prepare():  # sentence splitting and tokenizing
            cut, unique = split_texts(texts, t.src)
            return cut, unique, [t.cost(s, beam) for s in unique]

        # a long text off the event loop (not in the model's thread); a sentence or two on it (~0.1 ms:
        # less than a hop to another thread, which cost the 32-client load test ~10% of its requests/s)
        long = sum(map(len, texts)) > INLINE_CHARS
        cut, unique, costs = await asyncio.to_thread(prepare) if long else prepare()
        done = await self.batcher.submit(key, unique, costs) if unique else []
        return join_texts(cut, dict(zip(unique, done)))


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the request's body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _guarded(request: Request, work, timeout: float):
    """Await `work` unless the client leaves (the work is then cancelled: queued jobs are dropped)
    or it takes longer than `timeout` (503)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    if gone in done:
        raise APIError(499, "the client closed the connection")
    raise APIError(503, f"the request took longer than {timeout:g} s", {"Retry-After": "5"})


class BodyLimit:
    """ASGI middleware: a body larger than `limit` bytes is refused with 413 before any route runs."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await _send_json(send, 413, {"error": f"the body is larger than {self.limit} bytes"})
            return await self.app(scope, receive, send)
        chunks, size = [], 0  # no length given (chunked): read it all, up to the limit, then replay it
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_json(send, 413, {"error": f"the body is larger than {self.limit} bytes"})
            if not message.get("more_body"):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _validation_message(errors) -> tuple[int, str]:
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "malformed JSON: " + "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in errors)
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e['msg']}")
    return 422, "; ".join(parts)


def create_app(models: Models, limits: Limits = Limits(), api_key: str | None = None, beam: int = 4,
               precision: str = "fp32", warmup: bool = True) -> FastAPI:
    """The FastAPI app serving `models`. api_key: every route but /healthz and the page needs
    `Authorization: Bearer <key>` (LibreTranslate clients may send it as "api_key" instead)."""
    server = Server(models, limits, api_key, beam, precision)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await server.start(warmup)
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="aiayn", version="0.1.0", lifespan=lifespan,
                  description="Translate, generate and look at attention with the Transformer of "
                  "'Attention Is All You Need'.")
    app.state.server = server
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    bearer = HTTPBearer(auto_error=False)

    async def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        # async: FastAPI runs a plain def dependency in a thread pool, a thread hop per request
        if api_key and (credentials is None or not secrets.compare_digest(credentials.credentials.encode(),
                                                                          api_key.encode())):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    @app.exception_handler(QueueFull)
    async def queue_full(request, e: QueueFull):
        return JSONResponse({"error": str(e)}, 503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        status, message = _validation_message(e.errors())
        return JSONResponse({"error": message}, status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=e.headers)

    @app.exception_handler(ValueError)
    async def value_error(request, e: ValueError):  # the library's word for bad input
        return JSONResponse({"error": str(e)}, 422)

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(e).__name__})"}, 500)

    # ------------------------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz")
    async def healthz():
        b = server.batcher  # None without a translation model (and empty when len(b) == 0: no `if b`)
        return {"status": "ok", "queued": len(b) if b is not None else 0, "generations": len(server.generations),
                "batches": b.batches if b is not None else 0, "batched_sentences": b.jobs if b is not None else 0}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models():
        data = [m.describe() for m in (models.translation, models.lm) if m is not None]
        return {"data": data, "limits": limits.as_dict(), "default_beam": server.beam,
                "precision": server.precision}

    @app.post("/v1/translate", response_model=TranslateResponse, response_model_exclude_none=True,
              dependencies=[Depends(authorized)])
    async def translate(body: TranslateRequest, request: Request):
        texts = _texts(body.text, body.texts, limits)
        out = await _guarded(request, server.translate(texts, body.beam, body.alpha, body.precision),
                             limits.timeout_s)
        name = server.translation().name
        return {"translation": out[0], "model": name} if body.text is not None else \
            {"translations": out, "model": name}

    @app.post("/v1/generate", dependencies=[Depends(authorized)],
              responses={200: {"content": {"text/event-stream": {}}, "description":
                               "JSON, or with stream: server-sent events, one per token, then [DONE]"}})
    async def generate(body: GenerateRequest, request: Request):
        from aiayn.tasks.lm import cut_at_stop, stream_tokens

        lm = server.lm()
        _check_text(body.prompt, "prompt", limits, allow_empty=True)
        if body.max_new_tokens > limits.max_new_tokens:
            raise APIError(422, f"max_new_tokens must be <= {limits.max_new_tokens}, got {body.max_new_tokens}")
        if len(body.stop) > limits.max_stop or any(len(s) > 100 for s in body.stop):
            raise APIError(422, f"at most {limits.max_stop} stop strings of at most 100 characters")
        lm.tokenizer.encode(body.prompt)  # characters outside a character model's vocabulary: ValueError, 422
        if len(server.generations) >= limits.max_streams:
            raise APIError(503, f"the server is busy ({len(server.generations)} generations running)",
                           {"Retry-After": "1"})
        seed = body.seed if body.seed is not None else random.randrange(2**31)  # exact in JavaScript too
        model = await server.run(lm.inference, server.precision)  # (made at start, unless warm-up was off)
        steps = stream_tokens(model, lm.tokenizer, body.prompt, body.max_new_tokens, body.temperature,
                              body.top_k, body.top_p, seed, body.stop, body.top_n_tokens)
        special = {lm.tokenizer.eos_id, lm.tokenizer.bos_id, lm.tokenizer.pad_id}

        def token(t_id: int, text: str, logprob: float) -> dict:
            return {"id": t_id, "text": text, "logprob": _round(logprob), "special": t_id in special}

        def event(i: int, tok, text: str) -> dict:
            done = tok.finish_reason is not None
            return {"index": i, "token": token(tok.id, tok.text, tok.logprob),
                    "top_tokens": [token(*t) for t in tok.top],
                    "generated_text": cut_at_stop(text, body.stop) if done else None,
                    "details": {"finish_reason": tok.finish_reason, "generated_tokens": i + 1, "seed": seed}
                    if done else None}

        # counted until it ends (discarded in the finally blocks below), or is dropped unstarted (a weak set)
        server.generations.add(steps)
        if not body.stream:
            abandoned = []  # set when the request is given up on: the worker thread stops at its next step

            def run_all():
                toks = []
                for tok in steps:
                    if abandoned:
                        break
                    toks.append(tok)
                return toks
            try:
                toks = await _guarded(request, server.run(run_all), limits.timeout_s)
            finally:
                abandoned.append(True)
                server.generations.discard(steps)
            text = "".join(t.text for t in toks)
            return {"generated_text": cut_at_stop(text, body.stop),
                    "details": {"finish_reason": toks[-1].finish_reason if toks else "length",
                                "generated_tokens": len(toks), "seed": seed,
                                "tokens": [{**token(t.id, t.text, t.logprob),
                                            "top_tokens": [token(*x) for x in t.top]} for t in toks]}}

        async def sse():
            text, i = "", 0
            try:
                while True:
                    tok = await server.run(next, steps, None)  # one step at a time: streams take turns
                    if tok is None:
                        break
                    text += tok.text
                    yield f"data: {json.dumps(event(i, tok, text))}\n\n"
                    i += 1
                    if tok.finish_reason:
                        break
                yield "data: [DONE]\n\n"
            except Exception as e:  # after the 200 has been sent: the error as a last event
                log.exception("generation failed")
                yield f"data: {json.dumps({'error': str(e), 'error_type': 'generation'})}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client left: the task was cancelled at a step
                server.executor.submit(steps.close)  # in the worker thread, after any step still running
                server.generations.discard(steps)  # not left to the garbage collector: the count is exact

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/explain", dependencies=[Depends(authorized)])
    async def explain(body: ExplainRequest, request: Request):
        from aiayn.explain import explain_lm, explain_translation

        m = server.translation() if body.task == "translation" else server.lm()
        _check_text(body.text, "text", limits)
        cfg = m.model.cfg
        if body.max_new_tokens is not None and body.max_new_tokens >= cfg.max_len:
            raise APIError(422, f"max_new_tokens must be < {cfg.max_len}")
        if body.task == "lm":
            m.tokenizer.encode(body.text)  # unknown characters: 422 before the worker thread
            run = (explain_lm, m.model, m.tokenizer, body.text, body.top_k, (1.0,), body.max_new_tokens or 20)
        else:
            run = (explain_translation, m.model, m.tokenizer, body.text, body.top_k, (1.0,), body.max_new_tokens)
        kinds = body.kinds or (["cross"] if body.task == "translation" else ["decoder"])
        allowed = ("encoder", "decoder", "cross") if body.task == "translation" else ("decoder",)
        if any(k not in allowed for k in kinds):
            raise APIError(422, f"a {body.task} model has attention kinds {', '.join(allowed)}")
        n_layers = {"encoder": cfg.n_encoder_layers, "decoder": cfg.n_decoder_layers, "cross": cfg.n_decoder_layers}
        layers = {k: _index(body.layers, n_layers[k], "layers") for k in kinds}
        heads = _index(body.heads, cfg.n_heads, "heads")
        ex = await _guarded(request, server.run(*run), limits.timeout_s)
        axes = {"encoder": (ex.src_pieces, ex.src_pieces), "decoder": (ex.dec_pieces, ex.dec_pieces),
                "cross": (ex.out_pieces, ex.src_pieces)}
        attention = {}
        for k in kinds:
            maps = ex.attention[k]
            attention[k] = {"rows": axes[k][0], "cols": axes[k][1], "layers": layers[k], "heads": heads,
                            "weights": [[[[_round(w) for w in row] for row in maps[l][h].tolist()] for h in heads]
                                        for l in layers[k]]}
        return {"task": ex.task, "source_tokens": ex.src_pieces, "output_tokens": ex.out_pieces,
                "output": ex.output, "truncated": ex.truncated, "attention": attention,
                "top_tokens": [[{"token": p, "prob": _round(ex.top_probs[0, i, r])} for r, p in enumerate(row)]
                               for i, row in enumerate(ex.top_pieces)]}

    # ---------------------------------------------------------------- LibreTranslate's API
    @app.get("/languages")
    async def languages():
        t = server.translation()
        return [{"code": t.src, "name": LANGUAGE_NAMES.get(t.src, t.src), "targets": [t.tgt]},
                {"code": t.tgt, "name": LANGUAGE_NAMES.get(t.tgt, t.tgt), "targets": []}]

    lt_schema = LibreTranslateRequest.model_json_schema()

    @app.post("/translate", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": lt_schema},
        "application/x-www-form-urlencoded": {"schema": lt_schema}}}})
    async def libretranslate(request: Request):
        """LibreTranslate's /translate: `q` a string or a list, `source`, `target`, `format: text`."""
        raw = await request.body()
        try:
            if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                form = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
                data = {k: (v if k == "q" and len(v) > 1 else v[-1]) for k, v in form.items()}
            else:
                data = json.loads(raw)
            body = LibreTranslateRequest.model_validate(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise APIError(400, "malformed request: send JSON or a form") from None
        except ValidationError as e:
            raise APIError(400, _validation_message(e.errors())[1]) from None
        if api_key:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else body.api_key
            if not given or not secrets.compare_digest(given.encode(), api_key.encode()):
                raise APIError(403, "Invalid API key")
        t = server.translation()
        if body.source not in ("auto", t.src):
            raise APIError(400, f"{body.source} is not supported as a source language (this model: {t.src})")
        if body.target is None:
            raise APIError(400, f"target is required (this model: {t.tgt})")
        if body.target != t.tgt:
            raise APIError(400, f"{body.target} is not supported as a target language (this model: {t.tgt})")
        if body.format != "text":
            raise APIError(400, f"format {body.format!r} is not supported: use text")
        try:
            if isinstance(body.q, str):
                texts = _texts(body.q, None, limits, name="q")
            else:
                texts = _texts(None, body.q, limits, name="q", list_name="q")
        except APIError as e:  # LibreTranslate's status for bad input
            raise APIError(400 if e.status == 422 else e.status, e.message) from None
        out = await _guarded(request, server.translate(texts, None, None, None), limits.timeout_s)
        result = {"translatedText": out[0] if isinstance(body.q, str) else out}
        if body.source == "auto":  # no detection: this model reads one language
            result["detectedLanguage"] = {"language": t.src, "confidence": 0.0}
        return result

    return app
