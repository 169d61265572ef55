"""Hugging Face checkpoints in and out: resolve a hub id or folder, pick its family by ``model_type``, rename its
weights onto our model (the family's conversion table), export back.

transformers is used only to read configs and tokenizers and, for export, to write the family's plain class.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .base import SwappableModel
from .config import ModelConfig
from .families import family_for_model_type, family_of

log = logging.getLogger(__name__)

class TeacherError(RuntimeError):
    """A teacher (or judge) folder that cannot be used: the message names the folder or file and the problem."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is, or a hub id downloaded (config, tokenizer, weights) into the HF cache."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"teacher '{name_or_path}' is a file; "
                                    "expected a folder with config.json and weights")
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
            f"({type(e).__name__}: {e}). Offline? Give a local folder as `teacher`."
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
    """What is wrong with the fields of a config.json that our models read (types and ranges), or None: the sizes
    every family has, BERT's dropouts and eps, then the family's own fields where its module checks them
    (``config_json_problem``: a Llama's heads, head size, eps and rotary settings)."""
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
    try:  # the family's own fields (a Llama's heads, head size, eps, rotary settings), where it checks them
        family_check = getattr(family_for_model_type(raw.get("model_type")).module, "config_json_problem", None)
    except ValueError:
        return None  # a model type no family reads: named once transformers has read the file
    return family_check(raw) if family_check is not None else None


def _transformers_config(folder: Path, auto_config: Any) -> Any:
    """The folder's transformers config. A model type whose config class is remote code this repository writes
    itself (a family's ``REMOTE_CONFIGS``: Nemotron-NAS) is read with our own copy of that class, never with code
    from the folder."""
    import importlib

    model_type = json.loads((folder / "config.json").read_bytes().decode("utf-8")).get("model_type")
    try:
        own = getattr(family_for_model_type(model_type).module, "REMOTE_CONFIGS", {}).get(model_type)
    except ValueError:
        own = None
    if own is None:
        return auto_config.from_pretrained(str(folder))
    module, name = own.rsplit(".", 1)
    return getattr(importlib.import_module(f"{__package__}.{module}"), name).from_pretrained(str(folder))


def read_hf_config(name_or_path: str | os.PathLike):
    """The transformers config of a teacher (no weights are read); TeacherError when config.json is unusable: not
    JSON, a model type no family reads, a size that is not a positive integer, a number of heads that does not divide
    the hidden size, ..."""
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
        cfg = _transformers_config(folder, AutoConfig)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:  # the last: transformers 5 checks
        # transformers quotes fields in backticks, which the scripts would read as settings to name by their flags
        raise TeacherError(f"'{where}' cannot be read: {' '.join(str(e).split()).replace('`', chr(39))}") from None
    try:
        family = family_for_model_type(getattr(cfg, "model_type", None))
    except ValueError as e:
        raise TeacherError(f"'{where}': {e}") from None
    for key in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                "max_position_embeddings"):
        v = getattr(cfg, key, None)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise TeacherError(f"'{folder / 'config.json'}': {key} must be a positive integer, found {v!r}")
    if cfg.hidden_size % cfg.num_attention_heads and not getattr(cfg, "head_dim", None):
        raise TeacherError(f"'{where}': num_attention_heads {cfg.num_attention_heads} does not divide hidden_size "
                           f"{cfg.hidden_size}: every head must have hidden_size / num_attention_heads dimensions")
    try:  # our config's own rules, as transformers filled the file's gaps: what loading will build, built now
        family.config_from_hf(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise TeacherError(f"'{where}': {' '.join(str(e).split())}") from None
    return cfg


def config_from_hf(hf_config: Any, has_lm_head: bool = True) -> ModelConfig:
    """Our config (of the checkpoint's family) from a transformers config."""
    return family_for_model_type(hf_config.model_type).config_from_hf(hf_config, has_lm_head)


def state_dict_mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], *, theirs: str = "checkpoint",
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
    hf_config = read_hf_config(folder)
    load_tokenizer(folder, hf_config.vocab_size, required_tokens(hf_config))
    return folder


def required_tokens(hf_config: Any) -> tuple[str, ...]:
    """The special tokens the tokenizer of a checkpoint of this config's family must have (BERT's [MASK], ...)."""
    return getattr(family_for_model_type(hf_config.model_type).module, "REQUIRED_TOKENS", ())


def _tokenizer_file_problem(folder: Path) -> str | None:
    """A tokenizer file that cannot be what it claims: tokenizer.json that is not JSON, vocab.txt that is not a
    non-empty UTF-8 word list. Every one present is checked, also vocab.txt beside the tokenizer.json that
    transformers builds the tokenizer from: a damaged folder is refused, whichever of its files is read."""
    fast, vocab = folder / "tokenizer.json", folder / "vocab.txt"
    for f in (fast, vocab):
        if not f.is_file():
            continue
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return f"'{f}' is not UTF-8 text: not a tokenizer file"
        if f == vocab and not text.strip():
            return f"'{vocab}' is empty: a word-piece vocabulary has one token per line"
        try:
            if f == fast:
                json.loads(text)
        except ValueError as e:
            return f"'{fast}' is not valid JSON ({' '.join(str(e).split())[:80]})"
    return None


def _vocab_disagreement(folder: Path, tok: Any) -> str | None:
    """Where vocab.txt, beside the tokenizer.json the tokenizer was built from, gives a token another id than the
    tokenizer does (line n holds the token of id n; a token on several lines has its last one, as BERT's slow
    tokenizer reads it), or None: two vocabularies in one folder, and nothing would say which one is used."""
    fast, vocab = folder / "tokenizer.json", folder / "vocab.txt"
    if not (fast.is_file() and vocab.is_file()):
        return None
    lines = vocab.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    ids, loaded = {t: i for i, t in enumerate(lines)}, tok.get_vocab()
    wrong = [(t, i) for t, i in ids.items() if loaded.get(t) != i]
    if not wrong:
        return None
    t, i = wrong[0]
    found = f"id {loaded[t]}" if t in loaded else "no id"
    return (f"'{vocab}' does not match '{fast}', from which the tokenizer is built: {len(wrong)} of its {len(ids)} "
            f"tokens have another id there (line {i + 1}, {t[:40]!r}, has {found}); remove the file that is not this "
            "model's vocabulary")


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


def load_tokenizer(name_or_path: str | os.PathLike, vocab_size: int | None = None, required: tuple[str, ...] = ()):
    """The folder's tokenizer; TeacherError when it is missing, unreadable, lacks a ``required`` special token (e.g.
    BERT's ``mask_token``), or makes token ids the model's embedding (``vocab_size`` rows) does not have."""
    from transformers import AutoTokenizer

    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise TeacherError(f"folder '{folder}' has no tokenizer: looked for {', '.join(TOKENIZER_FILES)}")
    problem = _tokenizer_file_problem(folder) if folder.is_dir() else None
    if problem:
        raise TeacherError(f"the tokenizer in '{name_or_path}' cannot be used: {problem}")
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)  # never a folder's code
        tok("a probe sentence.")  # a vocabulary without the unknown token fails only when it encodes
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions for broken files
        raise TeacherError(f"the tokenizer in '{name_or_path}' cannot be loaded: {' '.join(str(e).split())}") from None
    disagreement = _vocab_disagreement(folder, tok) if folder.is_dir() else None
    if disagreement:
        raise TeacherError(f"the tokenizer in '{name_or_path}' cannot be used: {disagreement}")
    missing = [t for t in required if getattr(tok, t + "_id") is None]
    if missing:
        raise TeacherError(f"the tokenizer in '{name_or_path}' lacks {', '.join(missing)}")
    if vocab_size is not None and len(tok) > vocab_size:
        raise TeacherError(f"the tokenizer in '{name_or_path}' has {len(tok)} tokens, more than the {vocab_size} rows "
                           "of the model's word embedding (config.json vocab_size): not this model's tokenizer")
    return tok


def load_teacher(name_or_path: str | os.PathLike = "bert-base-uncased", device: str | torch.device = "cpu"):
    """Load a HF checkpoint (hub id or folder) of any supported family into our model. Returns (model in eval mode,
    tokenizer).

    Anything wrong with the folder (config, weights, tokenizer, or weights that do not fit the config) raises
    TeacherError (FileNotFoundError when something is missing) naming the file and the problem.
    """
    folder = check_teacher_files(name_or_path)
    hf_config = read_hf_config(folder)
    family = family_for_model_type(hf_config.model_type)
    try:
        raw = read_state_dict(folder)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip readers fail in many classes
        weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), folder)
        raise TeacherError(f"teacher weights '{weights}' cannot be read: {load_error_reason(e)}") from None
    try:
        sd, has_head = family.from_hf_state_dict(raw, family.config_from_hf(hf_config))
        cfg = family.config_from_hf(hf_config, has_head)
        model = family.model_class(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise TeacherError(f"teacher '{name_or_path}' cannot be used: {e}") from None
    problem = state_dict_mismatch(model.state_dict(), sd, theirs="the weights", ours="config.json")
    if problem:
        raise TeacherError(f"the weights in '{folder}' do not match its config.json: {problem}")
    model.load_state_dict(sd)
    if not has_head:
        log.info("teacher '%s' has no language-model head: LM metrics and losses are unavailable", name_or_path)
    model.source = str(name_or_path)
    tok = load_tokenizer(folder, cfg.vocab_size, required_tokens(hf_config))
    return model.to(device).eval(), tok


def dispatch(model: SwappableModel, device_map: str | dict[str, str | int]) -> SwappableModel:
    """Spread a loaded model over several devices with accelerate: ``device_map`` maps module names (``model.layers.3``)
    to devices, or is ``auto`` / ``balanced`` / ``sequential`` (accelerate places whole layers by free memory). Every
    layer then runs on its device and the hidden state follows it (``accelerate.dispatch_model`` moves the inputs of
    each placed module; ``layer_device`` lets code that calls a layer's parts do the same)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "sequential"):
            raise ValueError(f"device map must be auto, balanced, sequential or a module -> device mapping, got "
                             f"'{device_map}'")
        no_split = [type(model.layers[0]).__name__]
        memory = get_balanced_memory(model, no_split_module_classes=no_split) if device_map != "sequential" else None
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    bad = sorted({str(d) for d in device_map.values()} & {"disk", "meta"})
    if bad:
        raise ValueError(f"device map: {bad} is not supported here (layers are called part by part); place every "
                         "module on a device")
    def owner(n: str) -> str:  # the layer (model.layers.3) or module (lm_head) a parameter belongs to
        layer = re.match(r"(.*?layers\.\d+)\.", n)
        return layer.group(1) if layer else (n.rpartition(".")[0] or n)

    unplaced = list(dict.fromkeys(owner(n) for n, _ in model.named_parameters()
                                  if not any(k in ("", n) or n.startswith(k + ".") for k in device_map)))
    if unplaced:
        raise ValueError(f"device map: no device for {', '.join(unplaced[:4])}"
                         f"{f' and {len(unplaced) - 4} more modules' if len(unplaced) > 4 else ''}; place every "
                         "module (model.embed_tokens, model.layers.N, model.norm, lm_head, ...)")
    model = dispatch_model(model, device_map=dict(device_map))
    model.device_map = dict(device_map)
    return model


def layer_device(layer: torch.nn.Module) -> torch.device | None:
    """The device a layer's weights are on (None for a layer without weights)."""
    p = next(layer.parameters(), None)
    return p.device if p is not None else None


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over parameter names and fp32 bytes: identifies a teacher independently of the file format."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def hf_export_problem(cfg: ModelConfig) -> str | None:
    """Why this model cannot be written as its family's plain transformers class, or None."""
    return family_of(cfg).module.plain_export_problem(cfg)


GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_generation_config(folder: str | os.PathLike | None) -> dict[str, Any]:
    """A checkpoint folder's generation_config.json ({} where there is none, or it is not a JSON object; a file that
    is not JSON is named in a warning and not used): what ``generate()`` of the teacher stops at."""
    f = Path(folder) / "generation_config.json" if folder else None
    if f is None or not f.is_file():
        return {}
    try:
        gen = json.loads(f.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("'%s' is not JSON (%s): its generation settings are not used", f, e)
        return {}
    return gen if isinstance(gen, dict) else {}


def teacher_generation(model: SwappableModel, tokenizer=None) -> dict[str, Any] | None:
    """The generation settings a decoder's export carries, so that ``generate()`` stops where the teacher's does (its
    end-of-turn token): the teacher folder's generation_config.json as it is (found beside the tokenizer, which is
    loaded from the teacher's folder; ``load_tokenizer``), with the bos / eos token ids of the model's config where
    it has none. None for a masked LM, which does not generate."""
    if model.TASK != "causal":
        return None
    gen = read_generation_config(getattr(tokenizer, "name_or_path", None))
    for key in GENERATION_IDS[:2]:
        if gen.get(key) is None and getattr(model.config, key, None) is not None:
            gen[key] = getattr(model.config, key)
    return gen


def generation_ids(cfg: ModelConfig, generation: dict[str, Any] | None) -> dict[str, Any]:
    """The bos / eos / pad token ids of an export's config.json: the model config's, else those of its generation
    settings (``teacher_generation``), where either has one."""
    ids = {k: getattr(cfg, k, None) for k in GENERATION_IDS}
    ids = {k: v if v is not None else (generation or {}).get(k) for k, v in ids.items()}
    return {k: v for k, v in ids.items() if v is not None}


def write_generation(folder: Path, generation: dict[str, Any] | None) -> None:
    """generation_config.json in an export ``folder`` (nothing for None)."""
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def export_hf(model: SwappableModel, out_dir: str | os.PathLike, tokenizer=None, *,
              generation: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as its family's plain transformers class (BertForMaskedLM, LlamaForCausalLM, ...), with the
    ``generation`` settings (``teacher_generation``) of a decoder.

    Only for models of the teacher's one shape (``hf_export_problem``); ``models.export.export_pretrained`` takes any.
    """
    cfg = model.config
    module = family_of(cfg).module
    problem = module.plain_export_problem(cfg)
    if problem:
        raise ValueError(f"cannot export to Hugging Face format: {problem}")
    hf = module.to_hf_model(cfg)
    sd = module.to_hf_state_dict(model)
    if getattr(hf.config, "tie_word_embeddings", False) and "lm_head.weight" in hf.state_dict():
        sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"export mapping incomplete: missing {missing}, unexpected {unexpected}")
    from .staging import staged_folder

    for key, value in generation_ids(cfg, generation).items():
        setattr(hf.config, key, value)
    out = Path(out_dir)
    with staged_folder(out) as tmp:  # the folder appears under its name only when complete
        hf.save_pretrained(str(tmp))
        write_generation(tmp, generation)  # the teacher's, in place of one transformers derives from the config
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))  # with the teacher's chat template
    return out
