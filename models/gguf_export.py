"""GGUF export of decoder students, for llama.cpp (and what runs its files: ollama, LM Studio, llama-cpp-python).

A student whose kept layers all have the teacher's shape is written as the plain architecture of its family
(``llama`` for Llama / Mistral / SmolLM2, ``qwen2`` for Qwen2); anything per-layer is written as llama.cpp's ``deci``
architecture (Nemotron-NAS), whose ``attention.head_count``, ``attention.head_count_kv`` and ``feed_forward_length``
are per-layer arrays. How llama.cpp's ``src/models/deci.cpp`` (0.3.36) runs a layer, and how our units map onto it:

- ``head_count`` > 0, ``head_count_kv`` > 0: grouped-query attention (our ``mha`` / ``gqa``, any heads per layer,
  one head size for all: ``attention.key_length``, the teacher's).
- ``head_count`` > 0, ``head_count_kv`` 0: our ``linear`` kind: ``attn_output`` applied to the normalised input (no
  bias is read there: a linear unit with a bias is refused).
- ``head_count`` 0: no attention (our ``none``).
- ``feed_forward_length`` 0 makes llama.cpp skip the rest of the layer, attention output included, so a layer that
  keeps attention without a feed-forward part is written with a feed-forward part of ``ZERO_FFN`` zero neurons
  (exactly nothing added); a dropped layer (no attention, no FFN: the identity) is not written at all.
- llama.cpp reads the head size only when layer 0 has heads: a first layer without attention is written as a linear
  attention of zeros (exactly nothing added).
- llama.cpp cannot allocate an empty KV cache: a model without any key/value-caching layer is refused.

So every unit kind of ours runs exactly; what cannot (another head size, a biased linear unit, an activation other
than SiLU, a kind without a GGUF form) is refused in one line naming the layer before anything is written. Q/K rows
are permuted to llama.cpp's rotary layout for ``llama`` / ``deci`` (as its converter does); ``qwen2`` takes them as
they are. The tokenizer is written as llama.cpp's converter writes a GPT-2-style byte-level BPE one (tokens, token
types, merges, pre-tokenizer name, special tokens, chat template). The file is written under a temporary name and
renamed when complete (``models.staging``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import SwappableModel
from .config import LayerSpec
from .export import ExportError
from .staging import staged_files

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")
ZERO_FFN = 32  # neurons of the zero feed-forward part of an attention-only layer (a width q8_0 blocks divide)
ATTENTION_KINDS = ("mha", "gqa", "linear", "none")  # the kinds this exporter writes (models.kinds)


@dataclass(frozen=True)
class GgufArch:
    """One llama.cpp architecture: its name and whether it wants Q/K rows in its interleaved rotary layout."""

    name: str
    permute_qk: bool
    per_layer: bool = False  # head counts and FFN widths as per-layer arrays


ARCHS = {a.name: a for a in (GgufArch("llama", True), GgufArch("qwen2", False), GgufArch("deci", True, True))}
PLAIN_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # our model_type -> its plain architecture


@dataclass(frozen=True)
class GgufLayer:
    """One layer as written: ``source`` is our layer index; ``heads`` 0 no attention, ``kv_heads`` 0 with heads a
    linear attention; ``zero_attention`` / ``zero_ffn``: a part written as zeros (see the module's docstring)."""

    source: int
    heads: int
    kv_heads: int
    ffn: int
    zero_attention: bool = False
    zero_ffn: bool = False


# our weight names (inside a layer / at the top) -> gguf-py's tensor kinds; the .weight / .bias suffix is kept
LAYER_TENSORS = {
    "self_attn.input_layernorm": "ATTN_NORM", "self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V", "self_attn.o_proj": "ATTN_OUT", "self_attn.proj": "ATTN_OUT",
    "mlp.post_attention_layernorm": "FFN_NORM", "mlp.gate_proj": "FFN_GATE", "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
TOP_TENSORS = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def tensor_name(kind: str, suffix: str, bid: int | None = None) -> str:
    """The GGUF name of a tensor kind (gguf-py's table), e.g. ``blk.3.attn_q.weight``."""
    import gguf

    return f"{gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=bid)}.{suffix}"


def layer_problem(i: int, spec: LayerSpec, cfg) -> str | None:
    """Why llama.cpp cannot run layer ``i`` as trained, or None."""
    if spec.attention not in ATTENTION_KINDS:
        return f"layer {i}: attention kind '{spec.attention}' has no GGUF form (written: {', '.join(ATTENTION_KINDS)})"
    if spec.attention in ("mha", "gqa") and spec.head_dim != cfg.head_dim:
        return (f"layer {i}: attention with head_dim {spec.head_dim}; llama.cpp takes one head size for every layer "
                f"(the teacher's {cfg.head_dim})")
    if spec.attention == "linear" and cfg.attention_bias:
        return f"layer {i}: linear attention with a bias (attention_bias); llama.cpp's deci linear attention has none"
    return None


def _check_family(cfg) -> None:
    """A GGUF is written for a Llama-family decoder with SiLU feed-forward parts; ExportError otherwise."""
    if getattr(cfg, "family", "") != "llama":
        raise ExportError(f"a GGUF export (`gguf_file`) writes decoders of the Llama family; this is a "
                          f"{cfg.family or 'bert'} model (use `hf_dir` or `onnx_file`)")
    if cfg.hidden_act != "silu":
        raise ExportError(f"a GGUF export needs SiLU feed-forward parts (llama.cpp's llama/qwen2/deci graphs); "
                          f"this model's activation is '{cfg.hidden_act}'")


def gguf_layers(cfg) -> tuple[GgufArch, list[GgufLayer]]:
    """The architecture and the layers a model of ``cfg`` is written as; ExportError (one line) when llama.cpp
    cannot run it as trained."""
    _check_family(cfg)
    problems = [p for i, s in enumerate(cfg.layers) if (p := layer_problem(i, s, cfg))]
    if problems:
        raise ExportError(f"cannot write a GGUF llama.cpp runs as trained: {problems[0]}"
                          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    teacher = cfg.teacher_layer(0)
    kept = [(i, s) for i, s in enumerate(cfg.layers) if s.attention != "none" or s.intermediate_size > 0]
    if not kept:
        raise ExportError("a GGUF export needs at least one layer: every layer of this model is dropped")
    if not any(s.kv_heads for _, s in kept):  # llama.cpp: "failed to allocate buffer for kv cache"
        raise ExportError("a GGUF export needs one layer whose attention caches keys and values: llama.cpp cannot "
                          "create a context with an empty KV cache, and no layer of this model has one")
    plain = all(s.attention_shape() == teacher.attention_shape() and s.intermediate_size == teacher.intermediate_size
                for _, s in kept)
    arch = ARCHS[PLAIN_ARCH[cfg.model_type] if plain else "deci"]
    layers = []
    for n, (i, s) in enumerate(kept):
        heads = s.num_heads if s.attention in ("mha", "gqa") else cfg.num_attention_heads
        zero_attention = s.attention == "none" and n == 0
        heads = 0 if s.attention == "none" and not zero_attention else heads
        layers.append(GgufLayer(i, heads, s.kv_heads, s.intermediate_size or ZERO_FFN, zero_attention,
                                zero_ffn=s.intermediate_size == 0))
    return arch, layers


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K rows (weight or bias) from the half-split rotary layout of Hugging Face checkpoints to the interleaved
    one of llama.cpp's ``llama`` / ``deci`` graphs (what its converter's ``permute`` does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layer_tensors(sd: dict[str, torch.Tensor], layer: GgufLayer, bid: int, *, arch: GgufArch,
                   hidden: int) -> dict[str, torch.Tensor]:
    """The GGUF tensors of one written layer."""
    out = {}
    prefix = f"model.layers.{layer.source}."
    for key, w in sd.items():
        m = _LAYER_KEY.match(key)
        if not key.startswith(prefix) or not m:
            continue
        if m.group(2) not in LAYER_TENSORS:
            raise ExportError(f"weight '{key}' has no GGUF name")
        if arch.permute_qk and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj"):
            w = permute_rows(w, layer.heads if m.group(2).endswith("q_proj") else layer.kv_heads)
        out[tensor_name(LAYER_TENSORS[m.group(2)], m.group(3), bid)] = w
    if layer.zero_attention:
        out[tensor_name("ATTN_NORM", "weight", bid)] = torch.ones(hidden)
        out[tensor_name("ATTN_OUT", "weight", bid)] = torch.zeros(hidden, hidden)
    if layer.zero_ffn:
        out[tensor_name("FFN_NORM", "weight", bid)] = torch.ones(hidden)
        for kind, shape in (("FFN_GATE", (ZERO_FFN, hidden)), ("FFN_UP", (ZERO_FFN, hidden)),
                            ("FFN_DOWN", (hidden, ZERO_FFN))):
            out[tensor_name(kind, "weight", bid)] = torch.zeros(shape)
    return out


def gguf_tensors(model: SwappableModel, arch: GgufArch, layers: list[GgufLayer]) -> dict[str, torch.Tensor]:
    """Every tensor of the file, float32, under its GGUF name, in llama.cpp's order (top tensors, then layers)."""
    from .llama import inverse_frequencies

    cfg = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {tensor_name(TOP_TENSORS[k.rsplit(".", 1)[0]], "weight"): sd[k]
           for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight") if k in sd}
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":  # llama.cpp divides each frequency by its factor
        base = inverse_frequencies(cfg.head_dim, cfg.rope_theta, None)
        out[tensor_name("ROPE_FREQS", "weight")] = base / inverse_frequencies(cfg.head_dim, cfg.rope_theta,
                                                                              cfg.rope_scaling)
    for bid, layer in enumerate(layers):
        out.update(_layer_tensors(sd, layer, bid, arch=arch, hidden=cfg.hidden_size))
    return out


def stored(w: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, object]:
    """(data, GGML type) of one tensor stored as ``gguf_type``: vectors stay float32 (as llama.cpp's converter keeps
    them), a q8_0 matrix whose rows do not split into q8_0 blocks is stored as f16."""
    import gguf

    a = w.contiguous().numpy().astype(np.float32)
    types = gguf.GGMLQuantizationType
    if a.ndim == 1 or gguf_type == "f32":
        return a, types.F32
    block = gguf.GGML_QUANT_SIZES[types.Q8_0][0]
    if gguf_type == "f16" or a.shape[-1] % block:
        return a.astype(np.float16), types.F16
    return gguf.quants.quantize(a, types.Q8_0), types.Q8_0


def _add_hparams(w, cfg, *, arch: GgufArch, layers: list[GgufLayer]) -> None:
    """The architecture's metadata: sizes (per layer for ``deci``), rotary settings, norm epsilon."""
    import gguf

    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(len(layers))
    heads, kv, ffn = ([getattr(la, f) for la in layers] for f in ("heads", "kv_heads", "ffn"))
    w.add_feed_forward_length(ffn if arch.per_layer else ffn[0])
    w.add_head_count(heads if arch.per_layer else heads[0])
    w.add_head_count_kv(kv if arch.per_layer else kv[0])
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    if (cfg.rope_scaling or {}).get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)


# ---- the tokenizer, as llama.cpp's converter writes a GPT-2-style byte-level BPE one ----
# The converter names the pre-tokenizer (``tokenizer.ggml.pre``) by hashing the token ids of this text; these are
# the names of the tokenizers of the decoders this toolkit reads (its table has many more).
CHK_TXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenate'
    'd) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
    'កាន់តែពិសេសអាច😁 ?我想在apple工作1314'
    '151天～ ------======= нещо на Български '
    '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told '
    "he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
}


def _byte_level(spec: dict) -> bool:
    """Whether a tokenizer.json's pre-tokenizer or decoder is byte-level (GPT-2 style)."""
    parts = [spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}]
    parts += [p for part in list(parts) for p in part.get("pretokenizers", part.get("decoders", []))]
    return any(p.get("type") == "ByteLevel" for p in parts)


# the split before byte-level BPE -> the llama.cpp pre-tokenizer that applies the same regex (a tokenizer of another
# vocabulary than the table's, e.g. a student's own, is named by its split)
SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
}


def _split_name(pre: dict) -> str | None:
    """The llama.cpp pre-tokenizer of a tokenizer.json pre-tokenizer: GPT-2's own (ByteLevel with its regex), or a
    known regex split before a ByteLevel without one; None when it is neither."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", [])
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel":
        return SPLIT_REGEXES.get(parts[0].get("pattern", {}).get("Regex"))
    return None


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer (``tokenizer.ggml.pre``); ExportError (one line) for a
    tokenizer this exporter cannot write: not a byte-level BPE, or a pre-tokenizer it cannot name."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("a GGUF export needs a fast tokenizer (tokenizer.json); this one is "
                          f"{type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    kind = spec.get("model", {}).get("type")
    if kind != "BPE" or not _byte_level(spec):
        raise ExportError(f"a GGUF export writes byte-level BPE tokenizers (GPT-2 style: Llama 3, SmolLM2, Qwen2); "
                          f"this one is {kind}{'' if kind != 'BPE' else ' without byte-level pre-tokenization'}")
    chkhsh = hashlib.sha256(str(tokenizer.encode(CHK_TXT)).encode()).hexdigest()
    if chkhsh in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[chkhsh]
    name = _split_name(spec.get("pre_tokenizer") or {})
    if name:
        return name
    raise ExportError(f"the tokenizer's pre-tokenizer is not one this exporter can name for llama.cpp (check hash "
                      f"{chkhsh[:16]}); export with `hf_dir` and convert with llama.cpp's convert_hf_to_gguf.py")


def vocab_entries(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types of every id below ``vocab_size``, as the converter's ``get_vocab_base`` makes them:
    added special tokens are control tokens, other added ones user-defined, ids without a token unused pads."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(reverse[i])
        if reverse[i] not in added:
            types.append(gguf.TokenType.NORMAL)
        else:
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
    return tokens, types


def _add_vocab(w, tokenizer, cfg) -> None:
    """Tokenizer metadata: model gpt2, pre-tokenizer, tokens, types; merges, special token ids and the chat template
    through gguf-py's ``SpecialVocab`` (what the converter uses), read from the tokenizer saved to a scratch folder
    with the model's own special ids beside it (the converter reads them from config.json where the tokenizer has
    none)."""
    import gguf

    pre = pre_tokenizer_name(tokenizer)
    vocab_size = cfg.vocab_size
    tokens, types = vocab_entries(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        ids = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        Path(scratch, "config.json").write_text(json.dumps(ids))
        gguf.SpecialVocab(scratch, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)


# ---- checks and the export ----
def check_gguf_available(gguf_type: str) -> None:
    """Fail early (before any work) when the gguf package is missing or the storage type is unknown."""
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"`gguf_type` must be one of {', '.join(GGUF_TYPES)}, got '{gguf_type}'")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ExportError("a GGUF export (`gguf_file`) needs the gguf package: pip install gguf") from None


def check_gguf_teacher(teacher: SwappableModel, tokenizer) -> None:
    """What the teacher alone decides (its family, activation and tokenizer), checked once it is loaded, before any
    training: ExportError (one line)."""
    _check_family(teacher.config)
    if tokenizer is None:
        raise ExportError("a GGUF export carries the tokenizer: none was given")
    pre_tokenizer_name(tokenizer)


def check_gguf(model: SwappableModel, tokenizer) -> tuple[GgufArch, list[GgufLayer]]:
    """Everything that would keep ``model`` and ``tokenizer`` from a GGUF that runs as trained (ExportError, one
    line), checked before anything is written; returns the architecture and layers it is written as."""
    check_gguf_teacher(model, tokenizer)
    return gguf_layers(model.config)


def export_gguf(model: SwappableModel, path: str | os.PathLike, tokenizer, *, gguf_type: str = "f16"
                ) -> tuple[Path, str]:
    """Write ``model`` as one GGUF file at ``path`` (``gguf_type`` f32, f16 or q8_0); returns (file, what was
    written: 'deci, 5 layers, f16', ...)."""
    import gguf

    check_gguf_available(gguf_type)
    arch, layers = check_gguf(model, tokenizer)
    cfg, out = model.config, Path(path)
    tensors = gguf_tensors(model.cpu().eval(), arch, layers)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    with staged_files([out]) as tmp:  # the file appears under its name only when complete
        w = gguf.GGUFWriter(str(tmp[out]), arch.name)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(out.stem)
        _add_hparams(w, cfg, arch=arch, layers=layers)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(w, tokenizer, cfg)
        for name, t in tensors.items():
            data, qtype = stored(t, gguf_type)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out, f"{arch.name}, {len(layers)} layers, {gguf_type}"
