"""Domain errors. Library code raises these; only cli.py turns them into messages and exit codes."""
from __future__ import annotations


class MultidiffError(Exception):
    """Base class of every error multidiff reports to the user without a traceback."""

    exit_code = 1


class SceneError(MultidiffError):
    """The user's scene is wrong. Carries one line per problem, already formatted."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = [one_line(problem) for problem in problems]
        super().__init__("\n".join(self.problems))

    def __reduce__(self):  # pickled whole (a distributed batch gathers failures), not as one string
        return type(self), (self.problems,)


def one_line(text: str) -> str:
    """A message on one line: newlines and other control characters (from keys, paths, YAML) escaped."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


class UsageError(MultidiffError):
    """A command-line value the user gave is wrong (bad --device, --dtype, ...)."""

    exit_code = 2


class ModelNotFound(MultidiffError):
    """The model could not be found locally and could not be downloaded."""


class ModelError(MultidiffError):
    """The model was found but cannot be used (pickle-only weights, wrong shape, ...)."""


class LoraError(MultidiffError):
    """A LoRA file the scene names cannot be used: a pickle without --allow-pickle, unreadable, or not a
    LoRA of this model (another family or shape). Exit 2: the scene's input is wrong, like a bad mask."""

    exit_code = 2


class ControlError(MultidiffError):
    """A ControlNet or IP-Adapter the scene names cannot be used once loaded: pickled without --allow-pickle, or
    made for another family or size. Exit 2, one line per problem (each behind `error:`), before sampling."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = [one_line(problem) for problem in problems]
        super().__init__("\n".join(self.problems))

    def __reduce__(self):
        return type(self), (self.problems,)


class OutputError(MultidiffError):
    """An output file cannot be written (no permission, disk full, ...)."""


class TooLarge(MultidiffError):
    """The render would need more memory than the device has."""

    exit_code = 2


class RenderError(MultidiffError):
    """The render itself failed (NaN latents, out of GPU memory, ...)."""


class PictureError(MultidiffError, ValueError):
    """An input picture (init image, mask, keep mask) that cannot be used; the message names the file and why."""

    exit_code = 2


class MetadataError(MultidiffError):
    """A PNG given as input is missing, unreadable, or holds no (or a malformed) multidiff record."""

    exit_code = 2


class BenchError(MultidiffError):
    """A benchmark path failed in its process."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a batch, with what it leaves, so the message is true: `written`, the pictures finished
    (their paths already printed); `left`, the files of the picture at hand (its step previews, or the
    picture itself when the interrupt came while its animation was written)."""

    def __init__(self, left: list, written: list | None = None, picture=None):
        super().__init__()
        self.left, self.written, self.picture = left, written or [], picture

    def __reduce__(self):
        return type(self), (self.left, self.written, self.picture)
