"""Export of a decoder student in the DeciLM / Nemotron-NAS Hugging Face layout (``--hf-layout nemotron-nas``): what
vLLM (``DeciLMForCausalLM``), TensorRT-LLM and llama.cpp's ``convert_hf_to_gguf.py`` read natively.

config.json holds one ``block_configs`` entry per layer: ``attention`` {``no_op``, ``replace_with_linear``,
``n_heads_in_group``} and ``ffn`` {``no_op``, ``replace_with_linear``, ``ffn_mult``}. The layout has one query-head
count and one head size for every layer, and an FFN width of int(2 * ffn_mult * hidden / 3) rounded up to a multiple
of 256; what it cannot express (fewer query heads, another head size, a width off that grid, biases) is refused in
one line naming the layer, before anything is written. The weights keep Llama's names, the norms at the layer level
(none for a no-op sublayer), a linear attention as ``self_attn.linear_attn``. The folder also holds the modeling code
(``modeling_nemotron_nas.py`` and the files it imports: our Llama decoder) for ``trust_remote_code=True``, and the
tokenizer; it is written into a temporary folder and renamed when complete (``models.staging``).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .base import SwappableModel
from .export import ExportError, check_writable_target, remote_files
from .modeling_nemotron_nas import FFN_GRID, ffn_width
from .staging import staged_folder

WRAPPER = "modeling_nemotron_nas"


def layout_width(width: int) -> int:
    """The FFN width on the layout's grid nearest ``width`` (0 stays 0: no FFN): a multiple of ``FFN_GRID``, at
    least one step; what the planner snaps a narrower-FFN option to for vLLM."""
    if width == 0:
        return 0
    return max(FFN_GRID, round(width / FFN_GRID) * FFN_GRID)


def _ffn_mult(width: int, hidden: int) -> float:
    return round(1.5 * width / hidden, 6)


def layer_problem(i: int, spec, cfg, *, engine: str | None = None) -> str | None:
    """Why layer ``i`` (``spec``, of a model of ``cfg``) cannot be written in the layout, or, with ``engine``
    (``vllm``), cannot run there as written (vLLM runs no-op sublayers and per-layer KV heads, not the linear
    replacements); None when it can. The one rule the exporter refuses by and the planner filters by."""
    if spec.attention not in ("mha", "gqa", "none", "linear"):
        return f"layer {i}: attention kind '{spec.attention}' has no block config"
    if spec.attention in ("mha", "gqa") and (spec.num_heads, spec.head_dim) != (cfg.num_attention_heads, cfg.head_dim):
        return (f"layer {i}: {spec.num_heads} query heads of {spec.head_dim}; the layout has one query-head count and "
                f"head size for every layer (the teacher's {cfg.num_attention_heads} of {cfg.head_dim})")
    width, hidden = spec.intermediate_size, cfg.hidden_size
    if width and ffn_width(_ffn_mult(width, hidden), hidden) != width:
        return (f"layer {i}: FFN width {width} is off the layout's grid (int(2 * ffn_mult * {hidden} / 3) rounded up "
                f"to a multiple of {FFN_GRID})")
    if engine == "vllm" and spec.attention == "linear":
        return f"layer {i}: a linear attention (replace_with_linear), which vLLM's DeciLM does not run"
    return None


def _ffn(width: int, hidden: int) -> dict:
    if width == 0:
        return {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
    return {"no_op": False, "replace_with_linear": False, "ffn_mult": _ffn_mult(width, hidden)}


def _attention(spec) -> dict:
    if spec.attention == "none":
        return {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    if spec.attention == "linear":
        return {"no_op": False, "replace_with_linear": True, "n_heads_in_group": None}
    return {"no_op": False, "replace_with_linear": False, "n_heads_in_group": spec.num_heads // spec.kv_heads}


HF_LAYOUTS = ("auto", "nemotron-nas")  # auto: the plain class, or our remote-code folder (models.export)


def check_nemotron_nas_model(cfg) -> None:
    """What the layout cannot express of a whole model (its family, biases, activation, head size): ExportError
    (one line); checked on the teacher before any training."""
    if getattr(cfg, "family", "") != "llama":
        raise ExportError(f"the Nemotron-NAS layout (`hf_layout`) is for decoders of the Llama family; this is a "
                          f"{cfg.family or 'bert'} model")
    problem = ("biases (q/k/v, output or FFN)" if cfg.qkv_bias or cfg.attention_bias or cfg.mlp_bias else
               f"activation '{cfg.hidden_act}'" if cfg.hidden_act != "silu" else
               f"head_dim {cfg.head_dim} with {cfg.num_attention_heads} heads of hidden {cfg.hidden_size}"
               if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size else None)
    if problem:
        raise ExportError(f"cannot write the Nemotron-NAS layout: it has no {problem}")


def block_configs(cfg) -> list[dict]:
    """The ``block_configs`` of a model of ``cfg``; ExportError (one line) for what the layout cannot express."""
    check_nemotron_nas_model(cfg)
    for i, s in enumerate(cfg.layers):
        if (problem := layer_problem(i, s, cfg)) is not None:
            raise ExportError(f"cannot write the Nemotron-NAS layout: {problem}")
    return [{"attention": _attention(s), "ffn": _ffn(s.intermediate_size, cfg.hidden_size)} for s in cfg.layers]


def nemotron_nas_config(cfg) -> dict:
    """config.json of the layout: the block configs, the Llama fields, and the auto classes of the folder's code."""
    keys = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings",
            "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id",
            "pad_token_id")
    return {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
            "auto_map": {"AutoConfig": f"{WRAPPER}.DeciLMConfig",
                         "AutoModelForCausalLM": f"{WRAPPER}.DeciLMForCausalLM"},
            "block_configs": block_configs(cfg), "num_hidden_layers": len(cfg.layers), "hidden_act": "silu",
            "num_key_value_heads": cfg.num_key_value_heads, "attention_bias": False, "mlp_bias": False,
            **{k: getattr(cfg, k) for k in keys}, "torch_dtype": "float32"}


def nemotron_nas_state_dict(model: SwappableModel) -> dict[str, torch.Tensor]:
    """Our weights under the layout's names: Llama's (``to_hf_state_dict``), a linear attention's as ``linear_attn``."""
    from .llama import to_hf_state_dict

    return {k.replace(".self_attn.proj.", ".self_attn.linear_attn."): v.to(torch.float32).contiguous()
            for k, v in to_hf_state_dict(model).items()}


def export_nemotron_nas(model: SwappableModel, out_dir: str | os.PathLike, tokenizer=None) -> tuple[Path, str]:
    """Write ``model`` as a Nemotron-NAS folder; returns (folder, what was written)."""
    from safetensors.torch import save_file

    check_writable_target(out_dir, "export folder", is_dir=True)
    config = nemotron_nas_config(model.config)  # refuses before anything is written
    out = Path(out_dir)
    with staged_folder(out) as tmp:
        save_file(nemotron_nas_state_dict(model.cpu().eval()), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in remote_files(WRAPPER):
            shutil.copyfile(f, tmp / f.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out, "DeciLMForCausalLM (Nemotron-NAS; transformers: trust_remote_code=True)"
