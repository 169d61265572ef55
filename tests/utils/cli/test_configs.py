"""utils/cli/configs.py: flags become typed settings; a default that depends on the teacher is resolved from it."""
from __future__ import annotations

import pytest

import plan_student
import sensitivity_map
from bench import plans
from utils.cli.configs import record, train_config
from utils.planning.students import UNIT_LR


@pytest.fixture()
def teachers(tiny_teacher, tiny_llama):
    return {"mlm": tiny_teacher, "causal": tiny_llama}


@pytest.mark.parametrize("module, extra", [(sensitivity_map, []), (plan_student, ["--target-speedup", "1.3"]),
                                           (plans, ["--map", "m"])])
@pytest.mark.parametrize("task", ["mlm", "causal"])
def test_unit_lr_follows_the_teachers_task(teachers, module, extra, task):
    """The map's units start from the teacher's weights: a decoder's at 1e-4 (1e-3 wrecked Qwen's layer-0 units),
    a masked LM's at 1e-3 as before; the run record shows the rate used, and --lr given wins."""
    args = module.build_parser().parse_args(["--teacher", str(teachers[task]), *extra])
    assert args.lr is None
    assert train_config(args).lr == UNIT_LR[task] == {"mlm": 1e-3, "causal": 1e-4}[task]
    assert record(args)["args"]["lr"] == UNIT_LR[task]
    args = module.build_parser().parse_args(["--teacher", str(teachers[task]), "--lr", "5e-4", *extra])
    assert train_config(args).lr == 5e-4


def test_unit_lr_help_names_both():
    text = " ".join(sensitivity_map.build_parser().format_help().split())
    assert "0.001 for a masked-LM teacher" in text and "0.0001 for a decoder teacher" in text
