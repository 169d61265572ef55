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


def test_train_text_spec(tmp_path):
    from utils.cli.types import train_text
    from utils.data.text import TrainText

    (tmp_path / "code").mkdir()
    assert train_text(f"code={tmp_path / 'code'}:2.5") == TrainText("code", str(tmp_path / "code"), 2.5)
    assert train_text(f"code={tmp_path / 'code'}") == TrainText("code", str(tmp_path / "code"), 1.0)
    assert str(TrainText("code", "d", 2.0)) == "code=d:2"  # how run records write it


@pytest.mark.parametrize("spec, match", [
    ("code=", "NAME=PATH"), ("=DIR", "NAME=PATH"), ("DIR", "NAME=PATH"), ("data=DIR", "the name 'data'"),
    ("code=DIR:0", "WEIGHT must be a finite number > 0"), ("code=DIR:-1", "WEIGHT must be"),
    ("code=DIR:nan", "WEIGHT must be"), ("code=DIR/missing:1", "neither a file nor a folder"),
])
def test_bad_train_text_specs_name_the_flag(tmp_path, spec, match):
    import argparse

    from utils.cli.types import train_text

    with pytest.raises(argparse.ArgumentTypeError, match=match) as e:
        train_text(spec.replace("DIR", str(tmp_path)))
    assert str(e.value).startswith("--train-text")


def test_duplicate_and_masked_lm_train_texts_end_in_one_line(tiny_teacher, tiny_corpus, tmp_path, capsys):
    from helpers import common_args, in_process

    argv = [*common_args(tiny_teacher, tiny_corpus), "--block", "0", "--out", str(tmp_path)]
    text = f"t={tiny_corpus / 'train.txt'}"
    code, err = in_process("retrain_single_block", [*argv, "--train-text", text, "--train-text", text], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith("error: --train-text: each name once, got ['t'] "
                                                               "more than once")
    code, err = in_process("retrain_single_block", [*argv, "--train-text", text], capsys)
    assert code == 2 and "error: --train-text is a decoder's training mixture" in err.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())  # refused before any work


def test_map_layers_are_zero_based():
    """--layers says 0-based: layer 0 is a layer to map (it was refused as "not positive"), a negative one is not."""
    import argparse

    from utils.cli.groups import add_map_args

    p = argparse.ArgumentParser()
    add_map_args(p)
    assert p.parse_args(["--layers", "0,3"]).layers == [0, 3]
    with pytest.raises(SystemExit):
        p.parse_args(["--layers", "-1"])
