"""The terminal: stdout for the paths of written files and tables, stderr for progress, notes and errors
(what every command prints; turning errors into exit codes is the CLI edge's, cli/edge.py)."""
from __future__ import annotations

import os
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from ..errors import MultidiffError, SceneError

PIPE_WIDTH = 160  # tables written to a file or a CI log (not a terminal, no $COLUMNS): rich's 80 squeezes them


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


err = _console(stderr=True)
out = _console()


def say(lines: list[str], prefix: str = "") -> None:
    """Lines on stderr, as they are (no rich markup)."""
    for line in lines:
        err.print(f"{prefix}{line}", markup=False)


def print_path(path) -> None:
    """A written file's path on stdout: what scripts read."""
    out.print(str(path), markup=False)


def problem_lines(exc: MultidiffError) -> list[str]:
    """An error's problems, one a line, as the error says them."""
    return str(exc).splitlines() or [type(exc).__name__]


def error_lines(exc: MultidiffError, label: str | None = None) -> list[str]:
    """One line per problem: a scene's problems as they are (they name file, line and field), other
    errors behind `error:` (and the failed job's label, in a batch)."""
    lines = problem_lines(exc)
    if isinstance(exc, SceneError):
        return lines
    return [f"error: {label}: {line}" if label else f"error: {line}" for line in lines]


def print_summary(report) -> None:
    """A batch's end (a run.batch.BatchReport): the contact sheet's path; for several pictures, how
    many were rendered and one line per failure."""
    if report.grid:
        print_path(report.grid)
    if report.total > 1:
        also = f" ({report.skipped} already there, skipped)" if report.skipped else ""
        say([f"rendered {len(report.written) - report.skipped} of {report.total}{also}"])
        say([f"  failed: {f.label}: {problem_lines(f.error)[0]}" for f in report.failures])


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s", style="progress.data.speed")


class _Counted(ProgressColumn):
    """A column shown only once there is something to count (steps): while a job loads or encodes, its
    bar pulses beside what is happening, with no `0/?` and no rate."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task):
        return Text("") if task.total is None else self.column.render(task)


class ProgressDisplay:
    """Draws a batch's events on stderr: one bar for the job at hand (loading, encoding, step i/N),
    notes and failures printed above it. A job's bar is removed when it ends, before its picture's path
    is printed on stdout, so the path is a line of its own in a terminal too."""

    def __init__(self, quiet: bool = False, labelled_failures: bool = False):
        self.quiet, self.labelled_failures = quiet, labelled_failures
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), _Counted(MofNCompleteColumn()), _Counted(_RateColumn()),
            _Counted(TimeRemainingColumn()), console=err, disable=quiet or not err.is_terminal, transient=True,
        )
        self.task = None
        self.label = None

    def __enter__(self) -> ProgressDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event) -> None:
        """Handle one run.batch.Event."""
        if event.kind == "stage":  # a new job's first stage starts a fresh bar; later ones keep the count
            fresh = self.task is None or event.label != self.label
            self.label = event.label
            self._bar(f"{event.label}: {event.text}", completed=0 if fresh else None, total=None if fresh else False)
        elif event.kind == "step":
            self.label = event.label
            self._bar(event.label, completed=event.step, total=event.steps)
        elif event.kind == "written":
            self._end_bar()
            print_path(event.path)
        elif event.kind == "skipped":
            self._end_bar()
            say([f"skipped {event.path}: already rendered"])
        elif event.kind == "failed":
            self._end_bar()
            say(error_lines(event.failure.error, event.failure.label if self.labelled_failures else None))
        elif event.kind == "warning":
            say([event.text], "warning: ")
        elif event.kind == "note":
            say([event.text], "note: ")

    def _end_bar(self) -> None:
        """The job's bar off the terminal (transient: its line is cleared), until the next job's first event."""
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
            self.progress.stop()

    def _bar(self, description: str, completed: int | None, total: int | None | bool) -> None:
        """Show `description`; completed None and total False keep the bar's count as it is."""
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(description, total=None)
        if total is False:
            self.progress.update(self.task, description=description)
        else:
            self.progress.update(self.task, description=description, completed=completed, total=total)
        self.progress.refresh()  # every stage shown, however soon the next comes
