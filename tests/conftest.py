"""Fixtures: tiny teachers and corpora the tests build themselves (nothing is downloaded). The helpers every test
file shares live in tests/helpers.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Tiny models run fastest on one thread; several threads per process only contend (also in subprocesses).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from helpers import make_decoder_teacher, make_hf_teacher, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return make_hf_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A teacher without an MLM head (a plain BertModel, like sentence-transformers checkpoints)."""
    return make_hf_teacher(tmp_path_factory.mktemp("tiny_encoder"), with_head=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 4-layer grouped-query Llama teacher: 6 query heads over 2 key/value heads of 8, SwiGLU 64."""
    return make_decoder_teacher(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory) -> Path:
    """tiny_llama as an instruct teacher: ChatML chat template, <|im_end|> ends its turn."""
    return make_decoder_teacher(tmp_path_factory.mktemp("tiny_chat_llama"), chat=True)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))
