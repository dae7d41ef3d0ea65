"""Every exception type the runner raises on purpose, and the helpers its messages share.

A `ConfigError` is the user's to fix (config, input, output directory): exit status 2.
A `JobFailedError` is a job that could not finish: exit status 1, committed shards kept.
"""

from __future__ import annotations

from collections.abc import Iterable

SHOW = 5  # items a message lists before "... and N more"


class ConfigError(ValueError):
    """A job config or its input is wrong; the message lists every problem and its fix."""

    def __init__(self, problems: list[str], title: str = "invalid job config"):
        self.problems = list(problems)
        self.title = title
        lines = [f"{title} ({len(self.problems)} problem{'s' * (len(self.problems) != 1)}):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class JobFailedError(RuntimeError):
    """The job could not finish (workers kept failing, no resources, the output taken over); committed
    shards stay, and the message says what happened and what to do."""


class RowFailedError(RuntimeError):
    """A row could not be generated even alone, and output.on_row_error=fail: the job stops on it."""


def first_line(e: BaseException, width: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:width]


def last_line(e: BaseException, width: int = 300) -> str:
    """The last non-empty line of an exception's message: where a Ray error says what was raised."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1][:width] if lines else type(e).__name__


def listing(items: Iterable[str], show: int = SHOW) -> str:
    """`a, b, c` or, past `show` items, `a, b, c, ... and 4 more`."""
    items = list(items)
    shown = ", ".join(items[:show])
    return shown + (f", ... and {len(items) - show} more" if len(items) > show else "")
