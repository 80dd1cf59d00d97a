"""`make gpu-check` (python -m multidiff_cli.bench.gpu_check): everything that needs a GPU, in one run, one table.

The GPU-marked tests, renders of the example scenes on a full-size SD2-shaped random model in
float16 and bfloat16 and with torch.compile, and `multidiff bench` on the device (the authors' loop,
the UNet batch-size sweep against `max_batch: auto`, diffusers' panorama pipeline as a peer). Runs on a GPU
runner's system Python (torch already there, no venv, no network): nothing is downloaded."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.table import Table

from ..catalog import FULL_SIZE_MODELS, SD2_RANDOM
from ..output import OUTPUT_DIR
from ..output.console import out as console
from ..run.batch import RunSettings
from ..run.smoke import example_scenes, run_smoke
from .peer import PEER_MODELS, batch_sweep, peer_row
from .process import device_name, in_fresh_process
from .sampler import BENCH_MODELS, BenchConfig, bench_config, run_bench

COMPILE_SCENE = "living_room.yaml"  # compiling is slow: one scene shows it works and what it gains


@dataclass
class Row:
    check: str
    setting: str
    seconds: float
    result: str  # "ok ..." or "FAILED: ..."

    @property
    def failed(self) -> bool:
        return self.result.startswith("FAILED")


def gpu_tests(tests_dir: Path) -> Row:
    """pytest -m gpu in a child process: the tests marked for a CUDA device."""
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(tests_dir)],
        capture_output=True, text=True,
    )
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else run.stderr.strip()[-200:]
    result = f"ok: {summary}" if run.returncode == 0 else f"FAILED: {summary}"
    return Row("gpu tests", "pytest -m gpu", time.perf_counter() - started, result)


def scene_renders(scenes: list[Path], output_dir: Path, steps: int, model: str | None, device: str, dtype: str,
                  compile: bool = False) -> list[Row]:
    """Every scene rendered in `steps` steps, each picture checked (size, not black, metadata); model None:
    each scene on the full-size random model of its family."""
    setting = f"{dtype}{' --compile' if compile else ''}, {steps} steps"
    started = time.perf_counter()
    try:
        results = run_smoke(scenes, output_dir, steps, model, RunSettings(device=device, dtype=dtype, compile=compile),
                            family_models=FULL_SIZE_MODELS)
    except Exception as exc:  # one broken configuration must not hide the others' rows
        return [Row("render", setting, time.perf_counter() - started, f"FAILED: {type(exc).__name__}: {exc}")]
    return [
        Row(f"render {r.scene} {r.size}", f"{r.model or '-'}, {setting}", r.seconds,
            f"skipped: {r.skipped}" if r.skipped else "ok" if r.problem is None else f"FAILED: {r.problem}")
        for r in results
    ]


def bench_row(device: str, dtype: str, model: str, size: int | None, steps: int | None) -> Row:
    """multidiff's sampler against the authors' per-prompt loop on the device."""
    started = time.perf_counter()
    try:
        config = bench_config(model=model, size=size, regions=3, steps=steps, bootstrap_steps=0, scheduler="ddim",
                              device=device, dtype=dtype, compile=False, max_batch=None)
        report = run_bench(config)
    except Exception as exc:
        return Row("bench", model, time.perf_counter() - started, f"FAILED: {type(exc).__name__}: {exc}")
    ours, theirs = report["paths"]["multidiff"], report["paths"]["reference"]
    setting = f"{config.size_px}², 3 regions, {config.steps} steps, {config.dtype}"
    result = (f"ok: {ours['seconds_per_step']:.3f} s/step vs {theirs['seconds_per_step']:.3f} (authors' loop), "
              f"sampling ratio {report['sampling_time_ratio']:.3f}, latents rel. diff {report['relative_difference']:.1e}")
    return Row("bench", setting, time.perf_counter() - started, result)


def sweep_and_peer_rows(config: BenchConfig, in_process: bool = False) -> list[Row]:
    """`bench --batch-sizes 1,2,4,8,16,32` at the bench's size (what auto picks against the fastest), and
    `bench --peer` on a panorama twice as wide (1024x512): multidiff against diffusers' panorama pipeline."""
    rows = []
    started = time.perf_counter()
    try:
        sizes = [1, 2, 4, 8, 16, 32]
        sweep = batch_sweep(config, sizes) if in_process else in_fresh_process(batch_sweep, config, sizes)
        best = min(sweep["rows"], key=lambda row: row["seconds_per_sample"])
        result = (f"ok: fastest {best['batch_size']} a call ({best['seconds_per_sample'] * 1000:.1f} ms/sample); "
                  f"auto picks {sweep['auto_samples_per_call']}; " +
                  ", ".join(f"{r['batch_size']}: {r['seconds_per_sample'] * 1000:.1f}" for r in sweep["rows"]))
    except Exception as exc:
        result = f"FAILED: {type(exc).__name__}: {exc}"
    rows.append(Row("bench --batch-sizes", f"{config.size_px}², {config.dtype}", time.perf_counter() - started, result))
    started = time.perf_counter()
    try:
        peer = peer_row(replace(config, width_px=2 * config.size_px), in_process)
        result = (f"ok: {peer['paths']['multidiff']['seconds']:.1f} s vs {peer['paths']['panorama pipeline']['seconds']:.1f} s,"
                  f" ratio {peer['time_ratio']:.3f}, max pixel difference {peer['max_pixel_difference']}")
    except Exception as exc:
        result = f"FAILED: {type(exc).__name__}: {exc}"
    canvas = f"{2 * config.size_px}x{config.size_px}"
    rows.append(Row("bench --peer", f"{canvas}, {config.steps} steps, {config.dtype}", time.perf_counter() - started, result))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multidiff_cli.bench.gpu_check", description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=None, help="the model every scene renders on [each scene on the "
                        "full-size random model of its family: sd2-random, sdxl-random]")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--steps", type=int, default=2, help="steps per scene render")
    parser.add_argument("--scenes", type=Path, default=Path("scenes"))
    parser.add_argument("--tests", type=Path, default=Path("tests"))
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR / "gpu-check")
    parser.add_argument("--bench-size", type=int, default=None, help="[512 on CUDA]")
    parser.add_argument("--bench-steps", type=int, default=None, help="[50 on CUDA]")
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        console.print("gpu-check did not run: torch sees no CUDA device on this machine", markup=False)
        return 1
    name = device_name(args.device)
    scenes = example_scenes(args.scenes)
    rows: list[Row] = []
    if not args.no_tests:
        rows.append(gpu_tests(args.tests))
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        rows += scene_renders(scenes, args.output_dir / dtype, args.steps, args.model, args.device, dtype)
    if not args.no_compile:
        compiled = [scene for scene in scenes if scene.name == COMPILE_SCENE] or scenes[:1]
        rows += scene_renders(compiled, args.output_dir / "compiled", args.steps, args.model, args.device,
                              dtypes[0], compile=True)
    if not args.no_bench:
        bench_model = args.model if args.model in BENCH_MODELS else SD2_RANDOM
        rows.append(bench_row(args.device, dtypes[0], bench_model, args.bench_size, args.bench_steps))
        peer_model = bench_model if bench_model in PEER_MODELS else SD2_RANDOM  # the panorama pipeline is SD's
        rows += sweep_and_peer_rows(bench_config(peer_model, args.bench_size, 0, args.bench_steps, 0, "ddim", args.device,
                                                 dtypes[0], False, None))

    table = Table(title=f"gpu-check on {name} ({args.device}), torch {torch.__version__}, "
                        f"model {args.model or 'of each scene: its family full-size random'}")
    for column in ("check", "setting", "seconds", "result"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for row in rows:
        table.add_row(row.check, row.setting, f"{row.seconds:.1f}", row.result)
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": [asdict(r) for r in rows]},
                                        indent=2) + "\n")
    failed = [row for row in rows if row.failed]
    console.print(f"{len(rows) - len(failed)} passed, {len(failed)} failed", markup=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
