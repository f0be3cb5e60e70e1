"""Source text and spans: every IR node points back at the spec text it came from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Source:
    """One spec file's text."""

    name: str
    """Path as the user gave it (shown in messages)."""
    text: str = field(repr=False)
    """The whole file."""

    def line_starts(self) -> tuple[int, ...]:
        starts = [0]
        for i, ch in enumerate(self.text):
            if ch == "\n":
                starts.append(i + 1)
        return tuple(starts)


@dataclass(frozen=True, slots=True)
class Location:
    """A 1-based line and column in a named file."""

    name: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.name}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Span:
    """Half-open character range ``[start, end)`` of a :class:`Source`.

    Line and column are computed when asked for, never stored pre-formatted.
    """

    source: Source
    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.end <= len(self.source.text)):
            raise ValueError(f"span {self.start}..{self.end} outside {self.source.name}")

    def location(self) -> Location:
        text = self.source.text
        line = text.count("\n", 0, self.start) + 1
        line_start = text.rfind("\n", 0, self.start) + 1
        return Location(self.source.name, line, self.start - line_start + 1)

    @property
    def text(self) -> str:
        return self.source.text[self.start : self.end]

    def excerpt(self) -> str:
        """The first source line of the span with carets under the spanned part."""
        text = self.source.text
        line_start = text.rfind("\n", 0, self.start) + 1
        line_end = text.find("\n", self.start)
        if line_end == -1:
            line_end = len(text)
        # one cell per character: tabs, '\r', NUL and other unprintables show as spaces, carets stay aligned
        line = "".join(ch if ch.isprintable() else " " for ch in text[line_start:line_end])
        width = max(1, min(self.end, line_end) - self.start)
        lineno = text.count("\n", 0, self.start) + 1
        gutter = f"{lineno:>4} | "
        pad = " " * (len(gutter) - 2) + "| " + " " * (self.start - line_start)
        return f"{gutter}{line}\n{pad}{'^' * width}"
