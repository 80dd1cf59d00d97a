"""What the bench's measurements share: a path in a fresh process, a clock that waits for the device,
peak memory, the device's name."""
from __future__ import annotations

import multiprocessing
import platform
import queue as queue_module
import resource
import sys
import time
from typing import Any, Callable

import torch

from ..errors import BenchError


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _child(target: Callable, args: tuple, queue) -> None:
    try:
        queue.put(("ok", target(*args)))
    except BaseException as exc:  # reported by the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def in_fresh_process(target: Callable, *args, what: str | None = None) -> Any:
    """target(*args) in a fresh (spawned) process: its own memory and peak, no warm caches from another
    path. A child killed (for memory, by a signal) before it reports is a BenchError, never a hang."""
    what = what or f"bench {getattr(target, '__name__', target)}"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(target, args, queue))
    child.start()
    while True:
        try:
            status, payload = queue.get(timeout=1)
            break
        except queue_module.Empty:
            if not child.is_alive():
                try:  # it may have reported just as the wait timed out
                    status, payload = queue.get_nowait()
                    break
                except queue_module.Empty:
                    raise BenchError(f"{what} died with exit code {child.exitcode} "
                                     "(killed for memory? try a smaller --size or --dtype bfloat16)") from None
    child.join()
    if status != "ok":
        raise BenchError(f"{what} failed: {payload}")
    return payload


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()
