"""Shared fixtures: no network, CPU only, a tiny random SD2-shaped model built once."""
from __future__ import annotations

import os

import pytest
import torch

# Never reach a model hub from the tests, even by accident.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MULTIDIFF_DEVICE", "cpu")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """The built-in `tiny-random` components on the CPU (float32). Treat as read-only."""
    from multidiff_cli.models.components import to_device
    from multidiff_cli.models.random_weights import build_tiny_random

    return to_device(build_tiny_random(), torch.device("cpu"), torch.float32)


@pytest.fixture
def write_scene(tmp_path):
    """Write a scene YAML into tmp_path and return its path."""

    def write(text: str, name: str = "scene.yaml"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write
