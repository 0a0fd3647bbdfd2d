"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`, and the handlers that emit them.

Client mistakes are 4xx; a dead engine is 503; only a bug in the server itself is a 500.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distrt.executor.base import EngineDeadError

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


_FIELD = re.compile(r"SamplingParams\.(\w+)")


def from_value_error(e: ValueError, param: str | None = None, renames: dict[str, str] | None = None) -> APIError:
    """The engine raises ValueError naming the bad field (`SamplingParams.top_p must be ...`)."""
    m = _FIELD.search(str(e))
    if m is not None:
        param = (renames or {}).get(m.group(1), m.group(1))
    return APIError(400, str(e), param=param, code="invalid_value")


def engine_dead(e: BaseException | None = None) -> APIError:
    return APIError(503, f"the engine is not serving requests: {e}" if e else "the engine is not serving requests",
                    code="engine_unavailable")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body", code="invalid_request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return APIError(400, msg, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        headers = dict(exc.headers) if exc.headers else None
        return APIError(exc.status_code, str(exc.detail), code=code).response(headers=headers)

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:  # the engine's input validation
        return from_value_error(exc).response()

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return engine_dead(exc).response()

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in a request")
        return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()
