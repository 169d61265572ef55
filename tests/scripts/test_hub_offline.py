"""The README's default command lines (teacher ``bert-base-uncased``, ``--dataset wikitext2``), run end to end offline.

A temporary Hugging Face cache (HF_HOME) holds a tiny BERT in the layout of the hub id ``bert-base-uncased`` and a
tiny dataset repo in the layout of ``Salesforce/wikitext`` (``wikitext-2-raw-v1/{train,validation,test}-*.parquet``,
raw WikiText lines: `` = Heading = ``, blank lines, `` @-@ ``). Every command runs in a subprocess with that HF_HOME
and HF_HUB_OFFLINE=1, without --teacher and without --data-dir, so the hub-id resolution, the dataset loading and
the sentence splitting are the ones a user with the real cache (or network) gets.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ADJS, NOUNS, ROOT, make_hf_teacher, make_sentences
REV = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex commit id: refs/main points at it


def raw_wikitext_lines(n_articles: int, seed: int) -> list[str]:
    """Lines as the raw WikiText-2 parquet stores them: a leading space, spaced punctuation, a newline."""
    rng = random.Random(seed)
    lines = []
    for a in range(n_articles):
        lines += ["", f" = The {rng.choice(ADJS).title()} {rng.choice(NOUNS).title()} = \n", ""]
        for p in range(2):
            sents = make_sentences(4, seed * 1000 + a * 10 + p)
            sents[0] = sents[0].replace(" the ", f" the {rng.choice(ADJS)} @-@ ", 1)
            lines.append(" " + " ".join(sents) + " \n")
        lines += ["", f" = = {rng.choice(NOUNS).title()} = = \n", ""]
    return lines


def build_hub_cache(hf_home: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = hf_home / "hub"
    model_repo = hub / "models--bert-base-uncased"
    make_hf_teacher(model_repo / "snapshots" / REV, layers=8, hidden=16, heads=2, ffn=32)
    data_repo = hub / "datasets--Salesforce--wikitext"
    folder = data_repo / "snapshots" / REV / "wikitext-2-raw-v1"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", 10, 1), ("validation", 4, 2), ("test", 4, 3)):
        pq.write_table(pa.table({"text": raw_wikitext_lines(n, seed)}), folder / f"{split}-00000-of-00001.parquet")
    for repo in (model_repo, data_repo):
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(REV)
    return hub


@pytest.mark.slow
def test_readme_defaults_run_offline_from_hub_cache(tmp_path):
    hf_home = tmp_path / "hf_home"
    build_hub_cache(hf_home)
    work = tmp_path / "work"  # the user's folder: checkpoints/ is created here
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def run(*argv: str) -> str:
        r = subprocess.run([sys.executable, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{argv}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    run(str(ROOT / "retrain_single_block.py"), "--block", "6", "--criterion", "MSE")
    run(str(ROOT / "retrain_single_block.py"), "--block", "all", "--heads", "4", "--head-dim", "64",
        "--cache-teacher")
    out = run("-m", "utils.assemble", "--blocks", "checkpoints/blocks_h4_d64_output_mse", "--out",
              "checkpoints/assembled", "--export-hf", "checkpoints/assembled_hf")
    assert "CompactBertForMaskedLM" in out
    run(str(ROOT / "eval_merged_12.py"), "--percentage_data", "0.5")
    ckpt = work / "checkpoints"
    meta = json.loads((ckpt / "assembled" / "meta.json").read_text())
    assert meta["teacher"] == "bert-base-uncased"
    assert [l["num_heads"] for l in meta["config"]["layers"]] == [4] * 8
    results = json.loads(next((ckpt).rglob("results.json")).read_text())
    # test split: 4 articles x 2 paragraphs x 4 sentences, headings dropped; 50% of them evaluated
    assert results["metrics"]["sentences"] == 16
    assert (ckpt / "assembled_hf" / "modeling_compact_bert.py").is_file()


@pytest.mark.slow
def test_wikitext2_sentences_from_hub_cache(tmp_path):
    """The dataset alone: headings and blank lines dropped, paragraphs cut into sentences, ` @-@ ` kept as is."""
    build_hub_cache(tmp_path / "hf_home")
    code = ("from utils.data.text import load_wikitext2; import json; "
            "print(json.dumps({s: load_wikitext2(s) for s in ('train', 'valid', 'test')}))")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    splits = json.loads(r.stdout.strip().splitlines()[-1])
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [80, 32, 32]
    assert all(not s.startswith("=") and s.endswith(".") for v in splits.values() for s in v)
    assert any(" @-@ " in s for s in splits["train"])
