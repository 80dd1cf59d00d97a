"""The CLI edge: domain errors and Click's usage errors -> one line each and an exit code, plain help,
and the environment read once ($MULTIDIFF_MODEL, $MULTIDIFF_DEVICE)."""
from __future__ import annotations

import os
from contextlib import contextmanager

import typer
from typer.core import TyperCommand

from ..catalog import DEFAULT_MODEL
from ..errors import MultidiffError, one_line
from ..output.console import error_lines, say


def env_device(device: str | None) -> dict:
    """The device settings: --device, else $MULTIDIFF_DEVICE, with where the value came from."""
    if device or not os.environ.get("MULTIDIFF_DEVICE"):
        return {"device": device, "device_source": "--device"}
    return {"device": os.environ["MULTIDIFF_DEVICE"], "device_source": "$MULTIDIFF_DEVICE"}


def env_named_model() -> str | None:
    """$MULTIDIFF_MODEL, if set."""
    return os.environ.get("MULTIDIFF_MODEL") or None


def env_model() -> str:
    """The model of scenes that name none: $MULTIDIFF_MODEL, else the default."""
    return env_named_model() or DEFAULT_MODEL


@contextmanager
def user_errors():
    """Domain errors -> one line each on stderr and their exit code (2 bad input, 1 runtime); Ctrl-C -> 130."""
    try:
        yield
    except MultidiffError as exc:
        say(error_lines(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        say([interrupted_line(exc)])
        raise typer.Exit(130) from None


def interrupted_line(exc: KeyboardInterrupt) -> str:
    """What Ctrl-C left, exactly: the pictures written before (their paths were printed), the picture at
    hand (written, or not), and its step previews."""
    written, left, picture = getattr(exc, "written", []), getattr(exc, "left", []), getattr(exc, "picture", None)
    parts = []
    if written:
        parts.append(f"{len(written)} picture{'' if len(written) == 1 else 's'} written before (printed above)")
    if picture is not None:
        parts.append(f"{picture} was written, its animation was not")
    elif left:
        parts.append("the picture at hand was not written")
    if left:
        parts.append(f"{len(left)} step preview{' remains' if len(left) == 1 else 's remain'} in {left[0].parent}/")
    return "interrupted: " + ("; ".join(parts) if parts else "no partial file was left")


class PlainHelpCommand(TyperCommand):
    """Help as people read it: `SCENE...` and `[PATH]`, not `{SCENE}...` with `<list[Path]>` beside it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument":
                name = (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")
                param.display_type_rich = lambda ctx: None
                param._rich_display_name = lambda name=name: name
                param._usage_display_name = lambda name=name, req=param.required: name if req else f"[{name}]"


def run_command(command) -> int:
    """Run the Click command of the app; its exit code. Click's usage errors are one line too, exit 2."""
    try:
        code = command.main(prog_name="multidiff", standalone_mode=False)
    except typer.Abort:
        say(["interrupted"])
        code = 130
    except Exception as exc:  # Click's usage errors (typer vendors Click: matched by what they carry)
        line = usage_error_line(exc)
        if line is None:
            raise
        say([line])
        code = 2
    return code or 0


def usage_error_line(exc: Exception) -> str | None:
    """Click's usage error (bad option, out-of-range value, unknown command) as one line, or None when
    `exc` is none. A bare `multidiff` shows the help."""
    if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
        return None
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":
        return ctx.get_help() if ctx else exc.format_message()
    hint = f" (see: {ctx.command_path} --help)" if ctx else ""
    return f"error: {one_line(exc.format_message())}{hint}"
