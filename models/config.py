"""Configuration of our BERT: the global shape plus a per-layer plan.

The per-layer plan is what makes a compressed model re-loadable from its checkpoint alone: each entry says how many
heads, which per-head dimension and which feed-forward size that layer has, and which teacher layers it stands in for.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class LayerSpec:
    """What one encoder layer (a student unit) is, and where it came from: the one description of a unit's shape.

    The model builder chooses the attention class from ``attention``; checkpoints store this spec (``to_dict``) and
    the loaders, resume checks, discovery and exporters read it back (``from_dict``).
    """

    num_heads: int
    head_dim: int
    intermediate_size: int
    origin: list[int]  # teacher layer indices this layer replaces: [i] for a kept/retrained layer, [i, i+1] merged
    kind: str = "teacher"  # where it came from: teacher | block (retrained attention) | merged | pruned | ...
    attention: str = "mha"  # which attention module: mha (multi-head) | gqa (grouped-query)
    num_kv_heads: int | None = None  # gqa: key/value heads, each shared by num_heads / num_kv_heads query heads

    # the fields that shape the attention module (``models.bert.BertAttention`` takes them as keywords)
    ATTENTION_FIELDS = ("num_heads", "head_dim", "attention", "num_kv_heads")

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.head_dim <= 0 or self.intermediate_size <= 0:
            raise ValueError(
                f"layer sizes must be positive, got heads={self.num_heads} head_dim={self.head_dim} "
                f"intermediate_size={self.intermediate_size}"
            )
        if self.attention == "gqa" and not (isinstance(self.num_kv_heads, int) and self.num_kv_heads > 0
                                            and self.num_heads % self.num_kv_heads == 0):
            raise ValueError(f"grouped-query attention needs num_kv_heads that divide the {self.num_heads} heads, "
                             f"got num_kv_heads={self.num_kv_heads}")
        if self.attention != "gqa" and self.num_kv_heads is not None:
            raise ValueError(f"num_kv_heads is for attention 'gqa', this layer's is '{self.attention}'")

    def attention_shape(self) -> dict[str, Any]:
        """Keyword arguments of ``BertAttention`` for this layer (fields that do not apply, None, left out)."""
        return {k: v for k in self.ATTENTION_FIELDS if (v := getattr(self, k)) is not None}

    def shape_tag(self) -> str:
        """The attention shape in run-folder names: h<heads>_d<head_dim>, plus further attention fields."""
        return f"h{self.num_heads}_d{self.head_dim}" + (f"_kv{self.num_kv_heads}" if self.num_kv_heads else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerSpec":
        """A spec from ``to_dict`` output; fields added later take their defaults (older checkpoints load)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown layer spec field(s) {unknown}; known: {sorted(known)}")
        return cls(**{**d, "origin": list(d.get("origin", []))})

    def attention_note(self) -> str:
        """The attention fields beyond heads x head_dim, for plans and logs ('' for plain multi-head)."""
        extra = [f"{k}={v}" for k, v in self.attention_shape().items() if k not in ("num_heads", "head_dim")]
        return "" if self.attention == "mha" else " " + " ".join(extra)


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_hidden_layers: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    has_mlm_head: bool = True
    layers: list[LayerSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if not self.layers:
            hd = self.hidden_size // self.num_attention_heads
            self.layers = [
                LayerSpec(self.num_attention_heads, hd, self.intermediate_size, [i])
                for i in range(self.num_hidden_layers)
            ]
        self.layers = [spec if isinstance(spec, LayerSpec) else LayerSpec.from_dict(spec) for spec in self.layers]
        self.num_hidden_layers = len(self.layers)

    @property
    def head_dim(self) -> int:
        """The teacher's per-head dimension (hidden / heads)."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config: Any, has_mlm_head: bool = True) -> "ModelConfig":
        """Read the fields we need from a transformers ``BertConfig``."""
        if getattr(hf_config, "model_type", "bert") != "bert":
            raise ValueError(f"expected a BERT checkpoint (model_type 'bert'), found model_type '{hf_config.model_type}'")
        pos_type = getattr(hf_config, "position_embedding_type", "absolute")
        if pos_type not in (None, "absolute"):
            raise ValueError(f"only absolute position embeddings are supported, found '{pos_type}'")
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            max_position_embeddings=hf_config.max_position_embeddings,
            type_vocab_size=hf_config.type_vocab_size,
            layer_norm_eps=hf_config.layer_norm_eps,
            hidden_act=hf_config.hidden_act,
            pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
            hidden_dropout_prob=hf_config.hidden_dropout_prob,
            attention_probs_dropout_prob=hf_config.attention_probs_dropout_prob,
            has_mlm_head=has_mlm_head,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**d)

    def describe(self) -> str:
        """One line per layer: a readable per-layer plan."""
        lines = []
        for i, s in enumerate(self.layers):
            src = "+".join(str(o) for o in s.origin)
            lines.append(
                f"layer {i:2d}  from teacher {src:>5}  {s.kind:8s} heads={s.num_heads:2d} head_dim={s.head_dim:3d} "
                f"ffn={s.intermediate_size}{s.attention_note()}"
            )
        return "\n".join(lines)
