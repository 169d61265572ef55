"""Decoder student units end to end (issue 20): each kind of unit a Llama-family teacher can be compressed with
(fewer query heads, fewer key/value heads down to one, a narrower SwiGLU, attention removed, attention replaced by a
linear map, two layers merged, a layer dropped) trains with its validation loss falling, and round-trips through its
checkpoint, assembly, a Hugging Face export that generates like ours in a clean process, and ONNX; the settings a
decoder teacher cannot take are refused in one line, before the teacher loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import in_process, load_decoders_elsewhere, make_hf_teacher, model_inputs, restored_logging
from utils import api
from utils.storage.checkpoint import CheckpointError, load_checkpoint
from utils.training.students import load_block, load_layer, load_merged_layer, load_model

# name -> (trained by, first teacher layer, UnitShape fields, what its spec must say); each on its own layer of the
# 4-layer tiny teacher (6 query heads over 2 key/value heads of 8, SwiGLU 64), so that two students hold them all
UNITS = {
    "fewer_query_heads": ("blocks", 0, dict(num_heads=4), dict(attention="gqa", num_heads=4, num_kv_heads=2)),
    "multi_query": ("blocks", 0, dict(num_kv_heads=1), dict(attention="gqa", num_heads=6, num_kv_heads=1)),
    "attention_none": ("blocks", 1, dict(attention="none"), dict(attention="none", num_heads=0,
                                                                  intermediate_size=64)),
    "narrow_swiglu": ("blocks", 2, dict(ffn_dim=32), dict(attention="gqa", num_heads=6, intermediate_size=32)),
    "attention_linear": ("blocks", 3, dict(attention="linear"), dict(attention="linear", num_heads=0)),
    "merged_pair": ("merges", 1, dict(num_kv_heads=1), dict(attention="gqa", num_kv_heads=1, origin=[1, 2])),
}
# two students that hold every kind between them (B with teacher layer 3 dropped)
STUDENTS = {"a": (("fewer_query_heads", "attention_none", "narrow_swiglu", "attention_linear"), []),
            "b": (("multi_query", "merged_pair"), [3])}
PLANS = {"a": [("gqa", "block"), ("none", "layer"), ("gqa", "layer"), ("linear", "block")],
         "b": [("gqa", "block"), ("gqa", "merged"), ("none", "dropped")]}
LOADERS = {"block": load_block, "layer": load_layer, "merged_layer": load_merged_layer}


def _losses(unit_dir: Path) -> tuple[float, float]:
    """Validation loss after the first epoch and after the last."""
    first, last = (json.loads((unit_dir / d / "meta.json").read_text())["metrics"]["loss"] for d in ("epoch_1", "last"))
    return first, last


@pytest.fixture(scope="module")
def session(tiny_llama, tiny_corpus):
    return api.load_teacher(str(tiny_llama), data=api.DataConfig(data_dir=str(tiny_corpus), batch_size=16, seq_len=32),
                            device="cpu")


@pytest.fixture(scope="module")
def trained(session, tmp_path_factory) -> dict[str, Path]:
    """Every unit of UNITS trained through the API (3 epochs, a snapshot each epoch): name -> its unit folder."""
    out = tmp_path_factory.mktemp("decoder_units")
    train = api.TrainConfig(epochs=3, lr=2e-3, save_every=1)
    dirs = {}
    for name, (how, first, shape, _) in UNITS.items():
        kw = dict(shape=api.UnitShape(**shape), train=train, out=out / name, cache_dir=str(out / "cache"))
        run = (api.retrain_blocks(session, layers=[first], **kw) if how == "blocks"
               else api.retrain_merges(session, pairs=[first], **kw))
        (unit,) = run.units
        dirs[name] = run.run_dir / unit.name
    return dirs


@pytest.mark.parametrize("name", list(UNITS))
def test_unit_trains_and_round_trips_through_its_checkpoint(trained, session, name):
    first_loss, last_loss = _losses(trained[name])
    assert last_loss < first_loss, (name, first_loss, last_loss)
    meta = json.loads((trained[name] / "best" / "meta.json").read_text())
    for key, want in UNITS[name][3].items():
        assert meta["spec"][key] == want, (name, key, meta["spec"])
    setup = json.loads((trained[name] / "run.json").read_text())["setup"]
    if name == "narrow_swiglu":  # started from the refit (TrainConfig's default), and its setup says so
        assert "output projection refit on" in meta["init"] and setup["ffn_refit_tokens"] == 16384
    else:
        assert "refit" not in meta["init"] and "ffn_refit_tokens" not in setup
    i, module, *spec = LOADERS[meta["kind"]](trained[name] / "best", session.teacher.config, session.teacher_hash)
    assert i == UNITS[name][1]
    sd, _, _ = load_checkpoint(trained[name] / "best")
    assert module.state_dict().keys() == sd.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in sd.items())


def test_whole_layers_start_from_their_checkpoints(session, trained, tmp_path):
    """``start_from`` for whole layers: found by their metadata, their shape taken over; another width refused."""
    start = trained["attention_none"].parent
    run = api.retrain_blocks(session, layers=[1], shape=api.UnitShape(attention="none"), start_from=start,
                             train=api.TrainConfig(epochs=1), out=tmp_path)
    assert run.units[0].init == f"from {start}" and run.run_dir.name == "layers_attn_none_f64_output_mse"
    with pytest.raises(CheckpointError, match="`ffn_dim` 32 does not match the `start_from` layer's 64"):
        api.retrain_blocks(session, layers=[1], shape=api.UnitShape(attention="none", ffn_dim=32), start_from=start,
                           out=tmp_path / "other")


def test_lm_loss_of_a_decoder_block_is_next_token_kl(session, tmp_path):
    """--loss-on mlm on a decoder: KL to the teacher's next-token distributions through its frozen rest."""
    run = api.retrain_blocks(session, layers=[2], shape=api.UnitShape(num_kv_heads=1),
                             loss=api.BlockLoss(loss_on=("mlm",)), out=tmp_path,
                             train=api.TrainConfig(epochs=3, lr=2e-3, save_every=1))
    assert run.run_dir.name == "blocks_h6_d8_kv1_mlm"
    first_loss, last_loss = _losses(run.run_dir / "block_2")
    assert last_loss < first_loss


def _assemble(session, trained, name: str, out: Path, **export) -> api.Assembled:
    units, drop = STUDENTS[name]
    return api.assemble(session, [trained[u] for u in units], drop_layers=drop, out=out,
                        export=api.ExportConfig(**export))


def test_students_of_every_kind_assemble_and_reload(session, trained, tmp_path):
    teacher = session.teacher
    ids, mask = model_inputs(teacher.config.vocab_size).values()
    for name in STUDENTS:
        done = _assemble(session, trained, name, tmp_path / name)
        model = done.model.eval()
        assert [(s.attention, s.kind) for s in model.config.layers] == PLANS[name]
        assert done.student_params < done.teacher_params
        assert model.config.kv_cache_bytes_per_token() < teacher.config.kv_cache_bytes_per_token()
        back, _ = load_model(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(back(ids, mask).logits, model(ids, mask).logits)
        prompt = ids[:2, :5]
        assert torch.equal(model.generate(prompt, 6), model.generate(prompt, 6, use_cache=False))


def test_dropped_layer_student_finetunes(session, tmp_path):
    """A dropped layer has nothing to train alone: the student around it is fine-tuned end to end."""
    done = api.finetune(session, checkpoints=[], drop_layers=[3], out=tmp_path,
                        train=api.TrainConfig(epochs=3, lr=2e-3, save_every=1))
    assert done.run_dir.name == "finetune_dropped_layers"
    assert [s.kind for s in done.model.config.layers] == ["teacher"] * 3 + ["dropped"]
    first_loss, last_loss = _losses(done.run_dir / "model")
    assert last_loss < first_loss
    # the per-epoch comparison with the teacher (read off the validation pass's own forwards) is compare_models's
    from utils.evaluation.metrics import compare_models

    logged = json.loads((done.run_dir / "model" / "last" / "meta.json").read_text())["metrics"]
    last, _ = load_model(done.run_dir / "model" / "last")
    loader, _ = session.loader(session.sentences("valid"), shuffle=False)
    want = compare_models(session.teacher, last, loader, tokenizer=session.tokenizer, device=session.device).metrics
    for k in ("student_top1", "agreement_top1", "kl_teacher_student", "hidden_cosine"):
        assert logged[k] == pytest.approx(want[k], rel=1e-5), k


@pytest.mark.slow
def test_students_export_to_transformers_and_onnx(session, trained, tmp_path):
    """python -m utils.assemble ... --export-hf --export-onnx: the ONNX graphs are checked against ours by the
    exporter (1e-4); the folders load in a clean process with trust_remote_code and generate ours token for token."""
    from utils.cli.commands import assemble_main

    ids, mask = model_inputs(session.teacher.config.vocab_size).values()
    x = {"ids": ids, "mask": mask, "prompt": ids[:2, :5]}
    torch.save(x, tmp_path / "inputs.pt")
    cases, models = {}, {}
    for name, (units, drop) in STUDENTS.items():
        argv = ["--teacher", str(session.teacher_name), "--blocks", *[str(trained[u]) for u in units],
                "--out", str(tmp_path / name), "--export-hf", str(tmp_path / f"{name}_hf"),
                "--export-onnx", str(tmp_path / f"{name}.onnx")]
        if drop:
            argv += ["--drop-layers", ",".join(map(str, drop))]
        assert assemble_main(argv) == 0
        assert (tmp_path / f"{name}.onnx").is_file() and (tmp_path / f"{name}_encoder.onnx").is_file()
        models[name] = load_model(tmp_path / name)[0]
        cases[name] = {"dir": str(tmp_path / f"{name}_hf"), "inputs": str(tmp_path / "inputs.pt"),
                       "out": str(tmp_path / f"{name}.pt"), "remote": True}
    report = load_decoders_elsewhere(cases, tmp_path)
    for name, model in models.items():
        theirs = torch.load(cases[name]["out"])
        with torch.no_grad():
            ours = model(ids, mask).logits
        assert report[name]["class"] == "CompactLlamaForCausalLM"
        assert (theirs["logits"] - ours)[mask.bool()].abs().max() <= 1e-5
        assert torch.equal(theirs["generated"], model.generate(x["prompt"], 10))


# ---- one line for what a decoder teacher (or any teacher) cannot take -------------------------------------------
@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory) -> Path:
    return make_hf_teacher(tmp_path_factory.mktemp("bert"))


BAD = [  # (script, arguments after the teacher's, what the one line names)
    ("retrain_single_block", ["--block", "1", "--attention", "none", "--ffn-dim", "0"], "--drop-layers"),
    ("retrain_single_block", ["--block", "1", "--block-heads", "4", "--kv-heads", "3"], "not a multiple"),
    ("retrain_single_block", ["--block", "1", "--block-heads", "5"], "--block_heads 5"),
    ("retrain_single_block", ["--block", "1", "--kv-heads", "4"], "--kv-heads 4"),
    ("retrain_single_block", ["--block", "1", "--block-d-k", "4"], "rotary"),
    ("retrain_single_block", ["--block", "1", "--attention", "linear", "--block-heads", "2"],
     "--block_heads does not apply to --attention linear"),
    ("retrain_single_block", ["--block", "1", "--attention", "linear", "--kv-heads", "2"],
     "--kv-heads does not apply to --attention linear"),
    ("retrain_single_block", ["--block", "1", "--attention", "linear", "--loss-on", "scores", "--criterion",
                              "CrossEntropy"], "--attention linear has no heads"),
    ("retrain_single_block", ["--block", "1", "--ffn-dim", "32", "--loss-on", "relations"], "whole-layer units"),
    ("retrain_single_block", ["--block", "1", "--mask-inputs"], "--mask-inputs"),
    ("retrain_merge", ["--block", "0", "--mask-inputs"], "causal LM"),
    ("retrain_merge", ["--block", "0", "--kv-heads", "5"], "--kv-heads 5"),
    ("eval_merged_12", ["--model", "nowhere", "--judge", "nowhere_either"], "--judge"),
    ("finetune_merged", ["--drop-layers", "3", "--drop-every-second"], "--drop-every-second"),
    ("finetune_merged", ["--drop-layers", "4"], "layer 4 does not exist"),
    ("utils.assemble", ["--out", "OUT"], "nothing to build a student from"),
    ("utils.assemble", ["--drop-layers", "1,9", "--out", "OUT"], "layer 9 does not exist"),
    ("bert:retrain_single_block", ["--block", "1", "--attention", "linear"], "not implemented for bert"),
    ("bert:retrain_merge", ["--block", "0", "--ffn-dim", "0"], "--ffn-dim 0"),
    ("bert:utils.assemble", ["--drop-layers", "1", "--out", "OUT"], "cannot drop a layer"),
]


@pytest.mark.parametrize("script,argv,needle", BAD, ids=[f"{s}:{' '.join(a[:4])}" for s, a, _ in BAD])
def test_bad_input_is_one_line_before_the_teacher_loads(tiny_llama, tiny_corpus, bert_teacher, tmp_path, capsys,
                                                        script, argv, needle):
    teacher = tiny_llama
    if script.startswith("bert:"):
        script, teacher = script[len("bert:"):], bert_teacher
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    if script == "utils.assemble":
        head = ["--teacher", str(teacher)]
    else:
        head = ["--teacher", str(teacher), "--data-dir", str(tiny_corpus), "--device", "cpu", "--out",
                str(tmp_path / "out")]
    code, err = _run(script, head + argv, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and ": error: " in lines[-1] and needle in lines[-1], err[-2000:]
    assert "layers, hidden" not in err  # refused before the teacher was loaded (its log line)
    assert not (tmp_path / "out").exists()


def _run(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """A script (or ``python -m utils.assemble``) in this process: (exit code, stderr)."""
    if script != "utils.assemble":
        return in_process(script, argv, capsys)
    from utils.cli.commands import assemble_main

    with restored_logging():
        try:
            code = assemble_main(argv)
        except SystemExit as e:
            code = e.code
    return code, capsys.readouterr().err
