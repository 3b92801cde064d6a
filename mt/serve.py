"""mt-serve: a translation server for one model, or one ensemble of models (FastAPI + uvicorn).

    mt-serve --model RUN/checkpoints/best.pt                    # http://127.0.0.1:8000, API docs at /docs
    mt-serve --model CKPT_A --model CKPT_B                      # an ensemble (mt/ensemble.py)
    python -m mt.serve --model CKPT --host 0.0.0.0 --port 8080 --api-key SECRET
    curl -s localhost:8000/translate -d '{"text": ["Ein Hund rennt.", ""], "beam": 5}'

Endpoints (docs/serving.md has the whole contract):
    GET  /health      {"status": "ok"}, never behind the API key (for load balancers and probes)
    GET  /info        languages, decoding defaults, training step, validation scores and their
                      sacreBLEU signatures, parameter count, device, limits, batching counters
    POST /translate   {"text": "..." | [...], "beam"?, "length_penalty"?, "nbest"?, "align"?, "attention"?}
                      -> {"translations": [{"text", "score", "nbest"?, "alignment"?, "attention"?}, ...]}
    GET  /docs        the OpenAPI page; files in mt/static/ (if any) are served from /

Every error is a JSON object {"error": "one line"}: 400 for a body that is not UTF-8 or not
JSON, 422 for a request of the wrong shape, 413 over --max-lines / --max-chars, 401 without the
API key, 503 (with Retry-After) when --queue-size requests already wait, 500 when decoding
fails; the server goes on serving after each. Requests are decoded on one worker thread with
dynamic batching (mt/batcher.py). SIGTERM / SIGINT finish the requests in flight, then exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from starlette.exceptions import HTTPException

from .batcher import Batcher, Closed, QueueFull, Settings
from .errors import MTError, first_line
from .search import parse_length_penalty
from .translate import add_combine_arg, add_device_args, describe_models
from .translator import CHECKPOINT, Translator, is_checkpoint_default

log = logging.getLogger("mt.serve")

STATIC_DIR = Path(__file__).with_name("static")  # the web page's files, served from / when present
EOS_PIECE = "</s>"  # the label of the end-of-sentence row and column in "attention" (as in plot_attention)


# ----------------------------------------------------------------------------- loading
def load_model(
    source: str | list[str],
    device: str = "auto",
    cuda_graphs: str = "auto",
    revision: str | None = None,
    combine: str = "logprob",
) -> tuple[Translator, dict[str, Any]]:
    """--model -> (the Translator, {"step", "metrics"} of the training run, where known): a
    checkpoint file, a model folder written by mt-export, or a Hugging Face model id; a list of
    several: an ensemble of them (its step and metrics: the first model's)."""
    translator = Translator.load(source, revision=revision, device=device, cuda_graphs=cuda_graphs, combine=combine)
    metrics = translator.training.get("metrics") or {}
    return translator, {
        "step": translator.training.get("step"),
        "metrics": {k: _json_value(v) for k, v in metrics.items() if isinstance(v, (int, float, str))},
    }


# ----------------------------------------------------------------------------- the API's shapes
@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how the decoding worker batches requests."""

    max_lines: int = 100
    max_chars: int = 20_000
    max_beam: int = 16
    max_batch_sentences: int = 64
    batch_window_ms: float = 5.0
    queue_size: int = 64

    @property
    def max_body_bytes(self) -> int:
        # A request within max_chars can take 12 bytes per character as JSON ("\ud83d\ude00" is
        # one emoji), plus quotes and commas per line and room for the other fields.
        return 12 * self.max_chars + 4 * self.max_lines + 65536

    def check(self) -> None:
        for name in ("max_lines", "max_chars", "max_beam", "max_batch_sentences", "queue_size"):
            if getattr(self, name) < 1:
                raise MTError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.batch_window_ms <= 10_000:
            raise MTError(f"--batch-window-ms must be between 0 and 10000 (got {self.batch_window_ms})")


def _text(value: Any) -> Any:
    """A string or a list of strings, each encodable as UTF-8 (JSON allows lone surrogates, which
    SentencePiece would fail on inside the worker)."""
    lines = [value] if isinstance(value, str) else value
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise ValueError("text must be a string or a list of strings")
    for i, line in enumerate(lines):
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"text line {i} holds a lone UTF-16 surrogate") from None
    return value


def _length_penalty(value: Any) -> Any:
    """What the CLI's --length-penalty accepts: a number, "avg", "none", "checkpoint", or null."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
        raise ValueError("length_penalty must be a number, 'avg', 'none', 'checkpoint' or null")
    if not is_checkpoint_default(value):
        try:
            parse_length_penalty(value)
        except MTError as e:
            raise ValueError(str(e)) from None
    return value


class TranslateRequest(BaseModel):
    """A /translate request. Unknown fields are refused, so a misspelt option is never ignored."""

    model_config = ConfigDict(extra="forbid")

    text: Annotated[str | list[str], BeforeValidator(_text)] = Field(
        description="one sentence, or a list of them (one per line); each gives one translation, "
        "an empty or blank one an empty translation"
    )
    beam: StrictInt | None = Field(
        None, ge=1, description="beam size (1 = greedy with no length penalty); default: the model's"
    )
    length_penalty: Annotated[float | str | None, BeforeValidator(_length_penalty)] = Field(
        CHECKPOINT,
        description="GNMT alpha (number), 'avg' (score / length), null or 'none' (raw log-probability), "
        "'checkpoint' (the model's default)",
    )
    nbest: StrictInt | None = Field(
        None, ge=1, description="return the N best hypotheses per line (at most the beam size)"
    )
    align: StrictBool = Field(False, description="return [source piece, output piece] alignment pairs")
    attention: StrictBool = Field(False, description="return the attention weights with their pieces")


class Alternative(BaseModel):
    text: str
    score: float | None = Field(description="log-probability / length penalty; higher is better")


class AttentionWeights(BaseModel):
    source: list[str] = Field(description="source pieces, then </s>")
    target: list[str] = Field(description="output pieces, then </s> when the hypothesis ended with it")
    weights: list[list[float]] = Field(description="len(target) rows of len(source) weights")


class Translation(BaseModel):
    text: str
    score: float | None
    nbest: list[Alternative] | None = Field(None, description="with nbest: the N best, best first")
    alignment: list[tuple[int, int]] | None = Field(
        None,
        description="with align: [source, output] piece positions, 0-based: for each output piece "
        "the source piece with the most attention (source </s> excluded)",
    )
    attention: AttentionWeights | None = None


class TranslateResponse(BaseModel):
    translations: list[Translation] = Field(description="one per input line, in input order")


class ErrorResponse(BaseModel):
    error: str


_ERRORS = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in (
        (400, "the body is not UTF-8 or not JSON"),
        (401, "missing or wrong API key"),
        (413, "more lines or characters than the server's limits"),
        (422, "wrong field types, unknown fields, beam or nbest out of range"),
        (500, "decoding failed"),
        (503, "too many requests waiting (see Retry-After), or shutting down"),
    )
}


# ----------------------------------------------------------------------------- helpers
def _json_value(x: Any) -> Any:
    """JSON has no NaN or infinity: such a number becomes null."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n")).replace("\r", " ").strip() or "error"


def _invalid(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "invalid request: " + "; ".join(parts)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (never read whole into memory)."""
    declared = request.headers.get("content-length", "")
    too_big = HTTPException(413, f"request body over {limit} bytes (the limit follows --max-chars)")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_request(body: bytes) -> TranslateRequest:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPException(
            400, f"the body is not valid UTF-8: byte 0x{body[e.start]:02x} at offset {e.start}"
        ) from None
    if not text.strip():
        raise HTTPException(400, 'empty body: send a JSON object such as {"text": "..."}')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    try:
        return TranslateRequest.model_validate(data)
    except ValidationError as e:
        raise HTTPException(422, _invalid(e)) from None


def _attention(hyp) -> dict[str, Any]:
    """The best hypothesis' attention with the pieces that label its rows and columns."""
    if hyp.attention.numel() == 0:  # an empty line: nothing was decoded
        return {"source": [], "target": [], "weights": []}
    source = hyp.src_tokens + [EOS_PIECE]
    target = (hyp.tokens + [EOS_PIECE])[: hyp.attention.shape[0]]
    return {"source": source, "target": target, "weights": hyp.attention[: len(target), : len(source)].tolist()}


def _translation(hyps: list, req: TranslateRequest) -> dict[str, Any]:
    best = hyps[0]
    out: dict[str, Any] = {"text": best.text, "score": _json_value(float(best.score))}
    if req.nbest is not None:
        out["nbest"] = [{"text": h.text, "score": _json_value(float(h.score))} for h in hyps]
    if req.align:
        out["alignment"] = [list(pair) for pair in best.alignment()]
    if req.attention:
        out["attention"] = _attention(best)
    return out


class APIKeyCheck(HTTPBearer):
    """Dependency: the request must carry `Authorization: Bearer KEY` (and /docs gets an
    Authorize button for it, as an HTTPBearer)."""

    def __init__(self, key: str):
        super().__init__(auto_error=False, scheme_name="APIKey", description="the server's --api-key (or MT_API_KEY)")
        self._key = key.encode()

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        cred = await super().__call__(request)
        # compare_digest: the time taken must not tell how much of a guessed key was right
        if cred is None or not hmac.compare_digest(cred.credentials.encode(), self._key):
            raise HTTPException(
                401, "missing or wrong API key: send 'Authorization: Bearer KEY'", {"WWW-Authenticate": "Bearer"}
            )


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": _one_line(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return JSONResponse({"error": _one_line("invalid request: " + "; ".join(parts))}, status_code=422)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed: %s", request.method, request.url.path, first_line(exc), exc_info=exc)
    return JSONResponse({"error": _one_line(f"internal error: {first_line(exc)}")}, status_code=500)


def _checked_lines(req: TranslateRequest, translator: Translator, limits: Limits) -> tuple[list[str], Settings]:
    """The request's lines and decoding settings, or the 413/422 its limits call for."""
    lines = [req.text] if isinstance(req.text, str) else list(req.text)
    if len(lines) > limits.max_lines:
        raise HTTPException(413, f"{len(lines)} lines: the limit is {limits.max_lines} lines per request (--max-lines)")
    chars = sum(len(line) for line in lines)
    if chars > limits.max_chars:
        raise HTTPException(
            413, f"{chars} characters: the limit is {limits.max_chars} characters per request (--max-chars)"
        )
    max_beam = max(limits.max_beam, translator.decoding()[0])  # the model's own default is always allowed
    if req.beam is not None and req.beam > max_beam:
        raise HTTPException(422, f"beam must be between 1 and {max_beam} (--max-beam); got {req.beam}")
    beam, lp = translator.decoding(req.beam, req.length_penalty)
    nbest = req.nbest or 1
    if nbest > beam:
        raise HTTPException(422, f"nbest must be between 1 and the beam size {beam}; got {nbest}")
    # A line is one segment, as in the CLI's input: line breaks inside it are spaces.
    lines = [line.replace("\r\n", " ").replace("\n", " ").replace("\r", " ") for line in lines]
    return lines, Settings(beam, lp, nbest)


def _about(translator: Translator, limits: Limits, model_name: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """What /info says of the model, its training and the server's limits (all fixed while serving)."""
    beam, length_penalty = translator.decoding()
    return {
        "model": model_name,
        "languages": {"src": translator.src_lang, "tgt": translator.tgt_lang},
        "decoding": {"beam": beam, "length_penalty": length_penalty},
        "step": metadata.get("step"),
        "validation": metadata.get("metrics", {}),
        "parameters": sum(p.numel() for p in translator.model.parameters()),
        "device": str(translator.device),
        "cell": translator.config.model.cell,
        "cuda_graphs": translator.graphs is not None,
        # an ensemble: how it combines its models and each model's source, step, size and cell
        "ensemble": None
        if translator.members is None
        else {
            "combine": translator.model.combine,
            "models": [
                {
                    "model": m["model"],
                    "step": m["step"],
                    "parameters": m["parameters"],
                    "cell": m["cell"],
                    "validation": {
                        k: _json_value(v) for k, v in m["metrics"].items() if isinstance(v, (int, float, str))
                    },
                }
                for m in translator.members
            ],
        },
        "max_source_pieces": translator.max_src_len,
        "limits": asdict(limits),
    }


# ----------------------------------------------------------------------------- the app
def create_app(
    translator: Translator,
    *,
    limits: Limits | None = None,
    api_key: str | None = None,
    model_name: str = "",
    metadata: dict[str, Any] | None = None,
    static_dir: str | os.PathLike | None = STATIC_DIR,
) -> FastAPI:
    """The FastAPI app serving `translator`. Its decoding worker starts and stops with the app's
    lifespan (uvicorn, or `with TestClient(app)`); `app.state.batcher` is the Batcher."""
    limits = limits or Limits()
    limits.check()
    about = _about(translator, limits, model_name, metadata or {})

    def decode(lines: list[str], settings: Settings) -> list[list]:
        # Looked up at each call, so the translator can be swapped or patched while serving.
        out = translator.translate(
            lines,
            beam=settings.beam,
            length_penalty=settings.length_penalty,
            nbest=settings.nbest,
            batch_size=limits.max_batch_sentences,
        )
        return out if settings.nbest > 1 else [[h] for h in out]

    batcher = Batcher(
        decode,
        max_batch_sentences=limits.max_batch_sentences,
        window_ms=limits.batch_window_ms,
        queue_size=limits.queue_size,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:  # uvicorn gets here after the requests in flight are answered
            await asyncio.to_thread(batcher.close)

    app = FastAPI(
        title="mt translation server",
        summary=f"{translator.src_lang} -> {translator.tgt_lang} with an LSTM encoder-decoder",
        description="Translate text with one mt model. Requests that arrive together are decoded "
        "together. Errors are JSON objects with one field, `error`, holding one line.",
        version="1",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.translator = translator
    app.state.limits = limits

    auth = [Depends(APIKeyCheck(api_key))] if api_key else []

    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.get("/health", summary="Liveness: 200 while the server runs (no API key needed)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info", summary="The model, its decoding defaults, training scores, limits", dependencies=auth)
    async def info() -> dict[str, Any]:
        return {**about, "batching": batcher.snapshot()}

    @app.post(
        "/translate",
        summary="Translate one sentence or a list of them",
        response_model=TranslateResponse,
        response_model_exclude_none=True,
        dependencies=auth,
        responses=_ERRORS,
        # The body is read and checked by hand (byte limit, UTF-8, JSON, then the model), so the
        # page at /docs is told its schema here.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": TranslateRequest.model_json_schema()}},
            }
        },
    )
    async def translate(request: Request) -> dict[str, Any]:
        req = _parse_request(await _read_body(request, limits.max_body_bytes))
        lines, settings = _checked_lines(req, translator, limits)
        if not lines:
            return {"translations": []}
        batcher.start()  # normally done by the lifespan; here too for a server run without one
        try:
            future = batcher.submit(lines, settings)
        except QueueFull as e:
            raise HTTPException(503, f"server busy: {e}; retry later", {"Retry-After": "1"}) from None
        except Closed:
            raise HTTPException(503, "the server is shutting down", {"Retry-After": "5"}) from None
        try:
            results = await asyncio.wrap_future(future)
        except Exception as e:  # the batcher logged it; this request fails, the server goes on
            raise HTTPException(500, f"decoding failed: {first_line(e)}") from None
        return {"translations": [_translation(hyps, req) for hyps in results]}

    if static_dir is not None and Path(static_dir).is_dir():
        from fastapi.responses import FileResponse
        from fastapi.staticfiles import StaticFiles

        index = Path(static_dir) / "index.html"
        if index.is_file():

            @app.get("/", include_in_schema=False)
            async def page() -> FileResponse:
                return FileResponse(index)

        # under /static, not /: a mount at / would answer GET /translate with 404, not 405
        app.mount("/static", StaticFiles(directory=static_dir), name="static")
    return app


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Limits()
    p = argparse.ArgumentParser(
        prog="mt-serve",
        description="Serve one mt model over HTTP: POST /translate, GET /info, GET /health, API docs at /docs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        "-m",
        required=True,
        action="append",
        help="the model: a checkpoint file (e.g. RUN/checkpoints/best.pt), a folder written by mt-export, "
        "or a Hugging Face model id USER/NAME; give it again to serve an ensemble of the models (same tokenizer)",
    )
    add_combine_arg(p)
    p.add_argument("--revision", default=None, help="with a Hugging Face model id: branch, tag or commit")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    add_device_args(p, cell=False)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /translate and /info (default: $MT_API_KEY; "
        "prefer the variable: arguments show in ps)",
    )
    p.add_argument("--max-lines", type=int, default=d.max_lines, help="lines per request")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="characters per request, all lines together")
    p.add_argument("--max-beam", type=int, default=d.max_beam, help="largest beam a request may ask for")
    p.add_argument(
        "--max-batch-sentences", type=int, default=d.max_batch_sentences, help="sentences decoded together at most"
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=d.batch_window_ms,
        help="how long a request waits for others to share its batch",
    )
    p.add_argument(
        "--queue-size", type=int, default=d.queue_size, help="requests that may wait; more are refused with 503"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for decoding (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound here rather than by uvicorn so that a port in use
    is one `error:` line before the model loads (uvicorn would log it and exit with status 1)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, OverflowError) as e:
        raise MTError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # as uvicorn does: a restarted server can take the port while old connections linger in
        # TIME_WAIT (a live listener still refuses it on Linux)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise MTError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s:     %(message)s")
    logging.getLogger("mt").setLevel(level)
    api_key = args.api_key if args.api_key is not None else os.environ.get("MT_API_KEY")
    try:
        if api_key is not None and not api_key.strip():  # an empty key must not turn the check off
            raise MTError("the API key (--api-key or MT_API_KEY) is empty; give one or leave both unset")
        if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
            raise MTError("the API key must be printable ASCII: it travels in an HTTP header")
        limits = Limits(
            max_lines=args.max_lines,
            max_chars=args.max_chars,
            max_beam=args.max_beam,
            max_batch_sentences=args.max_batch_sentences,
            batch_window_ms=args.batch_window_ms,
            queue_size=args.queue_size,
        )
        limits.check()
        if not 0 <= args.port <= 65535:
            raise MTError(f"--port must be between 0 and 65535 (got {args.port})")
        if args.threads is not None and args.threads < 1:
            raise MTError(f"--threads must be >= 1 (got {args.threads})")
        sock = bind_socket(args.host, args.port)
        try:
            t0 = time.perf_counter()
            translator, metadata = load_model(
                args.model,
                device=args.device,
                cuda_graphs=args.cuda_graphs,
                revision=args.revision,
                combine=args.ensemble_combine,
            )
        except BaseException:
            sock.close()
            raise
    except MTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    import uvicorn

    name = args.model[0] if len(args.model) == 1 else " + ".join(args.model)
    app = create_app(translator, limits=limits, api_key=api_key or None, model_name=name, metadata=metadata)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    log.info(
        "%s: %s -> %s on %s, loaded in %.1f s; beam %d, length penalty %s",
        describe_models(args.model, args.ensemble_combine),
        translator.src_lang,
        translator.tgt_lang,
        translator.device,
        time.perf_counter() - t0,
        *translator.decoding(),
    )
    log.info("serving on http://%s:%d (API docs at /docs); Ctrl-C or SIGTERM to stop", url_host, port)
    if not api_key and not _is_loopback(host):
        log.warning("listening on %s without an API key: anyone who can reach the port can use the model", host)

    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=None))
    # uvicorn handles SIGTERM / SIGINT itself (stop accepting, answer the requests in flight, run
    # the lifespan's shutdown, which drains the decoding queue) and then raises the signal again
    # for the handlers it found. Handlers that ignore it make that re-raise end in a normal exit,
    # status 0, instead of death by SIGTERM or a KeyboardInterrupt traceback.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = (
        {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
