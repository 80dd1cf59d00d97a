"""YAML with positions: parse a scene file safely, and point each problem at its file line and field."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import SceneError


def parse_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """Compose the file's node tree with PyYAML's SafeLoader (for line numbers and duplicate keys), and build its
    data from that tree with the same loader's constructor: what safe_load returns, the text parsed once."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SceneError([f"{path}: no such scene file"]) from None
    except IsADirectoryError:
        raise SceneError([f"{path}: is a directory, not a scene file"]) from None
    except OSError as exc:
        raise SceneError([f"{path}: cannot read ({exc.strerror})"]) from None
    picture = _picture_kind(raw)
    if picture:
        raise SceneError([f"{path}: not a scene file or a PNG written by multidiff: it is a {picture} picture "
                          "(give the scene it was rendered from, or a PNG multidiff wrote)"])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SceneError([f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = None if root is None else yaml.SafeLoader("").construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(filter(None, [exc.context, exc.problem]))
        raise SceneError([f"{where}: YAML error: {what}"]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (a control character, say)
        line = text[: exc.position].count("\n") + 1
        raise SceneError([f"{path}:{line}: YAML error: {exc.reason} (character {exc.character!r})"]) from None
    except yaml.YAMLError as exc:
        raise SceneError([f"{path}: YAML error: {exc}"]) from None
    except RecursionError:
        raise SceneError([f"{path}: YAML error: nested too deeply"]) from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError):
        # PyYAML raises these for a tagged value it cannot build (`!!int 96px`, `!!timestamp tomorrow`)
        loc, node = _unreadable_value(root)
        message = f"YAML error: {node.tag.rsplit(':', 1)[-1]} value {node.value!r} cannot be read"
        raise SceneError([format_problem(path, root, loc, message)]) from None
    if data is None:
        raise SceneError([f"{path}: the scene is empty; it needs at least `prompt: ...`"])
    if not isinstance(data, dict):
        raise SceneError([f"{path}:1: a scene is a mapping of keys (prompt:, regions:, ...), got a {type(data).__name__}"])
    duplicates = list(_duplicate_keys(root, ()))
    if duplicates:
        raise SceneError([format_problem(path, root, loc, "key appears more than once; keep one") for loc in duplicates])
    return data, root


_PICTURE_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF", b"BM": "BMP",
                  b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def _picture_kind(raw: bytes) -> str | None:
    """The kind of picture a file holds, by its first bytes (WebP: RIFF....WEBP), or None."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _PICTURE_MAGIC.items() if raw.startswith(magic)), None)


def _unreadable_value(root: yaml.Node) -> tuple[tuple, yaml.Node]:
    """The first scalar whose explicit tag PyYAML cannot construct, and where it is."""
    loader = yaml.SafeLoader("")
    stack: list[tuple[tuple, yaml.Node]] = [((), root)]
    seen: set[int] = set()
    while stack:
        loc, node = stack.pop(0)
        if id(node) in seen:  # an alias: already looked at
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack[:0] = [((*loc, key.value), value) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            stack[:0] = [((*loc, i), item) for i, item in enumerate(node.value)]
        else:
            try:
                loader.construct_object(node)
            except Exception:
                return loc, node
    return (), root


def _duplicate_keys(node: yaml.Node, loc: tuple, seen_nodes: set[int] | None = None):
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias: already checked (and following it again could explode)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if key.value in seen:
                yield (*loc, key.value)
            seen.add(key.value)
            yield from _duplicate_keys(value, (*loc, key.value), seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*loc, i), seen_nodes)


def line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """The 1-based line of the deepest node on `loc` (a mapping entry's key line)."""
    node, line = root, (root.start_mark.line + 1 if root else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            entries = [(k, v) for k, v in node.value if k.value == part]
            if not entries:
                break
            key, node = entries[-1]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(scene)"


def report(path: Path, root: yaml.Node | None, problems: list[tuple[tuple, str]], from_cli: set[str] = frozenset()) -> list[str]:
    """One line per problem, in file order; a value given on the command line has no line in the file."""
    lines = []
    for loc, message in problems:
        if loc and loc[0] in from_cli:
            lines.append((0, f"{path}: {field_path(loc)}: {message} (given on the command line)"))
        else:
            lines.append((line_of(root, loc) or 0, format_problem(path, root, loc, message)))
    return [text for _, text in sorted(lines, key=lambda item: item[0])]


def format_problem(path: Path, root: yaml.Node | None, loc: tuple, message: str) -> str:
    line = line_of(root, loc)
    return f"{path}:{line}: {field_path(loc)}: {message}" if line else f"{path}: {field_path(loc)}: {message}"
