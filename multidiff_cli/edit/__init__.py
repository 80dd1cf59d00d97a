"""`multidiff edit`: a live editor in the browser that writes the scene file.

Boxes are placed with the mouse on a canvas of the scene's size; every change is validated as `multidiff
validate` validates it and, when valid, written to the YAML file at once (comments and key order kept);
a preview renders in a few steps on the model loaded once, its pictures streamed as they come.

Needs the `edit` extra (Starlette, uvicorn, ruamel.yaml): importing this package without it raises
ModuleNotFoundError naming the missing one, which the CLI turns into one line."""
from __future__ import annotations

import secrets
import webbrowser
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ruamel.yaml  # noqa: F401  (the extra's three parts, asked for here so a missing one fails at once)
import starlette  # noqa: F401
import uvicorn

from ..errors import UsageError
from ..output.png import read_metadata, record_base_dir, write_atomic
from ..run.batch import RunSettings
from ..run.plan import free_path
from ..scene.paths import rebase_paths
from ..scene.starter import write_starter
from .server import HOST, bind, create_app
from .session import Editor

SCENE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class EditRequest:
    source: Path  # a scene file, a new one to start from the starter scene, or a PNG made by multidiff
    model: str | None = None  # the preview's model [default: the scene's]
    port: int = 0  # 0: a free one
    open_browser: bool = True
    preview_steps: int | None = None


def scene_to_edit(source: Path, tell: Callable[[str], None]) -> Path:
    """The scene file the editor writes: `source`; a new file starts as the starter scene; a PNG's recorded
    scene goes to a new file beside it (the picture itself is never written)."""
    if source.is_dir():
        raise UsageError(f"{source} is a folder: name a scene file, e.g. {source / 'scene.yaml'}")
    if source.suffix.lower() == ".png":
        record = read_metadata(source)
        target = free_path(source.with_suffix(".yaml"), set())[0]
        scene = rebase_paths(record["scene"], record_base_dir(record, source), target.parent)
        text = f"# the scene of {source.name}, written by multidiff edit\n"
        text += yaml_dump(scene)
        write_atomic(target, lambda handle: handle.write(text.encode("utf-8")))
        tell(f"{source.name}'s scene is in {target}: the editor writes there, never into the picture")
        return target
    if not source.exists():
        if source.suffix.lower() not in SCENE_SUFFIXES:
            raise UsageError(f"{source}: no such file (a new scene file's name ends in .yaml)")
        write_starter(source)
        tell(f"{source}: a new scene, from the starter scene (multidiff init)")
    return source


def yaml_dump(scene: dict) -> str:
    import yaml

    return yaml.safe_dump(scene, sort_keys=False, allow_unicode=True, default_flow_style=None)


def run_editor(request: EditRequest, settings: RunSettings, tell: Callable[[str], None]) -> None:
    """Serve the editor on 127.0.0.1 until Ctrl-C; `tell` hears the URL and what happens."""
    scene_file = scene_to_edit(request.source, tell)
    editor = Editor(scene_file, settings, request.model, request.preview_steps, tell=tell)
    try:
        sock = bind(request.port)
    except OSError as exc:
        raise UsageError(f"--port {request.port}: cannot listen on {HOST}:{request.port} ({exc.strerror or exc})") from None
    port = sock.getsockname()[1]
    token = secrets.token_urlsafe(24)
    url = f"http://{HOST}:{port}/?token={token}"
    server: uvicorn.Server | None = None
    app = create_app(editor, token, port, tell, closing=lambda: server is not None and server.should_exit)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=2))
    tell(f"editing {scene_file} at {url}")
    tell("every valid change is saved to the file at once; Ctrl-C stops the editor")
    editor.start()
    if request.open_browser:
        webbrowser.open(url)
    try:
        server.run(sockets=[sock])
    finally:
        editor.stop()
        sock.close()
