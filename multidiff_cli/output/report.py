"""What the commands print: tables and summaries (rich), kept out of cli.py's command logic."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from ..catalog import model_label
from ..scene.paths import named_files, rebase_paths
from .png import record_base_dir, write_atomic

GIB = 2**30


def size_text(size_bytes: float) -> str:
    """Bytes for people: GiB from a tenth of one, else MiB."""
    return f"{size_bytes / GIB:.2f} GiB" if size_bytes >= GIB / 10 else f"{size_bytes / 2**20:.0f} MiB"


def bench_table(report: dict[str, Any]) -> Table:
    config = report["config"]
    regions = f"{config['regions']} regions" + (f" of {config['region_px']} px" if config.get("region_px") else "")
    table = Table(title=(
        f"{model_label(config['model'])} {config.get('width_px') or config['size_px']}x{config['size_px']}, {regions}, "
        f"{config['steps']} steps ({config['bootstrap_steps']} bootstrap), {config['scheduler']}, "
        f"{config['dtype']} on {config['device']} ({report['device_name']}, {report['torch_threads']} threads)"
    ))
    for column in ("path", "samples/step", "samples/call", "s/step", "sampling s", "non-network share", "peak memory"):
        table.add_column(column, justify="right" if column != "path" else "left")
    labels = {"reference": "authors' per-prompt loop", "multidiff": "multidiff",
              "multidiff+loras": f"multidiff + {plural(config.get('loras', 0), 'region LoRA')}",
              "multidiff+controls": f"multidiff + {plural(config.get('controls', 0), 'region ControlNet')}",
              "multidiff+windows": "multidiff, region windows",
              "multidiff+windows+canvas-unconditional": "multidiff, region windows, the canvas's unconditional"}
    for name, p in report["paths"].items():
        table.add_row(
            labels[name], f"{p['unet_samples_per_step']:.2f}", unet_batch_text(p.get("unet_batch")) or "",
            f"{p['seconds_per_step']:.3f}", f"{p['sampling_seconds']:.2f}",
            f"{p['non_unet_share']:.1%}", size_text(p['peak_memory_bytes']),
        )
    return table


def bench_summary(report: dict[str, Any]) -> str:
    if report["config"].get("loras"):
        lora = report["paths"]["multidiff+loras"]
        switching = lora["lora_switch_seconds_per_step"]
        return (
            f"with region LoRAs / without: step time {report['step_time_ratio']:.3f}, UNet samples "
            f"{report['unet_samples_ratio']:.3f}; switching LoRAs: {switching * 1000:.1f} ms a step "
            f"({switching / lora['seconds_per_step']:.2%} of a step)"
        )
    if report["config"].get("controls"):
        ours, theirs = report["paths"]["multidiff+controls"], report["paths"]["multidiff"]
        samples = ours["controlnet_samples_per_step"] / max(ours["controlnet_calls_per_step"], 1)
        return (
            f"{plural(report['config']['controls'], 'region ControlNet')}: {ours['seconds_per_step']:.3f} s a step "
            f"against {theirs['seconds_per_step']:.3f} s without ({report['step_time_ratio'] - 1:+.1%}); a ControlNet "
            f"call of {samples:g} sample{'' if samples == 1 else 's'} costs {ours['controlnet_seconds_per_call']:.3f} s"
        )
    text = (
        f"multidiff / reference: sampling time {report['sampling_time_ratio']:.3f}, step time "
        f"{report['step_time_ratio']:.3f}, UNet samples {report['unet_samples_ratio']:.3f}; "
        f"final latents' relative difference {report['relative_difference']:.2e}"
    )
    for key, label in (("windows", "region windows"),
                       ("windows_canvas_unconditional", "region windows, the canvas's unconditional")):
        if key in report:
            w = report[key]
            text += (f"\n{label} / full-canvas regions: step time {w['step_time_ratio']:.3f}, latent cells "
                     f"{w['cells_ratio']:.3f}; against the authors' loop: step time {w['step_time_ratio_to_reference']:.3f}")
    return text


def plural(count: int, thing: str) -> str:
    """'1 region LoRA', '3 region LoRAs'."""
    return f"{count} {thing}{'' if count == 1 else 's'}"


def sweep_table(report: dict[str, Any]) -> Table:
    config = report["config"]
    table = Table(title=f"multidiff, {model_label(config['model'])}, height {config['size_px']}, {config['regions']} regions, "
                        f"{config['steps']} steps, {config['dtype']} on {config['device']}")
    for column in ("width px", "views", "samples/step", "s/step", "peak memory"):
        table.add_column(column, justify="right")
    for row in report["widths"]:
        table.add_row(str(row["width_px"]), str(row["views"]), f"{row['unet_samples_per_step']:.1f}",
                      f"{row['seconds_per_step']:.3f}", size_text(row['peak_memory_bytes']))
    return table


def batch_sweep_table(sweep: dict[str, Any]) -> Table:
    """`bench --batch-sizes`: seconds per sample of one UNet call of each size (best run, and every run)."""
    config, (h, w) = sweep["config"], sweep["view_hw"]
    table = Table(title=f"{config['model']} UNet, one call over {h}x{w} latents, {config['dtype']} on {config['device']} "
                        f"({sweep['device_name']}, {sweep['torch_threads']} threads); auto picks "
                        f"{sweep['auto_samples_per_call']}")
    for column in ("samples/call", "s/sample (best)", "runs", "vs best size", "CPU s/sample (best)", "CPU runs"):
        table.add_column(column, justify="right")
    fastest = min(row["seconds_per_sample"] for row in sweep["rows"])
    for row in sweep["rows"]:
        table.add_row(str(row["batch_size"]), f"{row['seconds_per_sample']:.3f}",
                      ", ".join(f"{r:.3f}" for r in row["runs"]), f"{row['seconds_per_sample'] / fastest:.2f}x",
                      f"{row['cpu_seconds_per_sample']:.3f}", ", ".join(f"{r:.3f}" for r in row["cpu_runs"]))
    return table


def window_sweep_table(sweep: dict[str, Any]) -> Table:
    """`bench --window-sizes`: one UNet sample on a square window of each side against one on the native view."""
    config, share = sweep["config"], sweep["break_even_cells_share"]
    pays = (f"a window pays below {share:.2f} of the view's cells" if share is not None
            else "the sizes measured do not straddle a window's break-even")
    table = Table(title=f"{config['model']} UNet, one sample on a square window against the {sweep['view_px']} px "
                        f"view, {config['dtype']} on {config['device']} ({sweep['device_name']}, "
                        f"{sweep['torch_threads']} threads); a window runs 2 samples where a view runs 1: {pays}")
    for column in ("window", "cells vs view", "s/sample (best)", "runs", "time vs view", "2 samples vs view"):
        table.add_column(column, justify="right")
    for row in sweep["rows"]:
        table.add_row(f"{row['side_px']}²", f"{row['cells_share']:.3f}", f"{row['seconds_per_sample']:.3f}",
                      ", ".join(f"{r:.3f}" for r in row["runs"]), f"{row['time_share']:.3f}x",
                      f"{2 * row['time_share']:.2f}x")
    return table


def peer_table(rows: list[dict[str, Any]]) -> Table:
    """`bench --peer`: multidiff against diffusers' panorama pipeline, whole renders from the same noise."""
    config = rows[0]["config"]
    table = Table(title=f"{config['model']}, one prompt, no regions, {config['steps']} steps, {config['scheduler']}, "
                        f"{config['dtype']} on {config['device']} ({rows[0]['device_name']}): whole render "
                        "(prompts, sampling, decoding)")
    for column in ("canvas", "views", "path", "samples/call", "seconds", "UNet s", "decode s", "ratio", "CPU s",
                   "CPU ratio", "max pixel difference"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for row in rows:
        canvas = f"{row['config']['width_px'] or row['config']['size_px']}x{row['config']['size_px']}"
        for name, path in row["paths"].items():
            ours = name == "multidiff"
            table.add_row(canvas, str(path["views"]), name, str(path["samples_per_call"]), f"{path['seconds']:.1f}",
                          f"{path.get('unet_seconds', 0):.1f}", f"{path.get('decode_seconds', 0):.1f}",
                          f"{row['time_ratio']:.3f}" if ours else "", f"{path['cpu_seconds']:.1f}",
                          f"{row['cpu_time_ratio']:.3f}" if ours else "", f"{row['max_pixel_difference']} / 255" if ours else "")
    return table


def metadata_text(record: dict[str, Any], image: Path) -> str:
    """A PNG's multidiff record for people: the scene as YAML (ready to save and edit), then the run, the
    files it names as this machine resolves them from the picture's folder, and its LoRAs."""
    scene = yaml.safe_dump(record["scene"], sort_keys=False, allow_unicode=True, default_flow_style=None).rstrip()
    run = {
        "model": record.get("model"),
        "revision": record.get("revision"),
        "scheduler": record.get("scheduler"),
        "seed": record["scene"].get("seed"),
        "device": record.get("device"),
        "dtype": record.get("dtype"),
        "render_seconds": record.get("render_seconds"),
        "samples_per_call": unet_batch_text(record.get("unet_batch")),
        "created": record.get("created"),
        "family": record.get("family"),
        "scene_file": record.get("scene_file"),
        "versions": record.get("versions"),
    }
    if record.get("scene_dir"):  # a record written before pictures held no absolute path
        run["scene_dir"] = record["scene_dir"]
    if record.get("init_image"):  # the picture it started from: path, size, sha256
        run["init_image"] = record["init_image"]
    if record.get("windows"):  # region windows: each window in pixels, and the regions' cells a step
        windows = record["windows"]
        run["region_windows"] = {name: f"{box} px" for name, box in windows["boxes"].items()}
        ratio = windows["region_cells_per_step"] / max(1, windows["without_windows"])
        run["region_cells_per_step"] = (f"{windows['region_cells_per_step']} latent cells "
                                        f"({ratio:.2f}x of {windows['without_windows']} without windows)")
    run_text = yaml.safe_dump(run, sort_keys=False, allow_unicode=True).rstrip()
    text = f"# scene\n{scene}\n\n# run\n" + "\n".join(f"# {line}" for line in run_text.splitlines())
    files = named_files(record["scene"], record_base_dir(record, image))
    if files:
        text += "\n\n# files (as written -> where this machine finds them)\n" + "\n".join(
            f"# {name} -> {path}{'' if path.exists() else ' (missing)'}" for name, path in files)
    loras, controls = lora_lines(record), control_lines(record)
    text += ("\n\n# LoRAs (which prompts, path as given, scale, sha256 when rendered)\n" + "\n".join(
        f"# {line}" for line in loras) if loras else "")
    text += ("\n\n# ControlNets (which prompts, ControlNet, control image, scale, steps, sha256 when rendered)\n"
             + "\n".join(f"# {line}" for line in controls) if controls else "")
    references = reference_lines(record)
    return text + ("\n\n# IP-Adapters (which prompts, adapter and weight, reference picture, scale, sha256 when "
                   "rendered)\n" + "\n".join(f"# {line}" for line in references) if references else "")


def _listed(value: Any) -> list:  # a malformed record (null, a string) lists nothing, never fails
    return value if isinstance(value, list) else []


def _owners(scene: dict[str, Any], key: str) -> list[tuple[str, list]]:
    """(whose samples, the list under `key`) for the scene and each of its regions."""
    return [("every prompt", _listed(scene.get(key)))] + [
        (f"regions[{i}] ({region.get('prompt', '')})", _listed(region.get(key)))
        for i, region in enumerate(_listed(scene.get("regions"))) if isinstance(region, dict)
    ]


def control_lines(record: dict[str, Any]) -> list[str]:
    """One line per control of a PNG's scene: whose samples, its ControlNet and image as given with their
    sha256 (a hub id or the built-in one has none), its scale and the share of the steps it ran in."""
    scene, hashes = record["scene"], record.get("inputs", {})
    lines = []
    for owner, controls in _owners(scene, "control"):
        for c in (c for c in controls if isinstance(c, dict)):
            model, image = str(c.get("model")), str(c.get("image"))
            model_hash = f" {hashes[model]}" if model in hashes else ""
            lines.append(f"{owner}: {model}{model_hash}, image {image} {hashes.get(image, 'sha256 unknown')}, "
                         f"x{c.get('scale', 1.0):g}, steps {c.get('start', 0.0):g}-{c.get('end', 1.0):g}"
                         if all(isinstance(c.get(k, 0.0), (int, float)) for k in ("scale", "start", "end"))
                         else f"{owner}: {model}, image {image}")
    return lines


def reference_lines(record: dict[str, Any]) -> list[str]:
    """One line per reference of a PNG's scene: whose samples, its IP-Adapter and weight (with the weight's
    sha256 where it was a local file), its picture with its sha256, and its scale."""
    scene, hashes = record["scene"], record.get("inputs", {})
    lines = []
    for owner, references in _owners(scene, "reference"):
        for r in (r for r in references if isinstance(r, dict)):
            weight = f"{r.get('model')}/{r.get('weight')}"
            weight_hash = f" {hashes[weight]}" if weight in hashes else ""
            scale = r.get("scale", 1.0)
            lines.append(f"{owner}: {r.get('model')} {r.get('weight')}{weight_hash}, image {r.get('image')} "
                         f"{hashes.get(str(r.get('image')), 'sha256 unknown')}, x"
                         + (f"{scale:g}" if isinstance(scale, (int, float)) else str(scale)))
    return lines


def lora_lines(record: dict[str, Any]) -> list[str]:
    """One line per LoRA of a PNG's scene: whose samples it is on, its path as given, scale and sha256."""
    scene, hashes = record["scene"], record.get("inputs", {})
    lines = []
    for owner, loras in _owners(scene, "loras"):
        for lora in loras:
            if isinstance(lora, dict):
                scale = lora.get("scale", 1.0)
                scale_text = f"{scale:g}" if isinstance(scale, (int, float)) else str(scale)
                lines.append(f"{owner}: {lora.get('path')} x{scale_text} {hashes.get(str(lora.get('path')), 'sha256 unknown')}")
    return lines


def unet_batch_text(unet_batch: dict[str, Any] | None) -> str | None:
    """'2 (auto)' or '8 (max_batch)': the UNet samples per call a render used, and what chose it."""
    if not unet_batch:
        return None
    return f"{unet_batch['samples_per_call']} ({'auto' if unet_batch.get('auto') else 'max_batch'})"


def model_lines(found: list[tuple[str, str, int, str | None, str]]) -> list[str]:
    """`models`' lines: repo id, revision, size, family (sd, sdxl), whether it loads; tab-separated for cut
    and awk."""
    return [
        f"{repo_id}\t{revision[:12]}\t{size_bytes / GIB:.1f} GB\t{family}\t"
        f"{'ok' if problem is None else f'cannot load: {problem}'}"
        for repo_id, revision, size_bytes, problem, family in found
    ]


def smoke_table(results, title: str) -> Table:
    """`smoke`'s table: one row per scene, with the model it rendered on, its size, seconds and verdict
    (skipped, and why, for a scene that needs files that are not there)."""
    table = Table(title=title)
    for column in ("scene", "model", "size", "seconds", "result"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for result in results:
        verdict = (f"skipped: {result.skipped}" if result.skipped else
                   "ok" if result.problem is None else f"FAILED: {result.problem}")
        table.add_row(result.scene, result.model or "-", result.size, f"{result.seconds:.1f}", verdict)
    return table


def save_scene_file(record: dict[str, Any], image: Path, target: Path) -> Path:
    """Write the PNG's scene as a YAML file at `target`, ready to edit and render from there."""
    scene = rebase_paths(record["scene"], record_base_dir(record, image), Path(target).parent)
    text = f"# the scene of {Path(image).name}, written by multidiff inspect --save-scene\n"
    text += yaml.safe_dump(scene, sort_keys=False, allow_unicode=True, default_flow_style=None)
    return write_atomic(Path(target), lambda handle: handle.write(text.encode("utf-8")))
