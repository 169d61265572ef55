"""Configuration shared by every model family: the per-layer plan (``LayerSpec``) and the base ``ModelConfig``.

The per-layer plan is what makes a compressed model re-loadable from its checkpoint alone: each entry says which kind
of attention the layer has (``models.kinds``), with how many heads of which size, which feed-forward size, and which
teacher layers it stands in for. A family's config (``models.bert.BertConfig``, ``models.llama.LlamaConfig``)
subclasses ``ModelConfig`` with its own fields; ``ModelConfig.from_dict`` rebuilds the right one from its ``family``.

Standard library only (and ``models.kinds``): this file is copied next to exported models (remote code) as it is.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from .kinds import get_kind


@dataclass
class LayerSpec:
    """What one layer (a student unit) is, and where it came from: the one description of a unit's shape.

    The model builder chooses the attention module from ``attention`` (a kind of ``models.kinds``); checkpoints store
    this spec (``to_dict``) and the loaders, resume checks, discovery and exporters read it back (``from_dict``).
    ``intermediate_size`` 0 is a layer without a feed-forward part; kinds without heads (``none``, ``linear``) have
    ``num_heads`` and ``head_dim`` 0.
    """

    num_heads: int
    head_dim: int
    intermediate_size: int
    origin: list[int]  # teacher layer indices this layer replaces: [i] for a kept/retrained layer, [i, i+1] merged
    kind: str = "teacher"  # where it came from: teacher | block (retrained attention) | merged | pruned | ...
    attention: str = "mha"  # which attention: a kind of models.kinds
    num_kv_heads: int | None = None  # gqa: key/value heads, each shared by num_heads / num_kv_heads query heads

    # the fields that shape the attention module
    ATTENTION_FIELDS: ClassVar[tuple[str, ...]] = ("num_heads", "head_dim", "attention", "num_kv_heads")

    def __post_init__(self) -> None:
        kind = get_kind(self.attention)
        sizes = (self.num_heads, self.head_dim)
        if kind.has_heads and (min(sizes) <= 0):
            raise ValueError(f"layer sizes must be positive, got heads={self.num_heads} head_dim={self.head_dim}")
        if not kind.has_heads and sizes != (0, 0):
            raise ValueError(f"attention '{self.attention}' has no heads: num_heads and head_dim must be 0, got "
                             f"heads={self.num_heads} head_dim={self.head_dim}")
        if self.intermediate_size < 0:
            raise ValueError(f"intermediate_size must be >= 0 (0: no feed-forward), got {self.intermediate_size}")
        extra = [f for f in self.ATTENTION_FIELDS[3:] if getattr(self, f) is not None and f not in kind.fields]
        if extra:
            raise ValueError(f"{', '.join(extra)} is not a field of attention '{self.attention}' "
                             f"(its fields: {', '.join(kind.fields) or 'none beyond heads and head_dim'})")
        problem = kind.check(self)
        if problem:
            raise ValueError(problem)

    @property
    def kv_heads(self) -> int:
        """Key/value heads this layer caches per token (0 for a layer without attention)."""
        return get_kind(self.attention).kv_heads(self)

    def attention_shape(self) -> dict[str, Any]:
        """The attention fields of this layer (fields that do not apply, None, left out)."""
        return {k: v for k in self.ATTENTION_FIELDS if (v := getattr(self, k)) is not None}

    def shape_tag(self) -> str:
        """The attention shape in run-folder names: h<heads>_d<head_dim> and the kind's part (``_kv2``; ``attn_none``
        for a kind without heads)."""
        kind = get_kind(self.attention)
        if not kind.has_heads:
            return f"attn_{self.attention}"
        return f"h{self.num_heads}_d{self.head_dim}{kind.folder_tag(self)}"

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
        if self.attention == "mha":
            return ""
        extra = [f"{k}={v}" for k, v in self.attention_shape().items() if k not in ("num_heads", "head_dim")]
        return " " + " ".join(extra)

    def describe(self) -> str:
        """The layer's shape in one phrase, for plans and logs."""
        if not get_kind(self.attention).has_heads:
            return f"attention {self.attention} ffn={self.intermediate_size}"
        return (f"heads={self.num_heads:2d} head_dim={self.head_dim:3d} ffn={self.intermediate_size}"
                f"{self.attention_note()}")


@dataclass
class ModelConfig:
    """Fields every family has; a family's subclass adds its own and names itself in ``family``.

    ``layers`` is the per-layer plan; when empty it is filled with the teacher's plain layers.
    """

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_hidden_layers: int
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    layers: list[LayerSpec] = field(default_factory=list)

    family: ClassVar[str] = ""
    FAMILIES: ClassVar[dict[str, type["ModelConfig"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.family:
            ModelConfig.FAMILIES[cls.family] = cls

    def __post_init__(self) -> None:
        heads = self.num_attention_heads
        if heads <= 0 or self.hidden_size % heads and not self.explicit_head_dim():
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if not self.layers:
            self.layers = [self.teacher_layer(i) for i in range(self.num_hidden_layers)]
        self.layers = [spec if isinstance(spec, LayerSpec) else LayerSpec.from_dict(spec) for spec in self.layers]
        self.num_hidden_layers = len(self.layers)

    def explicit_head_dim(self) -> bool:
        """Whether the family gives the head size itself (then hidden_size need not be heads x head_dim)."""
        return False

    @property
    def head_dim(self) -> int:
        """The teacher's per-head dimension (hidden / heads unless the family says otherwise)."""
        return self.hidden_size // self.num_attention_heads

    def teacher_layer(self, i: int) -> LayerSpec:
        """The spec of the teacher's own layer ``i`` (every layer of a family's checkpoint has this shape)."""
        return LayerSpec(self.num_attention_heads, self.head_dim, self.intermediate_size, [i])

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """The config ``to_dict`` wrote, of the family it names (configs saved before families existed are BERT's)."""
        name = d.get("family", "bert")
        if name not in ModelConfig.FAMILIES:
            raise ValueError(f"unknown model family '{name}'; known: {', '.join(sorted(ModelConfig.FAMILIES))}")
        return ModelConfig.FAMILIES[name](**{k: v for k, v in d.items() if k != "family"})

    def describe(self) -> str:
        """One line per layer: a readable per-layer plan."""
        lines = []
        for i, s in enumerate(self.layers):
            src = "+".join(str(o) for o in s.origin)
            lines.append(f"layer {i:2d}  from teacher {src:>5}  {s.kind:8s} {s.describe()}")
        return "\n".join(lines)

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of keys and values a decoder caches per token over all its layers (fp16/bf16 by default)."""
        return sum(2 * s.kv_heads * s.head_dim * bytes_per_value for s in self.layers)
