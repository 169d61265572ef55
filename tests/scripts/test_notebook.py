"""The assembling notebook runs top to bottom on a tiny model and saves a model that reloads identically."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_notebook_assembles(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    run = subprocess.run(
        [sys.executable, "retrain_single_block.py", "--block", "1", "--heads", "2", "--teacher", str(tiny_teacher),
         "--data-dir", str(tiny_corpus), "--epochs", "1", "--out", str(tmp_path), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "assembled"
    monkeypatch.setenv("ST_TEACHER", str(tiny_teacher))
    monkeypatch.setenv("ST_BLOCKS", str(tmp_path))
    monkeypatch.setenv("ST_OUT", str(out))
    monkeypatch.setenv("ST_FILL_MASK", "the small cat sees the [MASK] .")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))  # where remote code is imported from
    nb = nbformat.read(ROOT / "notebooks" / "build_bert_from_retrained_12.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "block" in text and "heads= 2" in text  # the per-layer plan shows the retrained layer
    assert "reloaded model gives identical outputs: True" in text
    assert (out / "model.safetensors").is_file() and (out / "meta.json").is_file()
    assert "CompactBertForMaskedLM" in text and "fill-mask pipeline:" in text  # 2 heads of 4: remote code
    assert (tmp_path / "assembled_hf" / "modeling_compact_bert.py").is_file()
    if "ONNX Runtime top-5" not in text:
        assert "pip install onnx onnxruntime" in text
