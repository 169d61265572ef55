"""DeciLM / Nemotron-NAS: transformers classes for a decoder written in NVIDIA's per-layer layout (``model_type``
``nemotron-nas``, ``architectures`` ``DeciLMForCausalLM``, one ``block_configs`` entry per layer), so that the folder
``models.nemotron_nas.export_nemotron_nas`` writes loads with ``trust_remote_code=True`` as vLLM and llama.cpp's
converter read it natively.

The model is our Llama-family decoder (``modeling_compact_llama``, ``llama.py``) built from the per-layer plan the
block configs describe; only the names change: the norms sit at the layer level (``input_layernorm``,
``post_attention_layernorm``; none for a no-op sublayer) and a linear attention is ``self_attn.linear_attn`` — the
same modules registered under the layout's names, nothing copied. Written next to the weights with the files it
imports.
"""
from __future__ import annotations

from .modeling_compact_llama import CompactLlamaConfig, CompactLlamaForCausalLM

FFN_GRID = 256  # DeciLM rounds every FFN width up to a multiple of this


def ffn_width(ffn_mult: float | None, hidden: int) -> int:
    """The FFN width of a block config's ``ffn_mult`` (None: no FFN): int(2 * mult * hidden / 3) rounded up to the
    grid, as DeciLM (and llama.cpp's converter) compute it."""
    if ffn_mult is None:
        return 0
    width = int(2 * ffn_mult * hidden / 3)
    return width if width % FFN_GRID == 0 else width + FFN_GRID - width % FFN_GRID


def layer_plan(block_configs: list[dict], *, heads: int, hidden: int) -> list[dict]:
    """Our per-layer plan (``LayerSpec`` dicts) of DeciLM block configs."""
    plan = []
    for i, block in enumerate(block_configs):
        attn, ffn = block["attention"], block["ffn"]
        if ffn.get("replace_with_linear"):
            raise ValueError(f"block {i}: a linear FFN (replace_with_linear) is not a unit this model has")
        width = 0 if ffn.get("no_op") else ffn_width(ffn.get("ffn_mult"), hidden)
        spec = {"num_heads": 0, "head_dim": 0, "intermediate_size": width, "origin": [i], "kind": "teacher",
                "attention": "none"}
        if attn.get("replace_with_linear"):
            spec["attention"] = "linear"
        elif not attn.get("no_op") and attn.get("n_heads_in_group"):
            kv = heads // attn["n_heads_in_group"]
            spec.update(num_heads=heads, head_dim=hidden // heads, attention="gqa" if kv < heads else "mha",
                        num_kv_heads=kv if kv < heads else None)
        plan.append(spec)
    return plan


class BlockConfig(dict):
    """A ``block_configs`` entry (or its ``attention`` / ``ffn`` part), readable as attributes too
    (``block.attention.no_op``), as vLLM reads NVIDIA's; it stays a dict for config.json."""

    def __init__(self, d: dict):
        super().__init__({k: BlockConfig(v) if isinstance(v, dict) else v for k, v in d.items()})

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DeciLMConfig(CompactLlamaConfig):
    """The Nemotron-NAS config: ``block_configs`` and the Llama fields; our plan is derived from them."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list | None = None, **kwargs):
        kwargs.pop("student", None)
        kwargs.pop("layer_plan", None)
        self.block_configs = [BlockConfig(b) for b in block_configs or []]
        heads, hidden = kwargs.get("num_attention_heads", 1), kwargs.get("hidden_size", 1)
        student = {"family": "llama", "model_type": "llama", "hidden_act": "silu", "num_key_value_heads": heads,
                   "num_hidden_layers": len(self.block_configs),
                   **{k: kwargs[k] for k in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                                             "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                                             "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
                      if kwargs.get(k) is not None}}
        super().__init__(student=student, layer_plan=layer_plan(self.block_configs, heads=heads, hidden=hidden),
                         **kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("student", None)  # derived from block_configs: not a second description of the model
        out.pop("layer_plan", None)
        return out


def _rename(parent, old: str, *, to, new: str) -> None:
    """Register ``parent.<old>`` under ``to.<new>`` instead; ``parent.<old>`` still reaches it for the code
    that uses it (a plain attribute, not a second registration: its weights have one name)."""
    module = parent._modules.pop(old, None)
    if module is not None:
        to.add_module(new, module)
        parent.__dict__[old] = module


class DeciLMForCausalLM(CompactLlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        for layer in self.model.layers:  # our modules under the layout's names
            _rename(layer.self_attn, "input_layernorm", to=layer, new="input_layernorm")
            _rename(layer.self_attn, "proj", to=layer.self_attn, new="linear_attn")
            if layer.mlp is not None:
                _rename(layer.mlp, "post_attention_layernorm", to=layer, new="post_attention_layernorm")
