"""One editing session: the scene file as it is on disk, every change validated as `multidiff validate`
validates it and written only when valid (atomically, comments kept), changes made on disk seen.

The file stays the source of truth: the page sends the scene as plain data with the digest of the file it
was based on, and a change based on an older file is refused with the file as it is now."""
from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from PIL import Image

from ..errors import MultidiffError
from ..output.console import error_lines
from ..output.png import write_atomic
from ..output.preview import PALETTE, REGION_ALPHA, region_pixels
from ..run.batch import RunSettings
from ..run.plan import load_source
from ..scene import Scene, scene_from_dict
from ..scene.yamlpos import field_path
from .files import Refused, below, path_problems, png_bytes, save_upload, shown_picture
from .preview import DEBOUNCE_S, Broker, Previewer
from .scenefile import EditRefused, merged_text

OVERLAY_MAX_PX = 1024  # mask overlays are drawn at most this large a side (the page scales them)
DEFAULT_CANVAS = (512, 512)  # what the page draws while the scene has no valid size


@dataclass
class FileState:
    """The scene file as last read: its bytes' digest, text, data (PyYAML's reading), and the scene when
    it is valid, else its problems as validate prints them."""

    digest: str
    stat: tuple
    text: str | None = None
    data: Any = None
    scene: Scene | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    overlays: dict[int, bytes] = field(default_factory=dict)  # region index -> its mask drawn in its colour
    shapes: dict[int, dict] = field(default_factory=dict)  # mask region index -> {"bbox": [...]} or {"note": ...}


class Editor:
    """The scene file, its validation, the files below its folder, and the preview worker."""

    def __init__(self, scene_file: Path, settings: RunSettings, model: str | None = None,
                 preview_steps: int | None = None, debounce_s: float = DEBOUNCE_S,
                 tell: Callable[[str], None] | None = None):
        self.shown = str(scene_file)  # as the user gave it: messages name it so, as validate's do
        self.path = Path(scene_file).resolve()
        self.folder = self.path.parent
        self.settings = settings
        self.default_model = model or settings.default_model  # the model a scene without one previews on
        self.lock = threading.RLock()
        self.broker = Broker()
        self.previewer = Previewer(Path(self.shown), self.broker, settings, model, preview_steps, debounce_s, tell)
        self.state = self._read()

    def start(self) -> None:
        self.previewer.start()
        if self.state.scene is not None:
            self.previewer.request()

    def stop(self) -> None:
        self.previewer.stop()

    # --- reading and validating ------------------------------------------------------------------------------

    def _stat(self) -> tuple:
        try:
            st = os.stat(self.path)
        except OSError:
            return ()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> FileState:
        """The file as `validate` reads it (load_source, the same messages)."""
        stat = self._stat()
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            return FileState("", stat, problems=[f"{self.shown}: cannot read ({exc.strerror or exc})"])
        state = FileState(hashlib.sha256(raw).hexdigest(), stat)
        try:
            state.text = raw.decode("utf-8-sig")
            state.data = yaml.safe_load(state.text)
        except (UnicodeDecodeError, yaml.YAMLError, ValueError, TypeError, RecursionError):
            state.data = None
        try:
            loaded = load_source(Path(self.shown), default_model=self.default_model,
                                 allow_pickle=self.settings.allow_pickle)
        except MultidiffError as exc:
            state.problems = error_lines(exc)
            return state
        state.scene = loaded.scene
        state.warnings = [f"warning: {self.shown}: {note}" for note in loaded.notes] + \
                         [f"warning: {w}" for w in loaded.scene.warnings]
        self._draw_masks(state)
        return state

    def _draw_masks(self, state: FileState) -> None:
        """Each mask region below the scene's folder as an overlay in its colour, with its bounding box."""
        scene = state.scene
        scale = min(1.0, OVERLAY_MAX_PX / max(scene.width, scene.height))
        size = (max(1, round(scene.width * scale)), max(1, round(scene.height * scale)))
        for i, region in enumerate(scene.regions):
            if region.mask is None:
                continue
            try:
                below(self.folder, region.mask)
            except Refused as exc:
                state.shapes[i] = {"note": f"not shown: {exc}"}
                continue
            inside = region_pixels(scene, i, size)
            rgba = np.zeros((*inside.shape, 4), dtype=np.uint8)
            rgba[inside] = (*PALETTE[i % len(PALETTE)], round(255 * REGION_ALPHA))
            state.overlays[i] = png_bytes(Image.fromarray(rgba, "RGBA"))
            rows, cols = np.nonzero(inside)
            if rows.size:
                state.shapes[i] = {"bbox": [int(cols.min() / scale), int(rows.min() / scale),
                                            math.ceil((cols.max() + 1) / scale), math.ceil((rows.max() + 1) / scale)]}

    def _validated(self, text: str) -> tuple[Scene | None, list[str]]:
        """A candidate text checked as `validate` checks the file (scene_from_dict: its messages, its lines)."""
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            return None, [f"{self.shown}: YAML error: {' '.join(str(exc).split())}"]
        try:
            return scene_from_dict(data, Path(self.shown), root=root, default_model=self.default_model,
                                   allow_pickle=self.settings.allow_pickle), []
        except MultidiffError as exc:
            return None, error_lines(exc)

    def refresh(self) -> bool:
        """Read the file again if it changed on disk (a text editor saved it); tell every page. True if it did."""
        with self.lock:
            if self._stat() == self.state.stat:
                return False
            state = self._read()
            if state.digest == self.state.digest:
                self.state.stat = state.stat
                return False
            self.state = state
            snapshot = self.snapshot()
        self.broker.publish({"kind": "reloaded", **snapshot})
        if state.scene is not None:
            self.previewer.request()
        return True

    # --- what the page sees and changes --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The scene for the page: its data, problems (each at its field where it has one), and what to draw."""
        with self.lock:
            state = self.state
            scene = state.scene
            if scene is not None:
                canvas = [scene.width, scene.height]
            elif isinstance(state.data, dict):
                canvas = [_int_or(state.data.get("width"), DEFAULT_CANVAS[0]), _int_or(state.data.get("height"),
                                                                                         DEFAULT_CANVAS[1])]
            else:
                canvas = list(DEFAULT_CANVAS)
            family = scene.family if scene is not None else None
            return {
                "file": self.shown,
                "base": state.digest,
                "data": plain(state.data) if isinstance(state.data, dict) else None,
                "valid": scene is not None,
                "problems": [problem_of(line, self.shown) for line in state.problems],
                "warnings": state.warnings,
                "canvas": canvas,
                "snap_px": family.align_px if family is not None else 8,
                "family": family.label if family is not None else None,
                "colours": ["#%02x%02x%02x" % rgb for rgb in PALETTE],
                "masks": {str(i): {**shape, "overlay": i in state.overlays} for i, shape in state.shapes.items()},
                "init_image": scene.init_image if scene is not None and _is_below(self.folder, scene.init_image) else None,
                "preview": {"model": self.previewer.model_name, "off": self.previewer.off},
            }

    def change(self, base: str, data: Any, regions_from: list | None = None) -> tuple[int, dict[str, Any]]:
        """Apply the page's scene: (HTTP status, answer). Written if valid (200), else its problems (422), the
        file untouched; 409 with the file as it is when the page's copy is older than the file."""
        self.refresh()
        with self.lock:
            state = self.state
            if base != state.digest:
                return 409, {"ok": False, "conflict": f"{self.shown} changed on disk: the editor shows it as it is now",
                             **self.snapshot()}
            if not isinstance(data, dict):
                return 400, {"ok": False, "problems": [problem_of(f"{self.shown}: the scene is a mapping of keys", self.shown)]}
            if state.text is None or not isinstance(state.data, dict):
                line = f"{self.shown}: the file does not read as a scene: fix it in a text editor first"
                return 422, {"ok": False, "problems": [problem_of(line, self.shown)]}
            problems = [f"{self.shown}: {field_path(loc)}: {message}" for loc, message in
                        path_problems(self.folder, state.data, data)]
            text = state.text
            if not problems:
                try:
                    text = merged_text(state.text, plain(state.data), data, regions_from)
                except EditRefused as exc:
                    problems = [f"{self.shown}: {exc}"]
            if not problems and text != state.text:
                _, problems = self._validated(text)
            if problems:
                return 422, {"ok": False, "base": state.digest, "problems": [problem_of(p, self.shown) for p in problems]}
            if text != state.text:
                self._write(text)
                self.state = self._read()
            snapshot = self.snapshot()
        if text != state.text and self.state.scene is not None:
            self.previewer.request()
        return 200, {"ok": True, "written": text != state.text, **snapshot}

    def _write(self, text: str) -> None:
        """Replace the scene file at once (a temporary file renamed over it), keeping its permissions."""
        mode = os.stat(self.path).st_mode & 0o7777 if self.path.exists() else None
        write_atomic(self.path, lambda handle: handle.write(text.encode("utf-8")))
        if mode is not None:
            os.chmod(self.path, mode)

    def overlay(self, index: int) -> bytes:
        with self.lock:
            found = self.state.overlays.get(index)
        if found is None:
            raise Refused(f"region {index + 1} has no mask to show")
        return found

    def picture(self, name: str) -> bytes:
        """A picture below the scene's folder (an init image), for the page."""
        return shown_picture(self.folder, name)

    def upload(self, kind: str, filename: str, data: bytes) -> str:
        return save_upload(self.folder, kind, filename, data)


def problem_of(line: str, shown: str) -> dict[str, Any]:
    """A validate line (`file:line: field: message`) split for the page: the field it belongs beside."""
    rest = line.removeprefix("error: ")
    rest = rest[len(shown):] if rest.startswith(shown) else rest
    where = re.match(r"^(?::(\d+))?(?::\d+)?: (.*)$", rest)
    number, body = (int(where[1]) if where and where[1] else None), (where[2] if where else rest)
    at = re.match(r"^((?:[A-Za-z_]\w*|\(scene\))(?:\[\d+\]|\.[A-Za-z_]\w*)*): (.*)$", body)
    return {"field": at[1] if at else None, "line": number, "message": at[2] if at else body, "text": line}


def plain(value: Any) -> Any:
    """YAML data as JSON can carry it (a non-finite float or a date as its text)."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return str(value)


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 64 <= value <= 8192 else default


def _is_below(folder: Path, name: str | None) -> bool:
    try:
        return name is not None and below(folder, name) is not None
    except Refused:
        return False
