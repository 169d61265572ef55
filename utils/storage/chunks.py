"""Results written in numbered chunks beside a manifest of the settings that made them: what makes long generation
resumable (the teacher's own text, HumanEval replies).

Each chunk is written under a temporary name (``<chunk>.tmp.<host>.<pid>.<random>``) and renamed when complete, so a
killed run leaves no partial chunk under a chunk's name (and a later run removes what dead writers left). A run with
the same settings skips the chunks that are there; one with other settings is refused in one line naming the
differences (``force`` removes the old chunks and starts over).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from models.staging import write_staged
from ..errors import SettingError


class ChunkFolder:
    """``folder``'s chunks ``pattern.format(k)`` (e.g. ``chunk-{:05d}.jsonl``), written with ``settings`` (recorded in
    ``manifest``). ``what`` names the contents in the refusal; ``ignore``: settings keys that may differ (a path the
    same input was read from); ``hint``: how the caller starts over."""

    def __init__(self, folder: str | Path, settings: dict[str, Any], *, manifest: str, pattern: str, what: str,
                 force: bool = False, ignore: Iterable[str] = (),
                 hint: str = "use another `out`, or `force` to write it anew"):
        self.folder, self.pattern = Path(folder), pattern
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / manifest
        if path.is_file():
            found = json.loads(path.read_text())
            skip = set(ignore)
            differ = sorted(k for k in set(found) | set(settings) if k not in skip and found.get(k) != settings.get(k))
            if not differ:
                return
            if not force:
                raise SettingError(f"'{self.folder}' holds {what} written with other settings ("
                                   + ", ".join(f"{k}: {found.get(k)} there, {settings.get(k)} now"
                                               for k in differ[:4]) + f"); {hint}")
            head, _, rest = pattern.partition("{")
            for old in self.folder.glob(head + "*" + rest.partition("}")[2]):
                old.unlink()
        write_staged({path: json.dumps(settings, indent=2, sort_keys=True) + "\n"})

    def path(self, k: int) -> Path:
        return self.folder / self.pattern.format(k)

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def write(self, k: int, text: str) -> None:
        write_staged({self.path(k): text})

    def read(self, k: int) -> str:
        return self.path(k).read_text(encoding="utf-8")
