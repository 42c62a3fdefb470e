"""Rank-0 progress on screen: a rich progress bar on a terminal, plain lines in logs."""

from __future__ import annotations

from .redact import terminal


class Reporter:
    """Rank-0 output: a rich progress bar on a terminal, plain lines otherwise (SLURM logs, pipes)."""

    def __init__(self, enabled: bool, total_steps: int, start_step: int):
        from rich.console import Console

        self.enabled = enabled
        self.console = Console(stderr=False)
        self.progress = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console,
            )
            self.task_id = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self.progress.start()

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        message = terminal(message)  # sample names and URLs: redacted, control characters escaped
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)

    def update(self, step: int, stats: str, line: str | None = None) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task_id, completed=step, stats=stats)
        elif line is not None:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
