"""The editor's web server: Starlette on uvicorn, on the loopback address only.

Every request must carry the session's token (the printed URL's `?token=`, or the X-Multidiff-Token header
the page sends) and a Host header naming the address it serves: another site's page cannot reach it, not
even through a DNS name rebound to 127.0.0.1. Nothing but one-line messages reaches the page: no traceback."""
from __future__ import annotations

import asyncio
import hmac
import json
import socket
from importlib import resources
from typing import Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import MultidiffError
from .files import MAX_UPLOAD_BYTES, Refused
from .session import Editor

HOST = "127.0.0.1"
TOKEN_HEADER = "x-multidiff-token"
POLL_S = 0.5  # how often an open page's stream looks at the scene file for changes made elsewhere
KEEPALIVE_S = 15.0
STATIC = {"editor.js": "text/javascript", "editor.css": "text/css"}
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "referrer-policy": "no-referrer",  # the token is in the URL: never send it on
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


class Guard:
    """ASGI middleware: the Host header and the session token, checked on every request before any route."""

    def __init__(self, app, token: str, hosts: set[str]):
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if headers.get("host") not in self.hosts:
            return await _refusal(403, "refused: this editor answers requests for its own address only "
                                       f"({sorted(self.hosts)[0]})")(scope, receive, send)
        given = headers.get(TOKEN_HEADER) or QueryParams(scope.get("query_string", b"").decode("latin-1")).get("token")
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            return await _refusal(403, "refused: open the editor with the URL multidiff edit printed "
                                       "(its token is missing or wrong)")(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                   *((k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items())]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _refusal(status: int, text: str) -> Response:
    return PlainTextResponse(text + "\n", status_code=status)


def allowed_hosts(port: int) -> set[str]:
    return {f"{HOST}:{port}", f"localhost:{port}"} | ({HOST, "localhost"} if port == 80 else set())


def create_app(editor: Editor, token: str, port: int, tell: Callable[[str], None] | None = None,
               closing: Callable[[], bool] = lambda: False) -> Guard:
    """The editor's ASGI app for `editor`, answering on 127.0.0.1:`port` with `token`. closing(): true once
    the server stops (Ctrl-C), so open event streams end rather than hold it up."""
    tell = tell or (lambda _line: None)

    async def page(request: Request) -> Response:
        html = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
        return Response(html.replace("{{token}}", token), media_type="text/html; charset=utf-8")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return _refusal(404, "not found")
        return Response(resources.files(__package__).joinpath(f"static/{name}").read_bytes(), media_type=STATIC[name])

    async def get_scene(request: Request) -> Response:
        await run_in_threadpool(editor.refresh)
        return JSONResponse(await run_in_threadpool(editor.snapshot))

    async def put_scene(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return JSONResponse({"ok": False, "problems": [{"message": "the request is not JSON"}]}, 400)
        if not isinstance(body, dict):
            return JSONResponse({"ok": False, "problems": [{"message": "the request is a JSON object"}]}, 400)
        status, answer = await run_in_threadpool(editor.change, body.get("base"), body.get("scene"),
                                                 body.get("regions_from"))
        return JSONResponse(answer, status)

    async def events(request: Request) -> Response:
        """Server-sent events: the preview's pictures, files changed on disk, the full render's progress.
        ?until=final,cancelled,... ends the stream after the first event of one of those kinds, ?seconds=N after
        N seconds (for scripts and tests)."""
        until = set(filter(None, request.query_params.get("until", "").split(",")))
        try:
            seconds = float(request.query_params.get("seconds", "inf"))
        except ValueError:
            return _refusal(400, "seconds: a number")
        queue = editor.broker.subscribe()

        async def stream():
            try:
                waited, ends = 0.0, asyncio.get_running_loop().time() + seconds
                yield ": multidiff edit\n\n"
                while asyncio.get_running_loop().time() < ends and not closing():
                    try:
                        event = await asyncio.wait_for(queue.get(), POLL_S)
                    except asyncio.TimeoutError:
                        waited += POLL_S
                        await run_in_threadpool(editor.refresh)
                        if waited >= KEEPALIVE_S:
                            waited = 0.0
                            yield ": keep-alive\n\n"
                        continue
                    yield f"event: {event['kind']}\ndata: {json.dumps(event)}\n\n"
                    if event["kind"] in until:
                        return
            finally:
                editor.broker.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    async def overlay(request: Request) -> Response:
        try:
            return Response(editor.overlay(int(request.path_params["index"])), media_type="image/png")
        except Refused as exc:
            return _refusal(404, str(exc))

    async def picture(request: Request) -> Response:
        try:
            data = await run_in_threadpool(editor.picture, request.query_params.get("path", ""))
        except (Refused, MultidiffError) as exc:  # outside the folder; a file Pillow refuses
            return _refusal(403 if isinstance(exc, Refused) else 404, str(exc))
        return Response(data, media_type="image/png")

    async def upload(request: Request) -> Response:
        size = request.headers.get("content-length")
        if size is None or not size.isdigit() or int(size) > MAX_UPLOAD_BYTES:
            return JSONResponse({"ok": False, "message": f"an upload is at most {MAX_UPLOAD_BYTES // 2**20} MiB, "
                                                         "with its length given"}, 413)
        data = await request.body()
        try:
            name = await run_in_threadpool(editor.upload, request.query_params.get("kind", ""),
                                           request.query_params.get("name", ""), data)
        except Refused as exc:
            return JSONResponse({"ok": False, "message": str(exc)}, 422)
        tell(f"saved {name} below {editor.folder}")
        return JSONResponse({"ok": True, "path": name})

    async def render(request: Request) -> Response:
        editor.previewer.request_render()
        return JSONResponse({"ok": True})

    async def failed(request: Request, exc: Exception) -> Response:
        tell(f"the editor failed on {request.method} {request.url.path}: {type(exc).__name__}: {exc}")
        return _refusal(500, "the editor failed on this request; its terminal says why")

    routes = [
        Route("/", page), Route("/static/{name}", static),
        Route("/api/scene", get_scene, methods=["GET"]), Route("/api/scene", put_scene, methods=["PUT", "POST"]),
        Route("/api/events", events), Route("/api/overlay/{index:int}", overlay), Route("/api/picture", picture),
        Route("/api/upload", upload, methods=["POST"]), Route("/api/render", render, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={Exception: failed})
    return Guard(app, token, allowed_hosts(port))


def bind(port: int) -> socket.socket:
    """A listening socket on the loopback address (port 0: a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(64)
    return sock

