"""The Python API: the README's example runs as written (tiny teacher and corpus), and the scripts' guarantees hold
without the command line: settings checked first and named as fields, a unit claimed by one job at a time."""
from __future__ import annotations

import json
import re

import pytest

from helpers import ROOT
from utils import api
from utils.storage.lock import UnitBusy, UnitLock


def readme_example() -> str:
    """The README's Python API example (the block after 'Use it from Python')."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use it from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_retrains_two_blocks_assembles_and_evaluates(tiny_teacher, tiny_corpus, tmp_path, capsys):
    code = readme_example()
    calls = [line for line in code.splitlines() if "api." in line]
    assert 0 < len(calls) and len(code.strip().splitlines()) < 15
    code = (code.replace("teachers/minilm", str(tiny_teacher)).replace("my_text/", str(tiny_corpus))
            .replace('"runs', f'"{tmp_path}/runs'))
    exec(compile(code, "README.md", "exec"), {})
    top1, agreement = map(float, capsys.readouterr().out.split()[-2:])
    assert 0 <= top1 <= 1 and 0 <= agreement <= 1
    meta = json.loads((tmp_path / "runs" / "assembled" / "meta.json").read_text())
    assert [s["kind"] for s in meta["config"]["layers"]] == ["block", "block"]
    assert [s["num_heads"] for s in meta["config"]["layers"]] == [2, 2]
    results = json.loads((tmp_path / "runs" / "eval" / "results.json").read_text())
    assert results["metrics"]["student_top1"] == top1 and results["teacher"] == str(tiny_teacher)


@pytest.fixture(scope="module")
def session(tiny_teacher, tiny_corpus):
    return api.load_teacher(str(tiny_teacher), data=api.DataConfig(data_dir=str(tiny_corpus), batch_size=16),
                            device="cpu")


def test_settings_are_checked_before_any_work_and_named_as_fields(session, tmp_path):
    with pytest.raises(api.SettingError, match=r"`layers` \[7\]: the teacher has layers 0..1"):
        api.retrain_blocks(session, layers=[7], out=tmp_path)
    with pytest.raises(api.SettingError, match=r"`pairs` \[1\]: .* \(a pair starts at 0..0\)"):
        api.retrain_merges(session, pairs=[1], out=tmp_path)
    with pytest.raises(api.SettingError, match="`init` teacher with the teacher's own shape .* exact copy"):
        api.retrain_blocks(session, layers=[0], init="teacher", out=tmp_path)
    with pytest.raises(api.SettingError, match="`kl_weight`, `mlm_weight` and `hidden_weight` are all 0"):
        api.finetune(session, objective=api.FinetuneLoss(kl_weight=0.0), out=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_a_unit_held_by_another_job_is_refused(session, tmp_path):
    unit = tmp_path / "blocks_h2_d8_output_mse" / "block_1"
    holder = UnitLock(unit, "block_1").acquire()
    try:
        with pytest.raises(UnitBusy, match="being trained by another job"):
            api.retrain_blocks(session, layers=[1], shape=api.UnitShape(num_heads=2), out=tmp_path)
    finally:
        holder.release()


def test_merged_pair_trains_and_evaluates_from_its_checkpoint(session, tmp_path):
    run = api.retrain_merges(session, pairs=[0], train=api.TrainConfig(epochs=1, max_steps_per_epoch=2),
                             out=tmp_path)
    assert [u.name for u in run.units] == ["merge_0"] and run.units[0].best < float("inf")
    ev = api.evaluate(session, run.run_dir / "merge_0" / "best", out=tmp_path / "eval")
    assert ev.model.config.layers[0].kind == "merged" and len(ev.model.layers) == 1
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["pair"] == [0, 1]
