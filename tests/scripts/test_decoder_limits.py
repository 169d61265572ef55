"""What does not apply to a decoder teacher (README, "Decoder models") is refused in one line, before training."""
from __future__ import annotations

import pytest

import retrain_merge
import retrain_single_block
from helpers import run_in_process


@pytest.mark.parametrize("module,argv,expected", [
    (retrain_single_block, ["--block", "1", "--block_heads", "2", "--mask-inputs"], "--mask-inputs puts one [MASK]"),
    (retrain_single_block, ["--block", "1", "--block_heads", "2", "--recipe", "seed"], "--mask-inputs puts one [MASK]"),
    (retrain_merge, ["--block", "0", "--mask-inputs"], "--mask-inputs puts one [MASK]"),
], ids=["blocks", "seed-recipe", "merge"])
def test_masked_inputs_need_a_masked_lm_teacher(tiny_llama, tiny_corpus, tmp_path, capsys, module, argv, expected):
    common = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--seq-len", "16", "--device", "cpu",
              "--out", str(tmp_path / "out"), "--epochs", "1"]
    try:
        code = run_in_process(module, argv + common)
    except SystemExit as e:  # retrain_single_block.py reports the library's SettingError through argparse
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1] and "Traceback" not in "\n".join(err)
    assert not list(tmp_path.glob("out/*/*/best"))


def test_a_judge_needs_a_masked_lm_teacher(tiny_llama, tiny_corpus, tmp_path):
    from utils import api
    from utils.errors import SettingError

    s = api.load_teacher(str(tiny_llama), data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16), device="cpu")
    with pytest.raises(SettingError, match="needs a masked-LM teacher"):
        api.evaluate(s, s.teacher, evaluation=api.EvalConfig(judge=str(tiny_llama)), out=tmp_path / "eval")
    assert not (tmp_path / "eval" / "results.json").exists()
