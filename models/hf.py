"""Hugging Face checkpoints in and out: resolve a hub id or folder, rename its weights onto our model, export back.

transformers is used only to read configs and tokenizers and, for export, to write a ``BertForMaskedLM`` folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from .bert import BertForMaskedLM
from .config import ModelConfig

log = logging.getLogger(__name__)

class TeacherError(RuntimeError):
    """A teacher (or judge) folder that cannot be used: the message names the folder or file and the problem."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

# Hugging Face key -> our key. Applied in order; a key mapped to None is dropped.
RENAMES: list[tuple[str, str | None]] = [
    (r"^bert\.", ""),  # BertForMaskedLM / BertForPreTraining prefix (a bare BertModel has none)
    (r"\.gamma$", ".weight"),  # old TF-converted checkpoints (bert-base-uncased) name LayerNorm params gamma/beta
    (r"\.beta$", ".bias"),
    (r"^embeddings\.position_ids$", None),  # a buffer, not a weight
    (r"^pooler\..*", None),  # [CLS] pooler: unused by MLM and by our losses
    (r"^cls\.seq_relationship\..*", None),  # next-sentence head of BertForPreTraining
    (r"^cls\.predictions\.decoder\.bias$", None),  # same tensor as cls.predictions.bias
    (r"^cls\.predictions\.decoder\.weight$", None),  # tied to the word embeddings
]


def rename_key(key: str) -> str | None:
    for pattern, repl in RENAMES:
        if repl is None:
            if re.search(pattern, key):
                return None
        else:
            key = re.sub(pattern, repl, key)
    if not key.startswith("cls."):
        key = "bert." + key
    return key


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is, or a hub id downloaded (config, tokenizer, weights) into the HF cache."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"teacher '{name_or_path}' is a file; expected a folder with config.json and weights")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"teacher folder '{p}' has no config.json")
        if not any((p / f).is_file() for f in WEIGHT_FILES):
            raise FileNotFoundError(f"teacher folder '{p}' has no weights: looked for {', '.join(WEIGHT_FILES)}")
        return p
    if str(name_or_path).startswith((".", "/", "~")) or os.sep in str(name_or_path).strip("/").split("/", 1)[-1]:
        raise FileNotFoundError(f"teacher folder '{name_or_path}' does not exist")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.txt", "*.safetensors"]))
        if not any((local / f).is_file() for f in WEIGHT_FILES):
            local = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.txt", "pytorch_model*.bin"]))
    except Exception as e:  # noqa: BLE001 - hub errors come in many classes; the message is what matters
        raise FileNotFoundError(
            f"could not load teacher '{name_or_path}': not a local folder, and the Hugging Face Hub did not provide it "
            f"({type(e).__name__}: {e}). Offline? Pass --teacher LOCAL_FOLDER."
        ) from None
    if not any((local / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"hub model '{name_or_path}' has none of {', '.join(WEIGHT_FILES)}")
    return local


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # a fast tokenizer, or the word-piece vocabulary of a slow one


def load_error_reason(e: BaseException) -> str:
    """One line saying why a weights file could not be deserialised.

    PyTorch's weights-only refusal explains how to load the file anyway (``weights_only=False``, which would run
    arbitrary pickled code): that advice is never repeated to the user; only its diagnosis is kept.
    """
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = "holds objects that are not plain tensors (" + text[text.index(marker):].split("\n")[0].strip() + ")"
    elif "weights_only" in text:
        text = "not a file of plain tensors"
    first = " ".join(text.split())
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


CONFIG_SIZES = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")


def _config_json_problem(raw: object) -> str | None:
    """What is wrong with the fields of a BERT config.json that our model reads (types and ranges), or None."""
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(raw, dict):
        return f"expected a JSON object, found {type(raw).__name__}"
    for key in CONFIG_SIZES:
        v = raw.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            return f"{key} must be a positive integer, found {type(v).__name__} {v!r}"
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if key in raw and not (number(raw[key]) and 0 <= raw[key] <= 1):
            return f"{key} must be a number in [0, 1], found {raw[key]!r}"
    if "layer_norm_eps" in raw and not (number(raw["layer_norm_eps"]) and raw["layer_norm_eps"] > 0):
        return f"layer_norm_eps must be a number > 0, found {raw['layer_norm_eps']!r}"
    if "hidden_act" in raw and not isinstance(raw["hidden_act"], str):
        return f"hidden_act must be the name of an activation, found {raw['hidden_act']!r}"
    pad = raw.get("pad_token_id")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 0):
        return f"pad_token_id must be a token id (an integer >= 0), found {pad!r}"
    return None


def read_hf_config(name_or_path: str | os.PathLike):
    """The transformers config of a teacher (no weights are read); TeacherError when config.json is unusable: not
    JSON, a size that is not a positive integer, a number of heads that does not divide the hidden size, ..."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    folder = resolve_checkpoint(name_or_path)
    where = folder / "config.json"
    try:
        problem = _config_json_problem(json.loads(where.read_bytes().decode("utf-8")))
    except (ValueError, UnicodeDecodeError):
        problem = None  # not JSON: transformers says where below
    if problem:
        raise TeacherError(f"'{where}': {problem}")
    try:
        cfg = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:  # the last: transformers 5 checks
        raise TeacherError(f"'{where}' cannot be read: {' '.join(str(e).split())}") from None
    if getattr(cfg, "model_type", None) != "bert":
        raise TeacherError(f"'{folder / 'config.json'}': expected a BERT checkpoint (model_type 'bert'), found "
                           f"model_type '{getattr(cfg, 'model_type', None)}'")
    for key in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                "max_position_embeddings"):
        v = getattr(cfg, key, None)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise TeacherError(f"'{folder / 'config.json'}': {key} must be a positive integer, found {v!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise TeacherError(f"'{where}': num_attention_heads {cfg.num_attention_heads} does not divide hidden_size "
                           f"{cfg.hidden_size}: every head must have hidden_size / num_attention_heads dimensions")
    return cfg


def state_dict_mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], theirs: str = "checkpoint",
                        ours: str = "model") -> str | None:
    """What keeps ``sd`` from loading strictly into a module whose state dict is ``own`` (missing and unexpected
    keys, shape mismatches, a few of each), or None when it fits."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: {theirs} {tuple(sd[k].shape)} vs {ours} {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
             "shape mismatch " + ", ".join(shapes[:5]) if shapes else ""]
    return "; ".join(p for p in parts if p) or None


def check_teacher_files(name_or_path: str | os.PathLike, what: str = "teacher") -> Path:
    """Everything about a teacher folder that can be checked without reading its weights, before any work: config,
    weights and tokenizer files present, config.json's fields (``read_hf_config``), and the tokenizer loadable,
    complete and fitting the embedding (``load_tokenizer``); returns the folder."""
    folder = resolve_checkpoint(name_or_path)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise TeacherError(f"{what} folder '{folder}' has no tokenizer: looked for {', '.join(TOKENIZER_FILES)}")
    load_tokenizer(folder, read_hf_config(folder).vocab_size)
    return folder


def _tokenizer_file_problem(folder: Path) -> str | None:
    """A tokenizer file that cannot be what it claims: tokenizer.json that is not JSON, vocab.txt that is not a
    non-empty UTF-8 word list (checked only when it is what transformers builds the tokenizer from)."""
    fast, vocab = folder / "tokenizer.json", folder / "vocab.txt"
    try:
        if fast.is_file():
            json.loads(fast.read_bytes().decode("utf-8"))
        elif vocab.is_file():
            if not vocab.read_bytes().decode("utf-8").strip():
                return f"'{vocab}' is empty: a word-piece vocabulary has one token per line"
    except UnicodeDecodeError:
        return f"'{vocab if not fast.is_file() else fast}' is not UTF-8 text: not a tokenizer file"
    except ValueError as e:
        return f"'{fast}' is not valid JSON ({' '.join(str(e).split())[:80]})"
    return None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of a HF folder: safetensors preferred, sharded or not; .bin read with weights_only=True."""
    from safetensors.torch import load_file

    def load_one(f: Path) -> dict[str, torch.Tensor]:
        if f.suffix == ".safetensors":
            return load_file(str(f))
        return torch.load(f, map_location="cpu", weights_only=True)

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return load_one(folder / single)
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for s in shards:
                sd.update(load_one(folder / s))
            return sd
    raise FileNotFoundError(f"no weights in '{folder}': looked for {', '.join(WEIGHT_FILES)}")


def convert_hf_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Rename a HF state dict to ours. Returns (state dict, whether it has an MLM head)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        nk = rename_key(k)
        if nk is not None:
            out[nk] = v
    has_head = any(k.startswith("cls.predictions.transform") for k in out)
    dec = sd.get("cls.predictions.decoder.weight")
    emb = out.get("bert.embeddings.word_embeddings.weight")
    if dec is not None and emb is not None and dec.shape == emb.shape and not torch.equal(dec, emb):
        raise ValueError("this checkpoint's MLM decoder is not tied to the word embeddings, which we require")
    if has_head and "cls.predictions.bias" not in out:
        bias = sd.get("cls.predictions.decoder.bias")
        out["cls.predictions.bias"] = bias if bias is not None else torch.zeros(emb.shape[0])
    return out, has_head


def load_tokenizer(name_or_path: str | os.PathLike, vocab_size: int | None = None):
    """The folder's tokenizer; TeacherError when it is missing, unreadable, lacks BERT's special tokens, or makes
    token ids the model's embedding (``vocab_size`` rows) does not have."""
    from transformers import AutoTokenizer

    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise TeacherError(f"folder '{folder}' has no tokenizer: looked for {', '.join(TOKENIZER_FILES)}")
    problem = _tokenizer_file_problem(folder) if folder.is_dir() else None
    if problem:
        raise TeacherError(f"the tokenizer in '{name_or_path}' cannot be used: {problem}")
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
        tok("a probe sentence.")  # a vocabulary without the unknown token fails only when it encodes
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions for broken files
        raise TeacherError(f"the tokenizer in '{name_or_path}' cannot be loaded: {' '.join(str(e).split())}") from None
    missing = [t for t in ("cls_token", "sep_token", "pad_token", "mask_token") if getattr(tok, t + "_id") is None]
    if missing:
        raise TeacherError(f"the tokenizer in '{name_or_path}' lacks BERT's {', '.join(missing)}")
    if vocab_size is not None and len(tok) > vocab_size:
        raise TeacherError(f"the tokenizer in '{name_or_path}' has {len(tok)} tokens, more than the {vocab_size} rows "
                           "of the model's word embedding (config.json vocab_size): not this model's tokenizer")
    return tok


def load_teacher(name_or_path: str | os.PathLike = "bert-base-uncased", device: str | torch.device = "cpu"):
    """Load a HF BERT checkpoint (hub id or folder) into our model. Returns (model in eval mode, tokenizer).

    Anything wrong with the folder (config, weights, tokenizer, or weights that do not fit the config) raises
    TeacherError (FileNotFoundError when something is missing) naming the file and the problem.
    """
    folder = check_teacher_files(name_or_path)
    hf_config = read_hf_config(folder)
    try:
        raw = read_state_dict(folder)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip readers fail in many classes
        weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), folder)
        raise TeacherError(f"teacher weights '{weights}' cannot be read: {load_error_reason(e)}") from None
    try:
        sd, has_head = convert_hf_state_dict(raw)
        cfg = ModelConfig.from_hf(hf_config, has_mlm_head=has_head)
        model = BertForMaskedLM(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise TeacherError(f"teacher '{name_or_path}' cannot be used: {e}") from None
    problem = state_dict_mismatch(model.state_dict(), sd, "the weights", "config.json")
    if problem:
        raise TeacherError(f"the weights in '{folder}' do not match its config.json: {problem}")
    model.load_state_dict(sd)
    if not has_head:
        log.info("teacher '%s' has no masked-LM head: MLM metrics and losses are unavailable", name_or_path)
    model.source = str(name_or_path)
    tok = load_tokenizer(folder, cfg.vocab_size)
    return model.to(device).eval(), tok


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over parameter names and fp32 bytes: identifies a teacher independently of the file format."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def hf_export_problem(cfg: ModelConfig) -> str | None:
    """Why this model cannot be written as a plain HF BERT (BertForMaskedLM, or BertModel without a head), or None."""
    kinds = sorted({s.attention for s in cfg.layers} - {"mha"})
    if kinds:
        return f"layers with attention of kind {kinds}; HF BERT has plain multi-head attention only"
    shapes = {(s.num_heads, s.head_dim, s.intermediate_size) for s in cfg.layers}
    if len(shapes) > 1:
        return f"layers differ in shape (heads, head_dim, ffn): {sorted(shapes)}; HF BertConfig has one shape for all"
    heads, hd, _ = shapes.pop()
    if heads * hd != cfg.hidden_size:
        return f"heads x head_dim = {heads}x{hd} = {heads * hd} != hidden size {cfg.hidden_size}; HF BERT needs equality"
    return None


def export_hf(model: BertForMaskedLM, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` as a HF ``BertForMaskedLM`` folder (``BertModel`` without pooler when it has no MLM head).

    Only for models of one plain BERT shape (``hf_export_problem``); ``models.export.export_pretrained`` takes any.
    """
    from transformers import BertConfig
    from transformers import BertForMaskedLM as HFBertForMaskedLM
    from transformers import BertModel as HFBertModel

    cfg = model.config
    problem = hf_export_problem(cfg)
    if problem:
        raise ValueError(f"cannot export to Hugging Face format: {problem}")
    spec = cfg.layers[0]
    hf_cfg = BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=len(cfg.layers),
        num_attention_heads=spec.num_heads, intermediate_size=spec.intermediate_size, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        hidden_dropout_prob=cfg.hidden_dropout_prob, attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
    )
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if cfg.has_mlm_head:
        hf = HFBertForMaskedLM(hf_cfg)
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    else:
        hf = HFBertModel(hf_cfg, add_pooling_layer=False)
        sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"export mapping incomplete: missing {missing}, unexpected {unexpected}")
    from .staging import staged_folder

    out = Path(out_dir)
    with staged_folder(out) as tmp:  # the folder appears under its name only when complete
        hf.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out
