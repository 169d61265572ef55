"""What an export may write (issue 34).

A full disk in any exporter is ``OSError(ENOSPC)`` naming the export, whatever library was writing, with nothing
left behind, and one line on the command line (34.5); an ONNX target, for both files it writes, is refused when it
holds anything but an ONNX model (34.7).
"""
from __future__ import annotations

import errno

import pytest
import torch

from helpers import compact_student
from models import load_teacher
from models.export import ExportError, export_pretrained
from utils.storage.export import ExportConfig, check_export_targets

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' own words


def _full_disk(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError(FULL)


# ---- 34.5: a full disk in every exporter --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "remote-code"])
def test_a_full_disk_during_an_hf_export_names_the_folder(tiny_teacher, tmp_path, monkeypatch, kind):
    import safetensors.torch
    import transformers.modeling_utils

    model, tok = load_teacher(tiny_teacher) if kind == "plain" else compact_student(tiny_teacher)
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk)  # ours (remote code)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _full_disk)  # transformers' save_pretrained
    out = tmp_path / "exports" / "hf"
    with pytest.raises(OSError) as e:  # before: safetensors' SafetensorError, "this is a bug" on the command line
        export_pretrained(model, out, tok)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out) and FULL in str(e.value.__cause__)
    assert list((tmp_path / "exports").iterdir()) == []  # nothing half-written, no temporary


def test_a_full_disk_during_an_onnx_export_names_the_file(tiny_teacher, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from models.onnx_export import export_onnx

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # a write into a full disk, naming nothing

    model, _ = compact_student(tiny_teacher)
    monkeypatch.setattr(torch.onnx, "export", full)
    with pytest.raises(OSError) as e:
        export_onnx(model, tmp_path / "out" / "model.onnx")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "out" / "model_encoder.onnx")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("raised", [
    lambda: _full_disk(),  # a library's own class, its own words
    lambda: _wrapped(OSError(errno.ENOSPC, "No space left on device", "/x/cache.npy")),  # wrapped by a library
    lambda: _wrapped(OSError(errno.EDQUOT, "Disk quota exceeded")),
], ids=["library-words", "wrapped-named", "wrapped-quota"])
def test_a_full_disk_from_any_writer_is_one_line(capsys, raised):
    from helpers import last_line
    from utils.cli.parser import Parser
    from utils.cli.run import run_main

    def main(args):
        raised()

    assert run_main(main, Parser(), []) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err  # before: a traceback, "this is a bug"
    assert last_line(err).startswith("error: No space left on device"), err


def _wrapped(cause: OSError):
    try:
        raise cause
    except OSError as e:
        raise RuntimeError("[enforce fail at inline_container.cc:672] file write failed") from e


# ---- 34.7: the ONNX target refuses what is not an ONNX model, for both its files -----------------------------------
@pytest.mark.parametrize("which", ["lm", "encoder"])
def test_an_onnx_target_that_is_not_an_onnx_model_is_refused(tmp_path, which):
    pytest.importorskip("onnxruntime")
    target = tmp_path / "model.onnx"
    users = target if which == "lm" else tmp_path / "model_encoder.onnx"
    users.write_text("my notes, not a model\n")
    with pytest.raises(ExportError, match="exists and is not an ONNX model") as e:  # before: overwritten, exit 0
        check_export_targets(ExportConfig(onnx_file=str(target)))
    assert str(users) in str(e.value) and "model_encoder.onnx" in str(e.value)
    assert users.read_text() == "my notes, not a model\n"


def test_an_onnx_export_replaces_a_previous_one_and_never_a_users_file(tiny_teacher, tmp_path):
    pytest.importorskip("onnxruntime")
    from models.onnx_export import export_onnx

    model, _ = compact_student(tiny_teacher)
    target = tmp_path / "model.onnx"
    first = export_onnx(model, target)
    assert set(first) == {"masked-LM", "encoder"} and first["encoder"][0] == tmp_path / "model_encoder.onnx"
    check_export_targets(ExportConfig(onnx_file=str(target)))  # a previous export may be replaced
    export_onnx(model, target)
    (tmp_path / "model_encoder.onnx").write_bytes(b"\x00" * 64)  # the second file, now the user's
    with pytest.raises(ExportError, match="model_encoder.onnx' exists and is not an ONNX model"):
        export_onnx(model, target)  # the library call checks too (bench/, Python callers)
    assert (tmp_path / "model_encoder.onnx").read_bytes() == b"\x00" * 64
