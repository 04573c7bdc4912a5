"""Request bodies in, errors out: what every route of the server shares.

A body is read under two bounds before anything parses it: its size (from Content-Length
and while reading) and the time it takes to arrive. A client that sends half a body and
stalls gets 408 and its connection closed when the time is up, so it holds no task or
memory of the server for longer. Errors come back in OpenAI's shape {"error": {"message",
"type", "param", "code"}}, naming the offending field.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from lmforge.serve import protocol

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(protocol.error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "invalid Content-Length header")
        if int(length) > limit:
            raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise APIError(499, "client disconnected while sending the request") from None
    return bytes(body)


async def read_json(request: Request, limit: int, timeout: float) -> dict[str, Any]:
    """The body as a JSON object: 413 past `limit` bytes (before parsing), 408 when it has
    not all arrived within `timeout` seconds (the connection is then closed), 400 if malformed."""
    try:
        body = await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    if not body:
        raise APIError(400, "request body is empty: send a JSON object")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"malformed JSON body: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the JSON body must be an object, got {type(data).__name__}")
    return data


def validate(schema: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate a body; the first problem becomes a 400 naming its field."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        path = [str(p) for p in err["loc"] if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)]
        where = ".".join(path)
        message = err["msg"].removeprefix("Value error, ")
        if not where:  # a check across fields: its message starts with the field it is about
            first = re.match(r"\w+", message)
            where = first.group(0) if first and first.group(0) in schema.model_fields else ""
        elif not message.startswith(path[0]):
            message = f"{where}: {message}"
        raise APIError(400, message, param=where or None) from None
