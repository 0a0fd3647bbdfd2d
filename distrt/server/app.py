"""build_app: the FastAPI application (routes, error handlers, the gate) over a ServerContext."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse, Response

from distrt import __version__
from distrt.server import chat, completions, debug
from distrt.server.context import ServerContext, get_context
from distrt.server.errors import APIError, install_error_handlers
from distrt.server.gate import Gate
from distrt.server.prometheus import CONTENT_TYPE

ops = APIRouter()


def _model_card(ctx: ServerContext) -> dict[str, Any]:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "distrt",
            "root": ctx.engine.engine.config.model.path, "max_model_len": ctx.engine.max_model_len}


@ops.get("/v1/models")
async def list_models(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(ctx)]}


@ops.get("/v1/models/{model:path}")
async def get_model(model: str, ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    ctx.check_model(model)
    return _model_card(ctx)


@ops.get("/health")
async def health(ctx: ServerContext = Depends(get_context)) -> Response:
    if ctx.engine.is_dead:
        return APIError(503, f"the engine is dead: {ctx.engine.dead_error}", code="engine_dead").response()
    if ctx.gate.draining:
        return APIError(503, "the server is shutting down", code="server_draining").response()
    return JSONResponse({"status": "ok"})


@ops.get("/metrics")
async def metrics(ctx: ServerContext = Depends(get_context)) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)


@ops.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


def build_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="distrt OpenAI-compatible server", version=__version__)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(ops)
    app.include_router(completions.router)
    app.include_router(chat.router)
    if ctx.settings.enable_debug_routes:
        app.include_router(debug.router)
    s = ctx.settings
    app.add_middleware(Gate, state=ctx.gate, api_key=s.api_key, max_request_bytes=s.max_request_bytes,
                       max_concurrent_requests=s.max_concurrent_requests)
    return app
