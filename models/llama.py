"""The Llama family (Llama 2/3, SmolLM2, Qwen2, Mistral without a sliding window): a from-scratch decoder whose
attention blocks and layers can be swapped, and its Hugging Face conversion.

A layer is two pre-norm sublayers added to the residual stream:

    x = x + attention(input_layernorm(x))        # the block: RMSNorm, rotary q/k, grouped-query causal attention
    x = x + mlp(post_attention_layernorm(x))     # SwiGLU: down(silu(gate(x)) * up(x))

Each sublayer owns its norm here (``self_attn.input_layernorm``, ``mlp.post_attention_layernorm``), so a block
retrained, replaced by a linear map or removed takes its norm with it; apart from that, module names mirror Hugging
Face ``LlamaForCausalLM`` (``RENAMES`` moves the two norms). Attention kinds (``models.kinds``): ``mha``/``gqa``
(``LlamaAttention``), ``linear`` (one linear map of the normalised hidden state) and ``none`` (no attention).
A layer with ``intermediate_size`` 0 has no feed-forward part, so a layer with attention ``none`` and no
feed-forward part is a dropped layer (the identity).

torch only (transformers inside the conversion functions): this file is copied next to exported models.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kinds import get_kind, implements
from .base import (AttentionTrace, SwappableAttention, SwappableLayer, SwappableModel, activation, apply_renames,
                   attend, init_weights, repeat_kv)
from .config import LayerSpec, ModelConfig

MODEL_TYPES = ("llama", "qwen2", "mistral")
# model types whose config class is remote code this repository writes (models/<module>.py), read with that class
REMOTE_CONFIGS = {"nemotron-nas": "modeling_nemotron_nas.DeciLMConfig"}
# the rotary scalings ``inverse_frequencies`` implements, each with the parameters it reads
ROPE_FIELDS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
ROPE_TYPES = tuple(ROPE_FIELDS)


@dataclass
class LlamaConfig(ModelConfig):
    """A Llama-style decoder. ``model_type`` is the Hugging Face one it came from (llama, qwen2, mistral): it decides
    the plain export class and Qwen2's q/k/v biases. ``rope_scaling``: None, or a dict with ``rope_type`` linear or
    llama3 and that type's parameters."""

    num_key_value_heads: int | None = None  # None: as many as query heads
    head_dim: int | None = None  # None: hidden_size / num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False  # q/k/v/o biases (Llama); Qwen2 has q/k/v biases always
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    sliding_window: int | None = None  # longest sequence it may run on (a window is not implemented)
    hidden_act: str = "silu"
    pad_token_id: int = 0

    family: ClassVar[str] = "llama"

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got '{self.model_type}'")
        if self.num_attention_heads <= 0:
            raise ValueError(f"num_attention_heads must be positive, got {self.num_attention_heads}")
        problem = settings_problem(heads=self.num_attention_heads, hidden=self.hidden_size,
                                   kv_heads=self.num_key_value_heads, head_dim=self.head_dim, eps=self.rms_norm_eps
                                   ) or rope_problem(self.rope_theta, self.rope_scaling)
        if problem:
            raise ValueError(problem)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.rope_theta = float(self.rope_theta)
        super().__post_init__()

    def explicit_head_dim(self) -> bool:
        return True

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    def teacher_layer(self, i: int) -> LayerSpec:
        gqa = self.num_key_value_heads < self.num_attention_heads
        return LayerSpec(self.num_attention_heads, self.head_dim, self.intermediate_size, [i],
                         attention="gqa" if gqa else "mha", num_kv_heads=self.num_key_value_heads if gqa else None)

    @classmethod
    def from_hf(cls, hf: Any, has_lm_head: bool = True) -> "LlamaConfig":
        """Read a transformers ``LlamaConfig`` / ``Qwen2Config`` / ``MistralConfig`` (4.x or 5.x), or a Nemotron-NAS
        ``DeciLMConfig`` (its per-layer plan derived from its block configs)."""
        if getattr(hf, "block_configs", None) is not None:
            return ModelConfig.from_dict({**hf.student, "layers": hf.layer_plan})
        model_type = getattr(hf, "model_type", "llama")
        theta, scaling = _rope_settings(hf)
        window = getattr(hf, "sliding_window", None)
        if model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
            window = None
        return cls(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
            max_position_embeddings=hf.max_position_embeddings, hidden_act=hf.hidden_act,
            pad_token_id=hf.pad_token_id if isinstance(getattr(hf, "pad_token_id", None), int) else 0,
            num_key_value_heads=getattr(hf, "num_key_value_heads", None), head_dim=getattr(hf, "head_dim", None),
            rms_norm_eps=hf.rms_norm_eps, rope_theta=theta, rope_scaling=scaling,
            attention_bias=bool(getattr(hf, "attention_bias", False)), mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), model_type=model_type,
            bos_token_id=getattr(hf, "bos_token_id", None), eos_token_id=getattr(hf, "eos_token_id", None),
            sliding_window=window,
        )


def _rope_settings(hf: Any) -> tuple[Any, dict | None]:
    """(rope_theta, rope_scaling or None) from a transformers 5 ``rope_parameters`` or a 4.x ``rope_theta`` +
    ``rope_scaling`` config (an object, or config.json read into a ``SimpleNamespace``); ValueError when the rope
    settings are not an object."""
    key = "rope_parameters" if getattr(hf, "rope_parameters", None) is not None else "rope_scaling"
    params = getattr(hf, key, None) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{key} must be an object (rope_type and its parameters) or null, found {params!r}")
    params = dict(params)
    theta = params.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    return theta, ({"rope_type": rope_type, **params} if rope_type != "default" else None)


def _positive(v: Any) -> bool:
    """A finite number > 0 (a boolean is not a number)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _whole(v: Any) -> bool:
    """An integer >= 1 (a boolean is not one)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def rope_problem(theta: Any, scaling: Any, field: str = "rope_scaling") -> str | None:
    """What is wrong with rotary settings (``rope_theta``, and ``scaling`` read from the config field ``field``):
    a type ``inverse_frequencies`` does not implement, a parameter of the type missing or not a positive number."""
    if not _positive(theta):
        return f"rope_theta must be a finite number > 0, found {theta!r}"
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        return f"{field} must be an object (rope_type and its parameters) or null, found {scaling!r}"
    kind = scaling.get("rope_type", "default")
    if kind not in ROPE_FIELDS:
        return f"{field}: rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
    missing = [k for k in ROPE_FIELDS[kind] if k not in scaling]
    if missing:
        return f"{field}: rope type '{kind}' needs {', '.join(missing)}"
    bad = [k for k in ROPE_FIELDS[kind] if not _positive(scaling[k])]
    if bad:
        return f"{field}: {bad[0]} must be a finite number > 0, found {scaling[bad[0]]!r}"
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        return (f"{field}: high_freq_factor {scaling['high_freq_factor']!r} must be above low_freq_factor "
                f"{scaling['low_freq_factor']!r} (llama3 scaling interpolates between the two)")
    return None


def _heads_problem(*, heads: Any, hidden: Any, kv_heads: Any, head_dim: Any) -> str | None:
    """What is wrong with the head layout: key/value heads that are not a whole number or do not divide the query
    heads, a head size that is not a whole even number (rotary embeddings turn pairs of dimensions). ``kv_heads`` and
    ``head_dim`` None: the defaults (as many as query heads; hidden_size / num_attention_heads)."""
    if kv_heads is not None and not _whole(kv_heads):
        return f"num_key_value_heads must be a whole number >= 1, found {kv_heads!r}"
    if kv_heads is not None and _whole(heads) and heads % kv_heads:
        return (f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}: each key/value head "
                "serves a whole group of query heads")
    if head_dim is not None and not _whole(head_dim):
        return f"head_dim must be a whole number >= 1, found {head_dim!r}"
    if head_dim is None and _whole(heads) and _whole(hidden):
        if hidden % heads:
            return (f"num_attention_heads {heads} does not divide hidden_size {hidden} (and the config gives no "
                    "head_dim)")
        head_dim, field = hidden // heads, f"hidden_size / num_attention_heads ({hidden} / {heads})"
    else:
        field = "head_dim"
    if head_dim is not None and head_dim % 2:
        return f"{field} is {head_dim}: a head size must be even (rotary embeddings turn pairs of dimensions)"
    return None


def settings_problem(*, heads: Any, hidden: Any, kv_heads: Any, head_dim: Any, eps: Any) -> str | None:
    """What is wrong with a Llama-family config's heads, head size or RMSNorm eps, named by their config.json
    fields, or None (the rotary settings: ``rope_problem``)."""
    if not _positive(eps):
        return f"rms_norm_eps must be a finite number > 0, found {eps!r}"
    return _heads_problem(heads=heads, hidden=hidden, kv_heads=kv_heads, head_dim=head_dim)


def config_json_problem(raw: dict) -> str | None:
    """What is wrong with the Llama-family fields of a config.json (read as JSON), or None: checked before
    transformers reads the file, so every transformers version gives the same message, naming the field. The rotary
    settings are checked wherever the file gives them (``rope_theta`` and ``rope_scaling``, which transformers 4
    reads, and ``rope_parameters``, which transformers 5 reads)."""
    from types import SimpleNamespace

    theta = raw.get("rope_theta", LlamaConfig.rope_theta)
    problem = rope_problem(theta, None)
    for key in ("rope_scaling", "rope_parameters"):
        if problem or raw.get(key) is None:
            continue
        try:
            problem = rope_problem(*_rope_settings(SimpleNamespace(**{key: raw[key], "rope_theta": theta})), key)
        except ValueError as e:
            problem = str(e)
    return problem or settings_problem(
        heads=raw.get("num_attention_heads"), hidden=raw.get("hidden_size"), kv_heads=raw.get("num_key_value_heads"),
        head_dim=raw.get("head_dim"), eps=raw.get("rms_norm_eps", LlamaConfig.rms_norm_eps))


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """The rotary inverse frequencies [head_dim / 2] of plain, linear-scaled or Llama-3-scaled RoPE."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return inv / scaling["factor"]
    if kind != "llama3":
        return inv
    # Llama 3: long wavelengths slowed down by `factor`, short ones kept, the band between interpolated smoothly
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > context / low, inv / factor, inv)
    smooth = (context / wavelen - low) / (high - low)
    between = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [B, H, T, d] ``x`` (halves rotated against each other, as Llama's checkpoints expect)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class KVCache:
    """Keys and values of the tokens seen so far, per layer (layers without attention keep nothing)."""

    def __init__(self) -> None:
        self.layers: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # attention block -> its keys, values
        self.length = 0  # tokens cached

    def update(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.layers:
            pk, pv = self.layers[layer]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


@dataclass
class LlamaContext:
    """What every layer receives: the attention mask (None: plain causal), positions, rotary settings and, when
    generating, the KV cache. Rotary cos/sin are computed once per head size and shared by every layer."""

    mask: torch.Tensor | None
    positions: torch.Tensor  # [T], or [B, T] when rows are padded on the left
    theta: float
    scaling: dict | None
    causal: bool = True  # with mask None: causal (prefill) or not (one new token attends to the whole cache)
    cache: KVCache | None = None
    _rotary: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "LlamaContext":
        """The context on another device (a teacher spread over several devices moves it with the hidden state)."""
        if self.positions.device == torch.device(device):
            return self
        mask = self.mask.to(device, non_blocking=non_blocking) if self.mask is not None else None
        return LlamaContext(mask, self.positions.to(device, non_blocking=non_blocking), self.theta, self.scaling,
                            self.causal, self.cache)

    def rotary(self, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if head_dim not in self._rotary:
            inv = inverse_frequencies(head_dim, self.theta, self.scaling).to(self.positions.device)
            freqs = self.positions.float()[..., None] * inv
            emb = torch.cat([freqs, freqs], dim=-1)
            if emb.dim() == 3:  # positions per row [B, T]: broadcast over the heads of [B, H, T, d]
                emb = emb[:, None]
            self._rotary[head_dim] = (emb.cos(), emb.sin())
        cos, sin = self._rotary[head_dim]
        return cos.to(dtype), sin.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def reset_norm(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


ATTENTION: dict[str, type[SwappableAttention]] = {}  # attention kind -> block class


class LlamaBlock(SwappableAttention):
    """A pre-norm attention block: what it adds to the residual stream is computed from its own norm's output."""

    FROZEN = ("input_layernorm",)
    ATTENTION_KIND = ""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def projection_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the block's projections read: the normalised hidden state."""
        return self.input_layernorm(x)

    def finish(self, x: torch.Tensor, contribution: torch.Tensor) -> torch.Tensor:
        return x + contribution


@implements(ATTENTION, "gqa")
@implements(ATTENTION, "mha")
class LlamaAttention(LlamaBlock):
    """Causal grouped-query attention with rotary q/k: ``num_kv_heads`` key/value heads, each shared by
    ``num_heads / num_kv_heads`` consecutive query heads (``mha``: one each)."""

    ROTARY = True  # q and k are rotated by position: a smaller head size cannot be projected from the teacher's

    def __init__(self, cfg: LlamaConfig, num_heads: int, head_dim: int, *, num_kv_heads: int | None = None):
        super().__init__(cfg)
        kv = num_kv_heads or num_heads
        if num_heads % kv:
            raise ValueError(f"num_kv_heads must divide num_heads {num_heads}, got {kv}")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, kv
        D, bias = cfg.hidden_size, cfg.qkv_bias
        self.q_proj = nn.Linear(D, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(D, kv * head_dim, bias=bias)
        self.v_proj = nn.Linear(D, kv * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, D, bias=cfg.attention_bias)
        self.dropout_p = 0.0

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "gqa" if self.num_kv_heads < self.num_heads else "mha"

    def shape(self) -> dict[str, Any]:
        gqa = self.kind == "gqa"
        return {"num_heads": self.num_heads, "head_dim": self.head_dim, "attention": self.kind,
                **({"num_kv_heads": self.num_kv_heads} if gqa else {})}

    def heads(self, x: torch.Tensor, ctx: LlamaContext, need_trace: bool = False
              ) -> tuple[torch.Tensor, AttentionTrace | None]:
        """Each head's mixed values, concatenated [B, T, heads * head_dim], before the output projection."""
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rotary(self.head_dim, q.dtype)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self, k, v)
        group = self.num_heads // self.num_kv_heads
        out, trace = attend(q, repeat_kv(k, group), repeat_kv(v, group), mask=ctx.mask, dropout=self.dropout_p,
                            training=self.training, need_trace=need_trace, causal=ctx.causal)
        return out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim), trace

    def contribution(self, x: torch.Tensor, ctx: LlamaContext, need_trace: bool = False
                     ) -> tuple[torch.Tensor, AttentionTrace | None]:
        out, trace = self.heads(x, ctx, need_trace)
        return self.o_proj(out), trace


@implements(ATTENTION, "linear")
class LlamaLinearAttention(LlamaBlock):
    """Attention replaced by one linear map of the normalised hidden state, token by token (no mixing of tokens)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)

    kind = "linear"

    def shape(self) -> dict[str, Any]:
        return {"num_heads": 0, "head_dim": 0, "attention": "linear"}

    def contribution(self, x: torch.Tensor, ctx: Any = None, need_trace: bool = False
                     ) -> tuple[torch.Tensor, AttentionTrace | None]:
        if need_trace:
            raise ValueError("a linear block has no attention distributions to compare")
        return self.proj(self.input_layernorm(x)), None


@implements(ATTENTION, "none")
class LlamaNoAttention(SwappableAttention):
    """No attention at all: the layer passes its input straight to its feed-forward part."""

    kind = "none"

    def __init__(self, cfg: LlamaConfig):
        super().__init__()

    def shape(self) -> dict[str, Any]:
        return {"num_heads": 0, "head_dim": 0, "attention": "none"}

    def contribution(self, x: torch.Tensor, ctx: Any = None, need_trace: bool = False
                     ) -> tuple[torch.Tensor, AttentionTrace | None]:
        if need_trace:
            raise ValueError("a layer without attention has no attention distributions to compare")
        return torch.zeros_like(x), None

    def finish(self, x: torch.Tensor, contribution: torch.Tensor) -> torch.Tensor:
        return x + contribution

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return x


class LlamaMLP(nn.Module):
    """Pre-norm SwiGLU feed-forward: what it adds to the residual stream."""

    def __init__(self, cfg: LlamaConfig, size: int):
        super().__init__()
        D = cfg.hidden_size
        self.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(D, size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(D, size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(size, D, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def neurons(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden activations [.., size] the down projection reads."""
        h = self.post_attention_layernorm(x)
        return self.act(self.gate_proj(h)) * self.up_proj(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.neurons(x))


class LlamaDecoderLayer(SwappableLayer):
    ATTENTION = "self_attn"

    def __init__(self, cfg: LlamaConfig, spec: LayerSpec):
        super().__init__()
        self.self_attn = make_block(cfg, spec)
        self.mlp = LlamaMLP(cfg, spec.intermediate_size) if spec.intermediate_size > 0 else None

    # the feed-forward projections, by the names every family's initialisers use
    up_proj = property(lambda self: self.mlp.up_proj if self.mlp is not None else None)
    down_proj = property(lambda self: self.mlp.down_proj if self.mlp is not None else None)
    gate_proj = property(lambda self: self.mlp.gate_proj if self.mlp is not None else None)

    def ffn_norm(self) -> nn.Module | None:
        """The norm that belongs to the feed-forward part (Llama: the RMSNorm before it)."""
        return self.mlp.post_attention_layernorm if self.mlp is not None else None

    def feed_forward(self, a: torch.Tensor) -> torch.Tensor:
        return a if self.mlp is None else a + self.mlp(a)

    def neurons(self, a: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            raise ValueError("a layer without a feed-forward part has no neurons")
        return self.mlp.neurons(a)


def make_block(cfg: LlamaConfig, spec: LayerSpec) -> SwappableAttention:
    """The attention block of ``spec``'s kind."""
    if spec.attention not in ATTENTION:
        raise ValueError(f"attention kind '{spec.attention}' is not available for Llama; available: "
                         f"{', '.join(ATTENTION)}")
    fields = ("num_heads", "head_dim", *get_kind(spec.attention).fields) if get_kind(spec.attention).has_heads else ()
    return ATTENTION[spec.attention](cfg, **{k: getattr(spec, k) for k in fields})


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, spec) for spec in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(SwappableModel):
    """Token embeddings, decoder layers, final RMSNorm and the LM head (tied to the embeddings or its own)."""

    LAYERS = ("model", "layers")
    TASK = "causal"

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(init_weights)

    make_block = staticmethod(make_block)
    make_layer = staticmethod(LlamaDecoderLayer)

    @property
    def has_lm_head(self) -> bool:
        return True

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def context(self, attention_mask: torch.Tensor | None, seq_len: int | None = None, cache: KVCache | None = None,
                *, always_mask: bool = False) -> LlamaContext:
        """Causal attention over padded rows (a [B, T] 0/1 mask; None or all ones: no padding). With a cache, the new
        ``seq_len`` tokens come after the ``cache.length`` cached ones and a mask covers both ([B, past + T]): rows
        may then be padded anywhere (generation pads prompts on the left), each row's positions count its own real
        tokens, and no query attends to a padded key."""
        T = seq_len if seq_len is not None else attention_mask.shape[1] if attention_mask is not None else None
        if T is None:
            raise ValueError("context needs the attention mask or the sequence length")
        past = cache.length if cache is not None else 0
        window = self.config.sliding_window
        if window is not None and past + T > window:
            raise ValueError(f"sequences longer than the sliding window ({window} tokens) are not supported")
        device = self.model.embed_tokens.weight.device
        positions = torch.arange(past, past + T, device=device)
        keys = torch.arange(past + T, device=device)
        mask = None
        padded = attention_mask is not None and (always_mask or not bool(attention_mask.all()))
        if padded and attention_mask.shape[1] != past + T:
            raise ValueError(f"the attention mask covers {attention_mask.shape[1]} tokens; {past} cached and {T} new "
                             f"ones need {past + T}")
        if padded:
            valid = attention_mask.bool()[:, None, :]
            # a padded query attends to itself at least, so no row is empty (its output is never used)
            mask = ((keys[None, :] <= positions[:, None])[None] & valid) | (keys[None, :] == positions[:, None])[None]
            mask = mask[:, None]
            if cache is not None:  # each row's own positions: its real tokens counted from 0
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        elif past and T > 1:  # several new tokens after cached ones: each sees the cache and the new ones before it
            mask = keys[None, :] <= positions[:, None]
        return LlamaContext(mask=mask, positions=positions, theta=self.config.rope_theta,
                            scaling=self.config.rope_scaling, causal=past == 0, cache=cache)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 stop_ids: Sequence[int] = (), temperature: float = 0.0, generator: torch.Generator | None = None,
                 pad_token_id: int = 0, use_cache: bool = True,
                 stop_when: Callable[[list[int]], bool] | None = None) -> torch.Tensor:
        """Up to ``max_new_tokens`` tokens after each row of ``input_ids`` [B, T]; returns all ids [B, T + n].

        Rows of different lengths are padded on the left (``attention_mask`` 0 there). ``temperature`` 0: greedy;
        above 0: sampled from softmax(logits / temperature) with ``generator``. A row ends at the first of
        ``stop_ids`` it writes (kept), or after the token with which ``stop_when`` (given the row's new tokens) first
        holds, then holds ``pad_token_id``; generation ends when every row has ended (as transformers' ``generate``
        with those end tokens and a per-row stopping criterion). ``use_cache`` False recomputes the whole sequence at
        every step (a check)."""
        ids, start = input_ids, input_ids.shape[1]
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        stop = torch.tensor(list(stop_ids), dtype=ids.dtype, device=ids.device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        cache, step = KVCache(), ids
        for _ in range(max_new_tokens):
            if not use_cache:
                cache, step = KVCache(), ids
            logits = self._next_logits(step, mask, cache)
            if temperature > 0:
                nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            done |= torch.isin(nxt, stop)
            ids, mask, step = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(nxt[:, None])], 1), \
                nxt[:, None]
            if stop_when is not None:
                for i in (~done).nonzero()[:, 0].tolist():
                    done[i] = stop_when(ids[i, start:].tolist())
            if bool(done.all()):
                break
        return ids

    def _next_logits(self, step: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The next-token logits (float32) of each row after ``step``, the tokens the cache has not seen (``mask``
        covers the cached ones and these); the cache takes them in."""
        ctx = self.context(mask, step.shape[1], cache)
        h = self.run_layers(self.embed(step), ctx)
        cache.length += step.shape[1]
        return self.lm_logits(h[:, -1]).float()


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face conversion. Hugging Face key -> our key, applied in order; a key mapped to None is dropped.
RENAMES: list[tuple[str, str | None]] = [
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"model.layers.\1.self_attn.input_layernorm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.mlp.post_attention_layernorm."),
    (r"\.rotary_emb\.inv_freq$", None),  # a buffer of older checkpoints, recomputed from the config
    (r"^model\.layers\.(\d+)\.self_attn\.linear_attn\.", r"model.layers.\1.self_attn.proj."),  # Nemotron-NAS
]


def rename_key(key: str) -> str | None:
    return apply_renames(key, RENAMES)


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: LlamaConfig | None = None
                       ) -> tuple[dict[str, torch.Tensor], bool]:
    """Rename a HF state dict to ours (a tied LM head's copy dropped). Returns (state dict, has an LM head)."""
    out = {nk: v for k, v in sd.items() if (nk := rename_key(k)) is not None}
    if cfg is not None and cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out, True


def to_hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under the names of HF ``LlamaForCausalLM`` (Qwen2, Mistral: the same names)."""
    back = [(r"^model\.layers\.(\d+)\.self_attn\.input_layernorm\.", r"model.layers.\1.input_layernorm."),
            (r"^model\.layers\.(\d+)\.mlp\.post_attention_layernorm\.", r"model.layers.\1.post_attention_layernorm.")]
    out = {}
    for k, v in model.state_dict().items():
        for pattern, repl in back:
            k = re.sub(pattern, repl, k)
        out[k] = v.detach().cpu()
    return out


def plain_export_problem(cfg: LlamaConfig) -> str | None:
    """Why this model cannot be written as the plain transformers class of its model_type, or None."""
    teacher = cfg.teacher_layer(0)
    odd = [i for i, s in enumerate(cfg.layers)
           if (s.attention, s.num_heads, s.head_dim, s.num_kv_heads, s.intermediate_size)
           != (teacher.attention, teacher.num_heads, teacher.head_dim, teacher.num_kv_heads, teacher.intermediate_size)]
    if odd:
        return (f"layers {odd} differ from the teacher's shape (attention, heads, head_dim, KV heads, FFN); a "
                f"transformers {cfg.model_type} config has one shape for all layers")
    return None


def to_hf_config(cfg: LlamaConfig) -> Any:
    """The transformers config of a model of the teacher's one shape (see ``plain_export_problem``)."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[cfg.model_type]
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=len(cfg.layers), num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, hidden_act=cfg.hidden_act,
              max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
              rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, tie_word_embeddings=cfg.tie_word_embeddings,
              bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    if cfg.model_type == "llama":
        kw.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, head_dim=cfg.head_dim)
    elif cfg.model_type == "mistral":
        kw.update(sliding_window=cfg.sliding_window, head_dim=cfg.head_dim)
    return cls(**kw)


def to_hf_model(cfg: LlamaConfig) -> Any:
    """An (empty) transformers model of the plain class a model of the teacher's shape is exported as."""
    import transformers

    return getattr(transformers, hf_class_name(cfg))(to_hf_config(cfg))


def plain_config_fields(cfg: LlamaConfig) -> None:
    """None: a remote-code decoder always has a remote config. The plain class would only warn about the weights it
    lacks (a layer without attention, a dropped layer) and run with random ones, so nothing may load the folder
    without its code."""
    return None


def hf_class_name(cfg: LlamaConfig) -> str:
    return {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[cfg.model_type]
