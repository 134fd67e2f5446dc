"""Errors as every endpoint answers them: OpenAI's error JSON,

    {"error": {"message": "...", "type": "BadRequestError", "param": null, "code": 400}}

with the HTTP status in `code`. Endpoints raise APIError (or let ValueError through, which the
app turns into a 400); nothing a client sends may surface as a 500 or a dropped connection.

Megatron's routes (`PUT /api`, `POST /completions`) add Megatron's own top-level `message` beside
the `error` object: Megatron's client (tools/text_generation_cli.py) prints
`response.json()["message"]` for any status but 200."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    422: "BadRequestError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


MEGATRON_PATHS = frozenset({"/api", "/completions"})


def error_body(status: int, message: str, param: str | None = None,
               megatron: bool = False) -> dict:
    kind = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    if megatron:
        body["message"] = message
    return body


def error_response(status: int, message: str, param: str | None = None, *, path: str = "",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error as a response to a request for `path` (Megatron's get `message` too); headers:
    any the status needs (Allow for a 405, WWW-Authenticate for a 401)."""
    return JSONResponse(error_body(status, message, param, path in MEGATRON_PATHS),
                        status_code=status, headers=headers)
