"""The HTTP face of the model service: seed 000's endpoints and envelopes, and nothing else.

``create_app(settings)`` builds the app; its lifespan loads the model on the model's one worker thread
(``/health`` answers 503 ``MODEL_NOT_LOADED`` until then, and for good if loading failed). Handlers parse,
check, hand the items to the ``Batcher`` and wrap the answer; every answer, refusals included, is an envelope
with a ``timestamp`` and the ``request_id`` (the ``X-Request-ID`` the client sent, else a new UUID, echoed
as a header). ``ServiceError``s map to their code and status in one handler; anything unexpected is a 500
``INTERNAL_ERROR`` envelope. Bodies are read up to ``MODEL_MAX_BODY_BYTES`` (413 ``INVALID_REQUEST`` past it)
and parsed by the handlers themselves (``schemas.parse``), so FastAPI's 422 never reaches a client.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelserver.backends import Item
from modelserver.config import Settings
from modelserver.errors import BodyTooLarge, InternalError, InvalidRequest, ServiceError
from modelserver.metrics import human, memory_bytes
from modelserver.schemas import BatchRequest, PredictRequest, check_batch_length, parse, to_items
from modelserver.service import ModelService

log = logging.getLogger("modelserver")

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(status: int, body: dict[str, Any]) -> Response:
    # orjson: a batch's answer is encoded in a twentieth of the standard library's time, on the event loop.
    return Response(orjson.dumps(body), status, media_type="application/json")


def ok(request: Request, message: str, data: Any) -> Response:
    return _json(200, {"success": True, "message": message, "data": data, "timestamp": timestamp(),
                       "request_id": request.state.request_id})


def refusal(request_id: str, status: int, code: str, message: str, details: Any) -> Response:
    return _json(status, {"success": False, "message": message, "error": {"code": code, "details": details},
                          "timestamp": timestamp(), "request_id": request_id})


class RequestIdMiddleware:
    """Gives each request its id (``scope["state"]["request_id"]``) and echoes it as ``X-Request-ID``; an
    exception nothing else handled becomes an ``INTERNAL_ERROR`` envelope here, so it carries the id too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _REQUEST_ID.match(sent) else str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            if started:
                raise
            response = refusal(request_id, 500, InternalError.code, InternalError.message, "unexpected server error")
            await response(scope, receive, send_with_id)


async def _body(request: Request, limit: int) -> Any:
    """The body's JSON, read no further than ``limit`` bytes (``BodyTooLarge`` past them)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the body has {declared} bytes; at most {limit} (MODEL_MAX_BODY_BYTES)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body is over {limit} bytes (MODEL_MAX_BODY_BYTES)")
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        # orjson refuses more than 1,024 levels of nesting (as it refuses NaN and invalid UTF-8).
        reason = "it nests too deeply" if "depth limit" in str(exc) else str(exc)
        raise InvalidRequest(f"the body is not valid JSON: {reason}") from None


def _gpu_utilization() -> float | None:
    if not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.utilization() / 100
    except Exception:  # needs pynvml, which the image may lack
        return None


def create_app(settings: Settings | None = None) -> FastAPI:
    service = ModelService(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(service.load())
        yield
        loading.cancel()
        await service.close()

    app = FastAPI(title="modelserver", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return refusal(request.state.request_id, exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = InvalidRequest.code if exc.status_code < 500 else InternalError.code
        return refusal(request.state.request_id, exc.status_code, code, str(exc.detail), f"{request.method} "
                       f"{request.url.path}: {exc.detail}")

    @app.get("/health")
    async def health(request: Request) -> Response:
        loaded = service.ready()
        return ok(request, "Service is healthy", {
            "status": "healthy", "model": loaded.config.name, "version": loaded.config.version,
            "uptime": round(time.monotonic() - service.started, 3), "gpu_available": torch.cuda.is_available(),
            "memory_usage": human(memory_bytes()), "device": loaded.backend.device.type})

    @app.get("/model/info")
    async def model_info(request: Request) -> Response:
        loaded = service.ready()
        config = loaded.config
        data = config.model_dump(mode="json", include={
            "name", "model_type", "version", "description", "tasks", "input_format", "output_format",
            "max_sequence_length", "supported_species", "alphabet", "batching", "limits", "architecture"})
        data["device"] = loaded.backend.device.type
        data["weights"] = {"file": config.weights.file, "seed": config.weights.seed,
                           "sha256": loaded.backend.weights_sha256}
        data["probe"] = config.probe.model_dump(mode="json") if config.probe else None
        return ok(request, "Model information", data)

    def _task_label(task: Any) -> str:
        """A bounded label: the model's tasks, or ``unknown``."""
        if service.loaded is None:
            return "unknown"
        if task is None:
            return service.loaded.config.tasks[0]
        return task if task in service.loaded.config.tasks else "unknown"

    async def infer(request: Request, endpoint: str) -> tuple[list[Item], list[dict[str, Any]], float]:
        """The checked items of a ``/predict`` or ``/predict/batch`` request, their answers and when it began;
        the request counted in the metrics whatever happens."""
        began = time.perf_counter()
        task: Any = None
        outcome, count = "failed", 0
        try:
            loaded = service.ready()
            raw = await _body(request, service.settings.model_max_body_bytes)
            body: PredictRequest | BatchRequest
            if endpoint == "/predict/batch":
                check_batch_length(raw, loaded.config.limits.max_batch_sequences)
                body = parse(BatchRequest, raw)
            else:
                body = parse(PredictRequest, raw)
            task = body.task_type
            if isinstance(body, BatchRequest):
                items = to_items(body.sequences, body.task_type, body.options, loaded.config, batch=True)
            else:
                items = to_items([body.sequence], body.task_type, body.options, loaded.config)
            count = len(items)
            answers = await service.answer(loaded, items)
            outcome = "success"
        except ServiceError as exc:
            outcome = "invalid" if exc.status < 500 else "failed"
            raise
        finally:
            service.metrics.observe_request(endpoint, _task_label(task), outcome, time.perf_counter() - began, count)
        return items, answers, began

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        items, answers, began = await infer(request, "/predict")
        answer = answers[0]
        return ok(request, "Prediction complete", {
            "prediction": answer["prediction"], "confidence": answer["confidence"],
            "processing_time": round(time.perf_counter() - began, 6), "sequence_length": len(items[0].sequence),
            "details": answer["details"]})

    @app.post("/predict/batch")
    async def predict_batch(request: Request) -> Response:
        items, answers, began = await infer(request, "/predict/batch")
        predictions = [{"sequence": item.sequence, "prediction": a["prediction"], "confidence": a["confidence"],
                        "sequence_length": len(item.sequence), "details": a["details"]}
                       for item, a in zip(items, answers, strict=True)]
        return ok(request, "Batch prediction complete", {
            "predictions": predictions, "processing_time": round(time.perf_counter() - began, 6),
            "total_sequences": len(predictions)})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if "application/json" in request.headers.get("accept", ""):
            return ok(request, "Metrics", service.metrics.summary(service.settings.model_dir, _gpu_utilization()))
        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app
