"""The chat page at GET /: static files shipped in the package (server/ui/), nothing fetched from
anywhere else. The page talks to the server's own /v1/models and /v1/chat/completions (see
ui/chat.js); this module only serves its files.

The page and its files need no API key (they hold no secrets, and a browser cannot send a Bearer
header when it opens a URL); with --api-key the page asks for the key and sends it on its API
calls. Every file is sent with a Content-Security-Policy that lets the page load and connect to
this server alone (so a model's output, rendered as markdown, cannot fetch or run anything), and
an ETag, so a reload costs a 304.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from fastapi import FastAPI, Request, Response

PAGE = "index.html"
ASSETS = {"chat.js": "text/javascript", "markdown.js": "text/javascript", "chat.css": "text/css"}
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")
PATHS = ("/", *(f"/ui/{name}" for name in ASSETS))  # what the API key does not guard


class _File:
    def __init__(self, name: str, media_type: str):
        self.content = resources.files(__package__).joinpath("ui", name).read_bytes()
        self.media_type = f"{media_type}; charset=utf-8"
        self.etag = f'"{hashlib.sha256(self.content).hexdigest()[:32]}"'

    async def response(self, request: Request) -> Response:
        headers = {"ETag": self.etag, "Cache-Control": "no-cache",
                   "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                   "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        content = b"" if request.method == "HEAD" else self.content
        return Response(content, media_type=self.media_type, headers=headers)


def install(app: FastAPI) -> None:
    """Adds GET / (the page) and GET /ui/<file> (its script and style sheet) to app. The files
    are read now: a broken install fails at start-up, not on the first visit."""
    files = {"/": _File(PAGE, "text/html"),
             **{f"/ui/{name}": _File(name, kind) for name, kind in ASSETS.items()}}

    for path, file in files.items():
        app.add_api_route(path, file.response, methods=["GET", "HEAD"], include_in_schema=False)
