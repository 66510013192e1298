"""Progress bars for passes that walk tensors (rich), silenced with ``quiet=True`` or COMPRESS_QUIET=1."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

# Progress goes to stderr so stdout stays clean for tables and JSON that users pipe.
console = Console(stderr=True)


def quiet_default() -> bool:
    return os.environ.get("COMPRESS_QUIET", "") not in ("", "0")


def track(items: Iterable[T], description: str, total: int | None = None, quiet: bool | None = None) -> Iterator[T]:
    quiet = bool(quiet) or quiet_default()
    if quiet:
        yield from items
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            progress.advance(task)
