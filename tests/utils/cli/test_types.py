"""The argparse types of utils/cli/types.py: numbers as a user types them."""
from __future__ import annotations

import pytest

from utils.cli.types import number


@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("1/3", 1 / 3), (" 2/4 ", 0.5), ("3e-1", 0.3)])
def test_numbers_as_typed(text, value):
    assert number(text) == value


@pytest.mark.parametrize("text", ["a", "1/0", "1/", "/3", ""])
def test_not_numbers(text):
    with pytest.raises(ValueError):
        number(text)
