"""The one error every level may raise for settings, and how library messages name a setting.

A message names a setting by its field, in backquotes: a keyword argument of ``utils.api`` or a field of one of the
configuration dataclasses, e.g. "`seq_len` must be at least 3". The command line (``utils.cli.run``) shows the flag
instead ("--seq-len must be at least 3"), so the same check serves both.
"""
from __future__ import annotations


class SettingError(ValueError):
    """Settings that are valid one by one but not together, or not for this teacher (on the command line: exit 2,
    like a bad flag)."""
