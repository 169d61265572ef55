"""Issue 34, exports from the command line: a full disk during ``--export-hf`` is one line naming the folder (34.5),
and ``--export-onnx`` onto a file that is not an ONNX model is refused at start-up, the file kept (34.7)."""
from __future__ import annotations

import pytest

from helpers import last_line, restored_logging

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _assemble(argv: list[str], capsys) -> tuple[int, str]:
    """``python -m utils.assemble argv`` in this process: (exit code, stderr)."""
    from utils.cli.commands import assemble_main

    with restored_logging():
        code = assemble_main(argv)
    return code, capsys.readouterr().err


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1 and last_line(err) == lines[0], err[-3000:]
    assert all(n in lines[0] for n in needles), (needles, lines[0])


def test_a_full_disk_during_export_hf_is_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    hf = tmp_path / "exports" / "hf"
    code, err = _assemble(["--teacher", str(tiny_llama), "--drop-layers", "1", "--out", str(tmp_path / "student"),
                           "--export-hf", str(hf)], capsys)
    assert code == 1  # before: safetensors' traceback and "this is a bug"
    _one_error_line(err, "No space left on device", f"'{hf}'")
    assert list((tmp_path / "exports").iterdir()) == []


@pytest.mark.parametrize("which", ["model.onnx", "model_encoder.onnx"])
def test_export_onnx_onto_a_users_file_is_refused_at_start_up(tiny_llama, tmp_path, capsys, which):
    pytest.importorskip("onnxruntime")
    users = tmp_path / which
    users.write_text("a user's file, not a model\n")
    code, err = _assemble(["--teacher", str(tiny_llama), "--drop-layers", "1", "--out", str(tmp_path / "student"),
                           "--export-onnx", str(tmp_path / "model.onnx")], capsys)
    assert code == 1  # before: overwritten, exit 0 (and model_encoder.onnx written beside it)
    _one_error_line(err, str(users), "is not an ONNX model", "model_encoder.onnx")
    assert users.read_text() == "a user's file, not a model\n"
    assert not (tmp_path / "student").exists()  # refused before the student was built
    assert sorted(p.name for p in tmp_path.iterdir()) == [which]


def test_export_onnx_announces_both_files(tiny_llama, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    code, err = _assemble(["--teacher", str(tiny_llama), "--drop-layers", "1", "--out", str(tmp_path / "student"),
                           "--export-onnx", str(tmp_path / "model.onnx")], capsys)
    assert code == 0, err[-3000:]
    for graph, file in (("causal-LM", "model.onnx"), ("encoder", "model_encoder.onnx")):
        assert f"ONNX {graph} graph written to {tmp_path / file}" in err, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model_encoder.onnx", "student"]
