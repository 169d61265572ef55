"""``--export-gguf`` and ``--hf-layout nemotron-nas`` from the command line (``python -m utils.assemble``, in this
process): a layer-removal student written as plain llama and as DeciLM, and what cannot be written refused in one
line (exit 1) or as a bad argument (exit 2), nothing written either way."""
from __future__ import annotations

import json

import pytest

from helpers import make_decoder_teacher, restored_logging

gguf = pytest.importorskip("gguf")


def _assemble(argv: list[str], capsys) -> tuple[int, str, str]:
    from utils.cli.commands import assemble_main

    with restored_logging():
        try:
            code = assemble_main(argv)
        except SystemExit as e:
            code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    return make_decoder_teacher(tmp_path_factory.mktemp("bpe_llama"), tokenizer="bpe")


def test_assemble_writes_a_dropped_layer_student_as_plain_llama(bpe_llama, tmp_path, capsys):
    code, out, err = _assemble(["--teacher", str(bpe_llama), "--drop-layers", "1", "--out", str(tmp_path / "s"),
                                "--export-gguf", str(tmp_path / "s.gguf"), "--gguf-type", "q8_0"], capsys)
    assert code == 0, err
    assert f"GGUF (llama, 3 layers, q8_0) written to {tmp_path / 's.gguf'}" in out
    fields = gguf.GGUFReader(str(tmp_path / "s.gguf")).fields
    assert fields["llama.block_count"].contents() == 3 and fields["general.file_type"].contents() == 7


def test_a_tokenizer_llama_cpp_cannot_take_is_refused_in_one_line(tiny_llama, tmp_path, capsys):
    code, _, err = _assemble(["--teacher", str(tiny_llama), "--drop-layers", "1", "--out", str(tmp_path / "s"),
                              "--export-gguf", str(tmp_path / "s.gguf"), "--export-hf", str(tmp_path / "hf")], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and lines[-1].startswith("error: ") and "this one is WordLevel" in lines[-1]
    assert "Traceback" not in err
    assert not (tmp_path / "s.gguf").exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--gguf-type", "q4_k"], "invalid choice: 'q4_k'"),
    (["--export-gguf", "{tmp}"], "is a folder; expected a file name"),
])
def test_bad_gguf_arguments_are_refused_before_any_work(argv, expected, bpe_llama, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, _, err = _assemble(["--teacher", str(bpe_llama), "--drop-layers", "1", "--out", str(tmp_path / "s"),
                              *argv], capsys)
    assert code in (1, 2) and expected in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # nothing assembled


def test_finetune_refuses_a_teacher_llama_cpp_cannot_take_before_training(tiny_llama, tiny_corpus, tmp_path, capsys):
    import finetune_merged
    from utils.cli.run import run_main

    argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--drop-layers", "1", "--out",
            str(tmp_path / "runs"), "--export-gguf", str(tmp_path / "s.gguf")]
    with restored_logging():
        code = run_main(finetune_merged.main, finetune_merged.build_parser(), argv)
    err = capsys.readouterr().err
    assert code == 1 and "this one is WordLevel" in err.strip().splitlines()[-1]
    assert not list((tmp_path / "runs").rglob("*.safetensors"))  # nothing was trained


def test_assemble_writes_the_nemotron_nas_layout(tmp_path, capsys):
    teacher = make_decoder_teacher(tmp_path / "t", ffn=512, tokenizer="bpe")  # an FFN on the layout's grid
    code, out, err = _assemble(["--teacher", str(teacher), "--drop-layers", "1", "--out", str(tmp_path / "s"),
                                "--export-hf", str(tmp_path / "nas"), "--hf-layout", "nemotron-nas"], capsys)
    assert code == 0, err
    assert "Hugging Face DeciLMForCausalLM (Nemotron-NAS" in out
    blocks = json.loads((tmp_path / "nas" / "config.json").read_text())["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, True, False, False]


def test_a_layout_the_teacher_rules_out_is_refused_before_any_work(tmp_path, capsys):
    qwen2 = make_decoder_teacher(tmp_path / "q", model_type="qwen2", tokenizer="bpe")
    code, _, err = _assemble(["--teacher", str(qwen2), "--drop-layers", "1", "--out", str(tmp_path / "s"),
                              "--export-hf", str(tmp_path / "nas"), "--hf-layout", "nemotron-nas"], capsys)
    assert code == 1 and "cannot write the Nemotron-NAS layout: it has no biases" in err.strip().splitlines()[-1]
    assert not (tmp_path / "s").exists() and not (tmp_path / "nas").exists()
