"""`make gpu-check` runs where no GPU is: its table, rows and exit code on the CPU with tiny-random."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from multidiff_cli.bench import gpu_check

SCENES = Path(__file__).resolve().parents[1] / "scenes"


def test_gpu_check_renders_every_scene_per_dtype_and_reports_one_table(tmp_path, capsys):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    shutil.copy(SCENES / "living_room.yaml", scenes)
    report = tmp_path / "rows.json"
    code = gpu_check.main([
        "--device", "cpu", "--model", "tiny-random", "--dtypes", "float32,bfloat16", "--steps", "1",
        "--scenes", str(scenes), "--output-dir", str(tmp_path / "out"), "--no-tests", "--no-compile", "--no-bench",
        "--json", str(report),
    ])
    printed = capsys.readouterr().out
    rows = json.loads(report.read_text())["rows"]
    assert code == 0, printed
    assert [(row["check"], row["setting"]) for row in rows] == [
        ("render living_room.yaml 512x512", "tiny-random, float32, 1 steps"),
        ("render living_room.yaml 512x512", "tiny-random, bfloat16, 1 steps"),
    ]
    assert all(row["result"] == "ok" for row in rows)
    assert "2 passed, 0 failed" in printed
    assert (tmp_path / "out" / "bfloat16" / "living_room-42.png").exists()


def test_gpu_check_says_plainly_that_it_did_not_run_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--no-tests"]) == 1
    assert "did not run: torch sees no CUDA device" in capsys.readouterr().out


def test_gpu_check_sweep_and_peer_rows_run_on_the_tiny_model():
    from multidiff_cli.bench.sampler import BenchConfig

    rows = gpu_check.sweep_and_peer_rows(BenchConfig(model="tiny-random", size_px=64, steps=1), in_process=True)
    assert [(row.check, row.setting) for row in rows] == [
        ("bench --batch-sizes", "64², float32"), ("bench --peer", "128x64, 1 steps, float32"),
    ]
    assert all(row.result.startswith("ok") for row in rows), rows
    assert "auto picks" in rows[0].result and "max pixel difference" in rows[1].result
