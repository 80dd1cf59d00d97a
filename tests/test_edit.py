"""multidiff edit (issue 24) through Starlette's test client: the token and Host refusals, valid changes
written atomically with the file's comments and key order, invalid ones answered with validate's own
message and the file left as it was, path escapes refused, a change made on disk seen, uploads checked as
render checks pictures, and the live preview on tiny-random (64 px, 2 steps): its step pictures streamed,
an older preview cancelled by a newer change."""
from __future__ import annotations

import base64
import copy
import difflib
import io
import json
import os
import re
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("starlette", reason="multidiff edit needs the editor extra: pip install -e '.[edit,test]'")
pytest.importorskip("ruamel.yaml", reason="multidiff edit needs the editor extra: pip install -e '.[edit,test]'")
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx (the editor extra has it)")

from starlette.testclient import TestClient  # noqa: E402

from multidiff_cli.edit import preview as preview_module  # noqa: E402
from multidiff_cli.edit.scenefile import indentation, merged_text  # noqa: E402
from multidiff_cli.edit.server import create_app  # noqa: E402
from multidiff_cli.edit.session import Editor  # noqa: E402
from multidiff_cli.run.batch import RunSettings  # noqa: E402

PORT = 8765
TOKEN = "test-token"
BASE_URL = f"http://127.0.0.1:{PORT}"
AUTH = {"X-Multidiff-Token": TOKEN}

# scenes/living_room.yaml at 64x64: its comments, its key order, three boxes
SCENE = """\
# The living room, small: a sofa in the centre,
# a plant on the left and a painting at the top right.
prompt: a cozy living room, warm evening light   # the whole picture
negative_prompt: blurry, low quality
width: 64
height: 64
steps: 2
tiled_decode: no               # YAML 1.1's false: stays as written
guidance_scale: 7.5
seed: 42
regions:
  - prompt: a red velvet sofa
    box: [16, 32, 48, 56]      # x0, y0, x1, y1 in pixels, origin top-left
  - prompt: a houseplant
    box: [0, 16, 16, 64]
  # the painting
  - prompt: a framed painting
    box: [40, 0, 64, 24]
"""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """tiny-random at 64 px gains nothing from a second thread, and on a busy 2-core machine two threads
    spinning for each other made a UNet call 100 times slower (measured: 1.6 s against 0.015 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scene_file(tmp_path) -> Path:
    path = tmp_path / "room.yaml"
    path.write_text(SCENE, encoding="utf-8")
    return path


@pytest.fixture
def editor_for():
    """editor_for(path, **options) -> (editor, client); every editor stops at the end of the test."""
    made = []

    def make(path: Path, **options):
        options = {"model": "tiny-random", "preview_steps": 2, "debounce_s": 0.0, **options}
        editor = Editor(path, RunSettings(device="cpu"), **options)
        made.append(editor)
        client = TestClient(create_app(editor, TOKEN, PORT), base_url=BASE_URL, headers=AUTH)
        return editor, client

    yield make
    for editor in made:
        editor.stop()


def changed(snapshot: dict, edit) -> dict:
    data = copy.deepcopy(snapshot["data"])
    edit(data)
    return data


def put(client, snapshot, data, regions_from=None):
    regions = data.get("regions") or []
    body = {"base": snapshot["base"], "scene": data,
            "regions_from": regions_from if regions_from is not None else list(range(len(regions)))}
    return client.put("/api/scene", json=body)


def events(client, until="final,problem,off", seconds=60, start=None):
    """The server-sent events of one stream, as dicts, until one of `until` (or `seconds`)."""
    found = []
    with client.stream("GET", f"/api/events?until={until}&seconds={seconds}") as response:
        assert response.status_code == 200
        if start:
            start()
        for line in response.iter_lines():
            if line.startswith("data: "):
                found.append(json.loads(line[len("data: "):]))
    return found


def picture(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


# --- the door: token and Host ------------------------------------------------------------------------------


@pytest.mark.parametrize("headers, query, status", [
    ({}, "", 403),
    ({"X-Multidiff-Token": "wrong"}, "", 403),
    ({}, "?token=wrong", 403),
    ({}, f"?token={TOKEN}", 200),
    (AUTH, "", 200),
    ({**AUTH, "Host": "evil.example"}, "", 403),  # DNS rebinding: a name that resolves to 127.0.0.1
    ({**AUTH, "Host": f"evil.example:{PORT}"}, "", 403),
    ({**AUTH, "Host": "127.0.0.1:9999"}, "", 403),
    ({**AUTH, "Host": f"localhost:{PORT}"}, "", 200),
])
def test_every_request_needs_the_token_and_the_editors_own_host(scene_file, editor_for, headers, query, status):
    _, client = editor_for(scene_file)
    client.headers.clear()
    for path in ("/", "/api/scene", "/static/editor.js", "/api/overlay/0"):
        response = client.get(path + query, headers=headers)
        if status == 403:
            assert response.status_code == 403, path
            assert "refused" in response.text and "Traceback" not in response.text
        else:
            assert response.status_code != 403, path


def test_the_page_carries_its_token_and_asks_nothing_of_the_network(scene_file, editor_for):
    _, client = editor_for(scene_file)
    page = client.get("/")
    assert page.status_code == 200 and f'content="{TOKEN}"' in page.text
    assert page.headers["referrer-policy"] == "no-referrer" and "frame-ancestors 'none'" in page.headers[
        "content-security-policy"]
    folder = Path(preview_module.__file__).parent / "static"
    for name in ("index.html", "editor.js", "editor.css"):
        assert not re.search(r"(https?:)?//[a-z0-9]", (folder / name).read_text(), re.I), f"{name} names another host"
    assert client.get("/static/editor.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/../session.py").status_code == 404


# --- writing the file --------------------------------------------------------------------------------------


def test_a_box_dragged_is_written_at_once_with_every_comment_and_the_key_order(scene_file, editor_for):
    _, client = editor_for(scene_file)
    before = client.get("/api/scene").json()
    assert before["valid"] and before["canvas"] == [64, 64] and before["snap_px"] == 8
    inode = scene_file.stat().st_ino

    data = changed(before, lambda d: d["regions"][0].update(box=[24, 32, 56, 56]))
    answer = put(client, before, data)
    assert answer.status_code == 200 and answer.json()["written"]
    text = scene_file.read_text()
    diff = [line for line in difflib.unified_diff(SCENE.splitlines(), text.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert diff == ["-    box: [16, 32, 48, 56]      # x0, y0, x1, y1 in pixels, origin top-left",
                    "+    box: [24, 32, 56, 56]      # x0, y0, x1, y1 in pixels, origin top-left"]
    # atomic: a new file renamed over the old one, no temporary file left beside it
    assert scene_file.stat().st_ino != inode
    assert sorted(p.name for p in scene_file.parent.iterdir()) == ["room.yaml"]
    assert answer.json()["base"] != before["base"] and answer.json()["data"] == data


def test_regions_added_and_deleted_keep_the_others_comments(scene_file, editor_for):
    _, client = editor_for(scene_file)
    before = client.get("/api/scene").json()

    def edit(d):
        del d["regions"][1]
        d["regions"].append({"prompt": "a lamp", "box": [0, 0, 16, 16]})
        d["regions"][0]["guidance_scale"] = 9
        d["seed"] = 7

    answer = put(client, before, changed(before, edit), regions_from=[0, 2, None])
    assert answer.status_code == 200, answer.json()
    text = scene_file.read_text()
    assert "houseplant" not in text
    assert "    box: [16, 32, 48, 56]      # x0, y0, x1, y1 in pixels, origin top-left\n    guidance_scale: 9\n" in text
    assert "  # the painting\n  - prompt: a framed painting\n" in text
    assert text.endswith("  - prompt: a lamp\n    box: [0, 0, 16, 16]\n")
    assert "tiled_decode: no               # YAML 1.1's false: stays as written" in text
    assert text.startswith("# The living room, small")
    keys = [line.split(":")[0] for line in text.splitlines() if re.match(r"^[a-z_]+:", line)]
    assert keys == ["prompt", "negative_prompt", "width", "height", "steps", "tiled_decode", "guidance_scale", "seed",
                    "regions"]


def test_an_invalid_change_answers_validates_message_beside_its_field_and_leaves_the_file(scene_file, editor_for, cli):
    _, client = editor_for(scene_file)
    before = client.get("/api/scene").json()
    answer = put(client, before, changed(before, lambda d: d["regions"][0].update(box=[96, 32, 128, 56])))
    assert answer.status_code == 422
    assert scene_file.read_text() == SCENE
    (problem,) = answer.json()["problems"]
    assert problem["field"] == "regions[0].box" and problem["line"] == 13
    # the very line validate prints for the same scene
    scene_file.write_text(SCENE.replace("[16, 32, 48, 56]", "[96, 32, 128, 56]"))
    result = cli("validate", scene_file)
    assert result.exit_code == 2
    assert problem["text"] == result.stderr.strip()
    assert problem["message"] == "box [96, 32, 128, 56] lies outside the 64x64 canvas"


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["regions"][0].update(box=None, mask="../outside.png"), "regions[0].mask"),
    (lambda d: d["regions"][0].update(box=None, mask="/etc/hostname"), "regions[0].mask"),
    (lambda d: d["regions"][0].update(box=None, mask="~/mask.png"), "regions[0].mask"),
    (lambda d: d["regions"][0].update(box=None, mask="link/mask.png"), "regions[0].mask"),  # a symlink out
    (lambda d: d.update(init_image="../../photo.png"), "init_image"),
    (lambda d: d.update(loras=["/tmp/style.safetensors"]), "loras[0].path"),
    (lambda d: d.update(model="../models/sd"), "model"),
])
def test_files_outside_the_scenes_folder_are_refused(scene_file, editor_for, tmp_path_factory, edit, field):
    outside = tmp_path_factory.mktemp("outside")
    Image.new("L", (64, 64), 255).save(outside / "mask.png")
    (scene_file.parent / "link").symlink_to(outside, target_is_directory=True)
    _, client = editor_for(scene_file)
    before = client.get("/api/scene").json()
    data = changed(before, edit)
    for region in data["regions"]:
        if region.get("box") is None:
            region.pop("box", None)
    answer = put(client, before, data)
    assert answer.status_code == 422 and scene_file.read_text() == SCENE
    (problem,) = answer.json()["problems"]
    assert problem["field"] == field and "scene's folder" in problem["message"]


def test_pictures_are_served_from_below_the_scenes_folder_only(scene_file, editor_for, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    Image.new("RGB", (64, 64), "red").save(outside / "photo.png")
    (scene_file.parent / "pictures").mkdir()
    Image.new("RGB", (64, 64), "blue").save(scene_file.parent / "pictures" / "photo.png")
    (scene_file.parent / "pictures" / "out.png").symlink_to(outside / "photo.png")
    (scene_file.parent / "notes.txt").write_text("secret")
    _, client = editor_for(scene_file)
    shown = client.get("/api/picture", params={"path": "pictures/photo.png"})
    assert shown.status_code == 200 and Image.open(io.BytesIO(shown.content)).getpixel((0, 0))[:3] == (0, 0, 255)
    for name in ("../" + outside.name + "/photo.png", str(outside / "photo.png"), "pictures/out.png", "notes.txt",
                 "pictures/../../x.png"):
        refused = client.get("/api/picture", params={"path": name})
        assert refused.status_code in (403, 404) and "secret" not in refused.text, name


def png(size=(64, 64), fill=255, mode="L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, fill).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_pass_renders_picture_checks_and_never_replace_a_file(scene_file, editor_for, monkeypatch):
    _, client = editor_for(scene_file)
    first = client.post("/api/upload?kind=mask&name=sofa.png", content=png())
    second = client.post("/api/upload?kind=mask&name=sofa.png", content=png())
    assert first.json() == {"ok": True, "path": "masks/sofa.png"} and second.json()["path"] == "masks/sofa-2.png"
    assert (scene_file.parent / "masks" / "sofa.png").read_bytes() == png()
    picture_path = client.post("/api/upload?kind=init_image&name=../../photo.png", content=png(mode="RGB")).json()
    assert picture_path == {"ok": True, "path": "pictures/photo.png"}

    refusals = {
        "kind=mask&name=empty.png": (png(fill=0), "the mask is empty"),
        "kind=mask&name=text.png": (b"not a picture", "not an image Pillow can read"),
        "kind=mask&name=notes.txt": (png(), "picture"),
        "kind=init_image&name=tiny.png": (png((16, 16), mode="RGB"), "too small"),
        "kind=script&name=a.png": (png(), "an upload is a mask or an init_image"),
    }
    for query, (body, words) in refusals.items():
        answer = client.post(f"/api/upload?{query}", content=body)
        assert answer.status_code == 422 and words in answer.json()["message"], query
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the bomb guard, at a size a test can send
    bomb = client.post("/api/upload?kind=mask&name=bomb.png", content=png())
    assert bomb.status_code == 422 and "too many pixels" in bomb.json()["message"]
    names = sorted(p.name for p in (scene_file.parent / "masks").iterdir())
    assert names == ["sofa-2.png", "sofa.png"]  # nothing refused was kept, no temporary file left


def test_uploads_refuse_a_folder_that_is_a_symlink_out(scene_file, editor_for, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (scene_file.parent / "masks").symlink_to(outside, target_is_directory=True)
    _, client = editor_for(scene_file)
    answer = client.post("/api/upload?kind=mask&name=sofa.png", content=png())
    assert answer.status_code == 422 and "scene's folder" in answer.json()["message"]
    assert list(outside.iterdir()) == []


def test_a_mask_region_is_drawn_in_its_colour_for_the_page(scene_file, editor_for):
    (scene_file.parent / "masks").mkdir()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 16, 40, 48))
    mask.save(scene_file.parent / "masks" / "rug.png")
    scene_file.write_text(SCENE + "  - prompt: a rug\n    mask: masks/rug.png\n")
    _, client = editor_for(scene_file)
    snapshot = client.get("/api/scene").json()
    assert snapshot["masks"] == {"3": {"bbox": [8, 16, 40, 48], "overlay": True}}
    overlay = Image.open(io.BytesIO(client.get("/api/overlay/3").content))
    assert overlay.mode == "RGBA" and overlay.getpixel((20, 20))[3] > 0 and overlay.getpixel((2, 2))[3] == 0
    assert client.get("/api/overlay/0").status_code == 404  # a box: nothing to overlay


# --- the file changed elsewhere --------------------------------------------------------------------------


def test_a_change_made_on_disk_is_seen_and_an_edit_based_on_the_old_file_is_refused(scene_file, editor_for):
    editor, client = editor_for(scene_file)
    before = client.get("/api/scene").json()
    scene_file.write_text(SCENE.replace("a red velvet sofa", "a green sofa"))
    found = events(client, until="reloaded", seconds=10)
    assert found[-1]["kind"] == "reloaded" and found[-1]["data"]["regions"][0]["prompt"] == "a green sofa"
    answer = put(client, before, changed(before, lambda d: d.update(seed=1)))
    assert answer.status_code == 409 and "changed on disk" in answer.json()["conflict"]
    assert "a green sofa" in scene_file.read_text() and "seed: 42" in scene_file.read_text()

    scene_file.write_text("prompt: [unclosed\n")  # mid-edit in a text editor: shown, not overwritten
    snapshot = client.get("/api/scene").json()
    assert not snapshot["valid"] and "YAML error" in snapshot["problems"][0]["message"]
    assert put(client, snapshot, {"prompt": "x"}).status_code == 422
    assert scene_file.read_text() == "prompt: [unclosed\n"


def test_no_traceback_reaches_the_page(scene_file, editor_for, monkeypatch):
    editor, _ = editor_for(scene_file)
    monkeypatch.setattr(editor, "snapshot", lambda: 1 / 0)
    client = TestClient(create_app(editor, TOKEN, PORT), base_url=BASE_URL, headers=AUTH, raise_server_exceptions=False)
    answer = client.get("/api/scene")
    assert answer.status_code == 500
    assert "Traceback" not in answer.text and "ZeroDivision" not in answer.text and "terminal" in answer.text
    assert client.put("/api/scene", content=b"{not json").status_code == 400


# --- the live preview --------------------------------------------------------------------------------------


def test_the_preview_streams_each_steps_picture_then_the_final_one(scene_file, editor_for):
    editor, client = editor_for(scene_file)
    found = events(client, start=editor.start)
    steps = [e for e in found if e["kind"] == "step"]
    assert [(e["step"], e["steps"]) for e in steps] == [(1, 2), (2, 2)]
    assert found[-1]["kind"] == "final" and found[-1]["model"] == "tiny-random" and found[-1]["seed"] == 42
    for event in steps + found[-1:]:
        assert picture(event["image"]).size == (64, 64)
    # a page that opens later gets the latest picture at once
    late = events(client, until="final")
    assert late[-1]["image"] == found[-1]["image"]


def test_a_newer_change_cancels_the_preview_in_flight_at_its_next_step(scene_file, editor_for, monkeypatch):
    editor, client = editor_for(scene_file)
    held, go = threading.Event(), threading.Event()
    real = preview_module.render

    def held_after_first_step(scene, model, seed, plan=None, callback=None, **kwargs):
        def step(i, n, latents, denoised):
            callback(i, n, latents, denoised)
            if not go.is_set():
                held.set()
                go.wait(30)
        return real(scene, model, seed, plan=plan, callback=step, **kwargs)

    monkeypatch.setattr(preview_module, "render", held_after_first_step)
    before = client.get("/api/scene").json()

    def start():
        editor.start()
        assert held.wait(60), "the first preview never reached its first step"
        answer = put(client, before, changed(before, lambda d: d.update(prompt="a bright kitchen")))
        assert answer.status_code == 200
        go.set()

    found = events(client, start=start)
    kinds = [(e["kind"], e.get("generation"), e.get("step")) for e in found if e["kind"] != "state"]
    assert kinds == [("step", 1, 1), ("cancelled", 1, None), ("step", 2, 1), ("step", 2, 2), ("final", 2, None)]


def test_the_render_button_writes_the_png_as_render_does_and_replaces_none(scene_file, editor_for, monkeypatch):
    from multidiff_cli.output.png import read_metadata

    monkeypatch.chdir(scene_file.parent)
    editor, client = editor_for(scene_file)

    def render():
        editor.previewer.start()  # no preview first: the render alone
        assert client.post("/api/render").json() == {"ok": True}

    found = events(client, until="written,render-failed", start=render)
    assert found[-1]["kind"] == "written", found[-1]
    assert [e["step"] for e in found if e["kind"] == "render-step"] == [1, 2]  # the scene's own 2 steps
    written = Path(found[-1]["path"])
    assert written == Path("outputs/room-42.png") and read_metadata(written)["scene"]["regions"][0]["box"] == [16, 32, 48, 56]
    again = events(client, until="written,render-failed", start=lambda: client.post("/api/render"))
    assert again[-1]["kind"] == "written" and again[-1]["path"] == "outputs/room-42-2.png"


def test_without_a_usable_model_the_editor_edits_and_says_why_there_is_no_preview(scene_file, editor_for):
    editor, client = editor_for(scene_file, model=str(scene_file.parent / "no-such-model"))
    found = events(client, start=editor.start)
    assert found[-1]["kind"] in ("off", "problem") and "no-such-model" in json.dumps(found[-1])
    before = client.get("/api/scene").json()
    assert put(client, before, changed(before, lambda d: d.update(seed=3))).status_code == 200
    assert "seed: 3" in scene_file.read_text()


# --- the round-trip writer on its own, and the command -------------------------------------------------------


def test_every_example_scene_keeps_its_layout_when_one_value_changes():
    import yaml

    for path in sorted(Path(__file__).resolve().parents[1].glob("scenes/**/*.yaml")):
        text = path.read_text(encoding="utf-8")
        old = yaml.safe_load(text)
        new = copy.deepcopy(old)
        new["prompt"] = "changed"
        out = merged_text(text, old, new)
        assert yaml.safe_load(out) == new, path.name
        assert sum(a != b for a, b in zip(text.splitlines(), out.splitlines())) == 1, path.name
        assert len(text.splitlines()) == len(out.splitlines()), path.name
    assert indentation("a: 1\nregions:\n- prompt: x\n  box: [1, 2, 3, 4]\n") == (2, 2, 0)  # PyYAML's own dumps


def test_edit_without_the_extra_is_one_line_exit_2(cli, monkeypatch, scene_file):
    for name in [m for m in sys.modules if m == "multidiff_cli.edit" or m.startswith("multidiff_cli.edit.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "starlette", None)  # as if it were not installed
    result = cli("edit", scene_file, "--no-browser")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: multidiff edit needs the editor extra: pip install 'multidiff[edit]'"


def test_edit_opens_a_new_file_from_the_starter_scene_and_a_pngs_scene_beside_it(tmp_path, cli):
    from multidiff_cli.edit import scene_to_edit

    told = []
    new = scene_to_edit(tmp_path / "new.yaml", told.append)
    assert new.read_text().startswith("# A multidiff scene.") and "starter scene" in told[-1]
    assert cli("edit", tmp_path / "notes.txt", "--no-browser").stderr.strip().endswith("name ends in .yaml)")

    rendered = cli.render(new, "--size", "64x64", "--steps", "1", "--seed", "3", "-o", tmp_path / "out" / "room.png")
    assert rendered.exit_code == 0, rendered.stderr
    png_bytes = (tmp_path / "out" / "room.png").read_bytes()
    scene = scene_to_edit(tmp_path / "out" / "room.png", told.append)
    assert scene == tmp_path / "out" / "room.yaml" and "never into the picture" in told[-1]
    assert (tmp_path / "out" / "room.png").read_bytes() == png_bytes
    assert cli("validate", scene).exit_code == 0
    assert scene_to_edit(tmp_path / "out" / "room.png", told.append).name == "room-2.yaml"  # none replaced
    assert os.path.exists(tmp_path / "out" / "room.yaml")
