"""The bad-files report of a folder run: which inputs were skipped and why, as CSV or Markdown."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from medlens.io.atomic import write_text
from medlens.io.loaded import first_line


@dataclass
class BadFilesReport:
    """(path, reason) pairs collected while a folder run goes on with the readable inputs."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str | Path, reason: str | BaseException) -> None:
        text = first_line(reason) if isinstance(reason, BaseException) else str(reason).strip()
        prefix = f"{path}: "
        self.entries.append((str(path), text[len(prefix):] if text.startswith(prefix) else text))

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "reason"])
        writer.writerows(self.entries)
        return buffer.getvalue()

    def to_markdown(self) -> str:
        lines = [f"# Bad files ({len(self.entries)})", "", "| path | reason |", "|---|---|"]
        lines += [f"| {_cell(path)} | {_cell(reason)} |" for path, reason in self.entries]
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write the report atomically: Markdown for ``.md``, CSV otherwise."""
        path = Path(path)
        text = self.to_markdown() if path.suffix.lower() in (".md", ".markdown") else self.to_csv()
        return write_text(path, text, overwrite=overwrite)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_bad_files(path: str | Path, entries: list[tuple[str | Path, str | BaseException]]) -> Path:
    """Write ``entries`` (path, reason or error) as a CSV or Markdown report at ``path``."""
    report = BadFilesReport()
    for file, reason in entries:
        report.add(file, reason)
    return report.write(path)
