"""Tiny teachers and corpora the tests build themselves: nothing is downloaded."""
from __future__ import annotations

import inspect
import os
import random
import sys
import sysconfig
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

NOUNS = "cat dog bird lobster river city king queen ship song army garden".split()
ADJS = "small large red blue old young quiet famous".split()
VERBS = "sees follows likes builds finds carries".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}"
        if rng.random() < 0.5:
            s += f" near the {rng.choice(ADJS)} {rng.choice(NOUNS)}"
        out.append(s + " .")
    return out


def make_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + sorted(set(NOUNS + ADJS + VERBS + ["the", "near", ".", ","])) + ["##s", "##ed"]
    vf = folder / "vocab.txt"
    vf.write_text("\n".join(vocab) + "\n")
    # transformers 5 renamed vocab_file= to vocab=
    key = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tok = BertTokenizerFast(**{key: str(vf)})
    tok.save_pretrained(str(folder))
    return tok


def make_hf_teacher(folder: Path, layers: int = 2, hidden: int = 32, heads: int = 4, ffn: int = 64,
                    with_head: bool = True, seed: int = 0, vocab_size: int | None = None, **config_kwargs) -> Path:
    """``config_kwargs`` go to BertConfig as they are (e.g. hidden_dropout_prob=0.0)."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=ffn,
                     **{"max_position_embeddings": 64, **config_kwargs})
    model = (BertForMaskedLM if with_head else BertModel)(cfg)
    # random init leaves LayerNorms at identity and biases at 0; perturb so the parity tests exercise every weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(str(folder))
    return folder


def make_decoder_tokenizer(folder: Path):
    """A word-level tokenizer over the corpus words (what a decoder teacher folder needs besides its weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted(set(NOUNS + ADJS + VERBS + ["the", "near", ".", ","]))
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(str(folder))
    return tok


DECODERS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}


def make_decoder_teacher(folder: Path, model_type: str = "llama", layers: int = 4, hidden: int = 48, heads: int = 6,
                         kv_heads: int = 2, ffn: int = 64, seed: int = 0, **config_kwargs) -> Path:
    """A tiny random Llama-family teacher (``model_type`` llama, qwen2 or mistral) with a word-level tokenizer;
    ``config_kwargs`` go to the transformers config as they are (rope_scaling, tie_word_embeddings, ...)."""
    import transformers

    tok = make_decoder_tokenizer(folder)
    torch.manual_seed(seed)
    cfg_name, model_name = DECODERS[model_type]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=len(tok) + 8, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=ffn, **{"max_position_embeddings": 128, **config_kwargs})
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():  # random init leaves norms at one and biases at zero: perturb so parity covers them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(str(folder))
    return folder


def write_corpus(folder: Path, n_train: int = 192, n_valid: int = 48, n_test: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("valid", n_valid, 2), ("test", n_test, 3)):
        (folder / f"{name}.txt").write_text("\n".join(make_sentences(n, seed)) + "\n")
    return folder


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
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def installed_model(package_dir: str) -> Path | None:
    p = Path(sysconfig.get_paths()["purelib"]) / package_dir
    return p if (p / "config.json").is_file() else None


def run_in_process(module, argv: list[str]) -> int:
    """A script module's main through run_main in this process: the exit code ``python script.py argv`` gives."""
    from utils.session import run_main

    parser = module.build_parser()
    main = module.main
    if main.__code__.co_argcount == 2:
        return run_main(lambda a: main(a, parser), parser, argv)
    return run_main(main, parser, argv)
