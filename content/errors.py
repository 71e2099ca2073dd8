"""Errors raised by the content engine.

ContentError
 ├── InvalidContent   a bundle, document or rule failed validation; carries every Problem
 └── InvalidViewer    a viewer input that cannot be normalised (an unknown time zone, ...)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input, and the JSON path of where it is."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ContentError(Exception):
    """Base of every error the content engine raises."""


class InvalidContent(ContentError):
    """Validation failed; ``problems`` lists every error found, each with its path."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        summary = "; ".join(str(p) for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} problem(s): {summary}{more}")


class InvalidViewer(ContentError):
    """A viewer field that cannot be used; ``path`` names it (``viewer.timezone``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")
