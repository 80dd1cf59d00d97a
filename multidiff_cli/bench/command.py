"""`multidiff bench` below the CLI: which measurement the options ask for, run, and what to print."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..output.report import batch_sweep_table, bench_summary, bench_table, peer_table, sweep_table, window_sweep_table
from .peer import PEER_MODELS, batch_sweep, parse_batch_sizes, parse_window_sizes, peer_row, window_sweep
from .process import in_fresh_process
from .sampler import BenchConfig, parse_widths, run_bench, run_width_sweep


def run_bench_command(config: BenchConfig, widths: str | None = None, json_path: Path | None = None,
                      batch_sizes: str | None = None, peer: bool = False, window_sizes: str | None = None) -> list:
    """`multidiff bench`: the two paths compared, or with `widths` the width sweep; with `--batch-sizes`
    the sweep of UNet calls, with `--window-sizes` one sample's time on windows of those sides, with
    `--peer` the panorama pipeline row (at each of `widths`). Returns what to print; `json_path` also gets
    the figures."""
    # every option given is read first, an empty one too (`--window-sizes ""` is a mistake, not "none")
    widths_px = parse_widths(widths) if widths is not None else None
    sizes = parse_batch_sizes(batch_sizes) if batch_sizes is not None else None
    sides = parse_window_sizes(window_sizes) if window_sizes is not None else None
    report: dict[str, Any] = {}
    printed = []
    if sizes is None and sides is None and not peer:
        if widths_px is not None:
            report = {"config": asdict(config), "widths": run_width_sweep(config, widths_px)}
            printed = [sweep_table(report)]
        else:
            report = run_bench(config)
            printed = [bench_table(report), bench_summary(report)]
    elif config.model not in PEER_MODELS:
        used = {option: why for option, why, on in (
            ("--batch-sizes", "its UNet calls give SD's text conditioning alone", sizes is not None),
            ("--window-sizes", "its UNet calls give SD's text conditioning alone", sides is not None),
            ("--peer", "diffusers' panorama pipeline, the peer, is SD's", peer)) if on}
        raise UsageError(f"{' and '.join(used)} run{'s' if len(used) == 1 else ''} SD-shaped models "
                         f"({', '.join(PEER_MODELS)}): {'; '.join(dict.fromkeys(used.values()))}; not {config.model}")
    if sizes is not None:
        report["batch_sweep"] = in_fresh_process(batch_sweep, config, sizes)
        printed.append(batch_sweep_table(report["batch_sweep"]))
    if sides is not None:
        report["window_sweep"] = in_fresh_process(window_sweep, config, sides)
        printed.append(window_sweep_table(report["window_sweep"]))
    if peer:
        report["peer"] = [peer_row(replace(config, width_px=width)) for width in (widths_px or [config.canvas_width])]
        printed.append(peer_table(report["peer"]))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return printed
