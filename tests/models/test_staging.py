"""models/staging.py's write_staged: results files written whole or not at all (a map, results.json, chunks)."""
from __future__ import annotations

import errno
import os

import pytest

from models import staging
from models.staging import write_staged


def test_files_are_written_together_and_replace_old_ones(tmp_path):
    a, b = tmp_path / "run" / "plan.md", tmp_path / "run" / "plan.json"
    write_staged({a: "old table\n", b: '{"old": 1}'})
    write_staged({a: "new table\n", b: '{"new": 2}'})
    assert a.read_text() == "new table\n" and b.read_text() == '{"new": 2}'
    assert sorted(p.name for p in a.parent.iterdir()) == ["plan.json", "plan.md"]


def test_a_writer_stopped_part_way_leaves_the_old_files_whole(tmp_path, monkeypatch):
    a, b = tmp_path / "sensitivity.md", tmp_path / "sensitivity.json"
    write_staged({a: "old table\n", b: '{"old": 1}'})
    synced = []

    def full_disk_on_the_second_file(fd: int) -> None:
        synced.append(fd)
        if len(synced) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(staging.os, "fsync", full_disk_on_the_second_file)
    with pytest.raises(OSError, match="sensitivity.md") as caught:
        write_staged({a: "new table\n", b: '{"new": 2}'})
    assert caught.value.errno == errno.ENOSPC  # named after the result, as the scripts print it in one line
    assert a.read_text() == "old table\n" and b.read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensitivity.json", "sensitivity.md"]


def test_files_of_two_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="one folder"):
        write_staged({tmp_path / "a" / "x.json": "{}", tmp_path / "b" / "y.json": "{}"})
