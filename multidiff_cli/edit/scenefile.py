"""The scene file written back with its comments, key order, quoting and layout: a round-trip YAML writer.

ruamel.yaml keeps what a person wrote (comments, key order, flow-style boxes, quotes) when it loads a
file and dumps it again; a PyYAML dump would drop every comment. The page sends the scene as plain
data; `merged_text` changes only the values that differ from what PyYAML (the loader `render` and
`validate` use) read from the file, so a value the page did not touch is written exactly as it was,
even where YAML 1.1 and 1.2 read it differently (`no`, `0o7`)."""
from __future__ import annotations

import io
import re
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

BOM = "\ufeff"


class EditRefused(ValueError):
    """A change that cannot be merged into the file (its text does not parse, regions moved around)."""


def merged_text(text: str, old: Any, new: Any, regions_from: list[int | None] | None = None) -> str:
    """`text` (a scene file) with the values of `new` written where they differ from `old`, what PyYAML
    read from `text`. regions_from[j]: the index in `old` of the page's region j (None for a new one), so
    a deleted region takes its own comments with it, not its neighbour's."""
    bom = text.startswith(BOM)
    body = text.removeprefix(BOM)
    yaml = _round_trip(body)
    try:
        tree = yaml.load(body)
    except YAMLError as exc:
        raise EditRefused(f"the file does not read as YAML here ({_first_line(exc)}): fix it in a text editor") from None
    if not isinstance(tree, CommentedMap) or not isinstance(old, dict) or not isinstance(new, dict):
        raise EditRefused("the file is not a mapping of keys: fix it in a text editor")
    if regions_from is not None:
        _align_regions(tree, old, new, regions_from)
    tree = _merge(tree, old, new)
    out = io.StringIO()
    yaml.dump(tree, out)
    written = out.getvalue()
    if "\r\n" in body:
        written = written.replace("\r\n", "\n").replace("\n", "\r\n")
    return (BOM if bom else "") + written


def _round_trip(text: str) -> YAML:
    """A round-trip loader and dumper with the file's own indentation."""
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 1 << 16  # never fold a long prompt onto new lines
    mapping, sequence, offset = indentation(text)
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    return yaml


def indentation(text: str) -> tuple[int, int, int]:
    """(mapping, sequence, offset) as ruamel.yaml's indent() takes them, read from the file's first nested
    mapping and first block sequence; multidiff's own scenes use 2, 4, 2 (`  - prompt:`), PyYAML's dumps 2, 2, 0."""
    mapping, sequence, offset = 2, 4, 2
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for parent, child in zip(lines, lines[1:]):
        if not re.match(r"^\s*[^\s#-][^#]*:\s*(#.*)?$", parent):
            continue
        outer = len(parent) - len(parent.lstrip())
        inner = len(child) - len(child.lstrip())
        if child.lstrip().startswith("- "):
            offset = max(0, inner - outer)
            sequence = offset + 2
            break
        if inner > outer:
            mapping = inner - outer
    return mapping, sequence, offset


def _same(old: Any, new: Any) -> bool:
    """Equal as the scene reads them: the page cannot tell 7 from 7.0, but it can tell true from 1."""
    if isinstance(old, bool) != isinstance(new, bool):
        return False
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same(old[key], new[key]) for key in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
        return False
    return old == new


def _merge(node: Any, old: Any, new: Any) -> Any:
    """`node` (ruamel's) with `new` written where it differs from `old` (PyYAML's reading of `node`)."""
    if _same(old, new):
        return node
    if isinstance(node, CommentedMap) and isinstance(old, dict) and isinstance(new, dict):
        for key in [key for key in node if key not in new]:
            del node[key]
        for key, value in new.items():
            node[key] = _merge(node[key], old[key], value) if key in node and key in old else fresh(value)
        return node
    if isinstance(node, CommentedSeq) and isinstance(old, list) and isinstance(new, list):
        del node[len(new):]
        for i, value in enumerate(new):
            if i < len(node) and i < len(old):
                node[i] = _merge(node[i], old[i], value)
            else:
                node.append(fresh(value))
        return node
    return fresh(new)


def _align_regions(tree: CommentedMap, old: dict, new: dict, regions_from: list[int | None]) -> None:
    """Delete the regions the page deleted and insert its new ones in `tree` and `old`, so the rest merge
    with their own (index by index after this)."""
    seq, before, after = tree.get("regions"), old.get("regions"), new.get("regions")
    if not isinstance(seq, CommentedSeq) or not isinstance(before, list) or not isinstance(after, list):
        return
    if len(regions_from) != len(after):
        raise EditRefused("regions_from must name one index (or null) per region")
    kept = [k for k in regions_from if k is not None]
    if kept != sorted(set(kept)) or any(not isinstance(k, int) or not 0 <= k < len(seq) for k in kept):
        raise EditRefused("regions may be added and deleted here, not reordered: reorder them in a text editor")
    for i in reversed(range(len(seq))):
        if i not in kept:
            del seq[i]
    aligned = [before[k] for k in kept]
    for j, k in enumerate(regions_from):
        if k is None:
            seq.insert(j, fresh(after[j]))
            aligned.insert(j, after[j])
    old["regions"] = aligned


def fresh(value: Any) -> Any:
    """A new value as the scene files write it: mappings in block style, lists of numbers (a box) in flow style."""
    if isinstance(value, dict):
        out = CommentedMap()
        for key, item in value.items():
            out[key] = fresh(item)
        return out
    if isinstance(value, list):
        out = CommentedSeq(fresh(item) for item in value)
        if all(not isinstance(item, (dict, list)) for item in value):
            out.fa.set_flow_style()
        return out
    return value


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
