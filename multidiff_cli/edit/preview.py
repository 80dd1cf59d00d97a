"""The live preview: one worker thread renders the scene at a few steps on the model loaded once per
session, streams each step's picture, and drops a render at its next step when a newer change comes.
The "Render" button's full render runs on the same thread and model, and writes its PNG as `render` does.

Events go to every open page through a Broker (thread -> each page's asyncio loop)."""
from __future__ import annotations

import asyncio
import base64
import random
import secrets
import threading
from pathlib import Path
from typing import Any, Callable

from ..catalog import detect_few_step
from ..errors import MultidiffError
from ..output import OUTPUT_DIR
from ..output.console import error_lines
from ..run.batch import Event, Renderer, RunSettings
from ..run.memory import check_memory
from ..run.plan import SEED_RANGE, plan_jobs
from ..run.render import decode_scene, plan_render, render
from ..scene import checked_for
from .files import png_bytes

PREVIEW_STEPS = 4  # the preview's steps, but for few-step models (their own scene's steps)
DEBOUNCE_S = 0.3  # a change waits this long for the next before its preview starts


class Broker:
    """Events to every subscribed page: publish from any thread, each subscriber reads an asyncio queue.
    A page that opens late gets the latest preview picture and the preview's state at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queues: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._latest: dict[str, dict] = {}  # kind -> the last event, replayed to a new subscriber

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._queues.append((asyncio.get_running_loop(), queue))
            for event in self._latest.values():
                queue.put_nowait(event)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._queues = [(loop, q) for loop, q in self._queues if q is not queue]

    def publish(self, event: dict, keep: str | None = None) -> None:
        """Send `event` to every page; keep: remember it under this name for pages that open later."""
        with self._lock:
            if keep:
                self._latest[keep] = event
            for loop, queue in self._queues:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                except RuntimeError:  # that page's loop has closed
                    pass


class Cancelled(Exception):
    """A newer change came: this preview stops at its next step."""


def steps_text(steps: int) -> str:
    return f"{steps} step{'' if steps == 1 else 's'}"


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


class Previewer:
    """The worker: previews (only the newest change's) and full renders, one at a time, on one model."""

    def __init__(self, scene_file: Path, broker: Broker, settings: RunSettings, model: str | None,
                 preview_steps: int | None = None, debounce_s: float = DEBOUNCE_S,
                 tell: Callable[[str], None] | None = None):
        self.scene_file, self.broker, self.settings = scene_file, broker, settings
        self.model_asked, self.preview_steps, self.debounce_s = model, preview_steps, debounce_s
        self.tell = tell or (lambda _line: None)
        self.renderer: Renderer | None = None
        self._loaded = False
        self.model_name: str | None = None  # the session's model, fixed by the first preview
        self.seed = secrets.randbelow(SEED_RANGE)  # for scenes without a seed: the same one every preview
        self.off: str | None = None  # why there is no preview, once known
        self._cond = threading.Condition()
        self._wanted = self._started = 0
        self._renders = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="multidiff-edit-preview", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def request(self) -> int:
        """A preview of the scene file as it is now; its generation number (a newer one cancels it)."""
        with self._cond:
            self._wanted += 1
            self._cond.notify_all()
            return self._wanted

    def request_render(self) -> None:
        with self._cond:
            self._renders += 1
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or self._renders or self._wanted > self._started)
                if self._stopped:
                    return
                if self._renders:
                    self._renders -= 1
                    job = self._full_render
                else:
                    while not self._stopped:  # debounce: the newest change, once none came for a moment
                        seen = self._wanted
                        self._cond.wait(self.debounce_s)
                        if self._wanted == seen:
                            break
                    self._started = generation = self._wanted

                    def job(generation=generation):
                        self._preview(generation)
            try:
                job()
            except Exception as exc:  # a bug, not the user's: one line here and on the page, no traceback
                line = f"the editor's render failed: {type(exc).__name__}: {exc}"
                self.tell(line)
                self.broker.publish({"kind": "problem", "lines": [line]}, keep="preview")

    def _cancelled(self, generation: int) -> bool:
        return self._stopped or self._wanted != generation

    # --- previews -----------------------------------------------------------------------------------------

    def _steps(self) -> int | None:
        """--preview-steps; else a few-step model's scenes keep their steps, other models take PREVIEW_STEPS."""
        if self.preview_steps:
            return self.preview_steps
        return None if self.model_name and detect_few_step(self.model_name) else PREVIEW_STEPS

    def _jobs(self, overrides: dict[str, Any], output_dir: Path):
        """The scene file planned as `render` plans it (its model resolved, a seed chosen)."""
        if self.model_name is None:  # the session's model: --model, else the scene's as it is at the first preview
            jobs, failures, _ = plan_jobs([self.scene_file], {"model": self.model_asked}, None, None, output_dir,
                                          random.Random(self.seed), default_model=self.settings.default_model,
                                          allow_pickle=self.settings.allow_pickle)
            if failures:
                raise failures[0].error
            self.model_name = jobs[0].scene.model
        jobs, failures, notes = plan_jobs([self.scene_file], {"model": self.model_name, **overrides}, None, None,
                                          output_dir, random.Random(self.seed), default_model=self.settings.default_model,
                                          allow_pickle=self.settings.allow_pickle)
        if failures:
            raise failures[0].error
        return jobs, notes

    def _model(self, scene):
        if self.renderer is None:
            self.renderer = Renderer(self.settings, self._on_render_event)
        if not self._loaded:
            self.broker.publish({"kind": "state", "text": f"loading {self.model_name}"}, keep="state")
        try:
            model = self.renderer.model(scene.model, scene.model_config_, scene.vae)
            self._loaded = True
            return model
        except MultidiffError as exc:
            self.off = f"no preview: {' '.join(error_lines(exc))}"
            self.broker.publish({"kind": "off", "reason": self.off}, keep="state")
            raise Cancelled from None

    def _preview(self, generation: int) -> None:
        if self.off:
            return
        try:
            jobs, _ = self._jobs({"steps": self._steps()}, OUTPUT_DIR)
            model = self._model(jobs[0].scene)
            scene = checked_for(jobs[0].scene, model.facts, self.scene_file.name, model.few_step_model)
            plan = plan_render(scene, model)
            if self.settings.memory_check:
                check_memory(scene, model, plan)
        except Cancelled:
            return
        except MultidiffError as exc:
            self.broker.publish({"kind": "problem", "generation": generation, "lines": error_lines(exc)}, keep="preview")
            return
        about = {"generation": generation, "model": self.model_name, "seed": jobs[0].seed}
        if self._cancelled(generation):
            self.broker.publish({"kind": "cancelled", **about})
            return
        self.broker.publish({"kind": "state", "text": f"preview: {steps_text(scene.steps)} on {self.model_name}"}, keep="state")

        def on_step(i: int, n: int, latents, denoised) -> None:
            if self._cancelled(generation):
                raise Cancelled
            image = decode_scene(model, denoised if denoised is not None else latents, plan)
            self.broker.publish({"kind": "step", **about, "step": i + 1, "steps": n, "image": data_url(image)})

        try:
            result = render(scene, model, jobs[0].seed, plan=plan, callback=on_step)
        except Cancelled:
            self.broker.publish({"kind": "cancelled", **about})
            return
        except MultidiffError as exc:
            self.broker.publish({"kind": "problem", **about, "lines": error_lines(exc)}, keep="preview")
            return
        self.broker.publish({"kind": "final", **about, "steps": scene.steps, "image": data_url(result.image)},
                            keep="preview")

    # --- the full render --------------------------------------------------------------------------------------

    def _full_render(self) -> None:
        """The scene file rendered as `render` renders it, on the session's model, into a new PNG."""
        if self.off:
            self.broker.publish({"kind": "render-failed", "lines": [self.off]})
            return
        try:
            jobs, notes = self._jobs({}, OUTPUT_DIR)
            self._model(jobs[0].scene)
        except Cancelled:
            self.broker.publish({"kind": "render-failed", "lines": [self.off]})
            return
        except MultidiffError as exc:
            self.broker.publish({"kind": "render-failed", "lines": error_lines(exc)})
            return
        for kind, text in notes:
            self._on_render_event(Event(kind, text=text))
        self.renderer.run(jobs)

    def _on_render_event(self, event: Event) -> None:
        if event.kind == "step":
            self.broker.publish({"kind": "render-step", "step": event.step, "steps": event.steps})
        elif event.kind == "written":
            self.tell(f"rendered {event.path}")
            self.broker.publish({"kind": "written", "path": str(event.path)})
        elif event.kind == "failed":
            self.broker.publish({"kind": "render-failed", "lines": error_lines(event.failure.error)})
        elif event.kind in ("note", "warning"):
            self.broker.publish({"kind": "render-note", "text": f"{event.kind}: {event.text}"})
