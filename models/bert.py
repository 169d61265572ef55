"""A from-scratch BERT encoder + masked-LM head whose attention blocks and layers can be swapped.

Module names mirror Hugging Face ``BertForMaskedLM`` so that a checkpoint maps onto this model with a plain rename
table (see ``models/hf.py``). Every layer takes its shape from ``config.layers``, so layers of different sizes live
side by side and a compressed model is rebuilt from its config alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerSpec, ModelConfig

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act '{name}'; supported: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


def extended_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T] 0/1 mask -> boolean [B, 1, 1, T] (True = attend), or None when nothing is masked."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        h = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        if token_type_ids is None:
            h = h + self.token_type_embeddings.weight[0]
        else:
            h = h + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(h))


@dataclass
class AttentionTrace:
    """What the slow path returns besides the output: softmax probabilities and pre-softmax scores [B, H, T, T]."""

    probs: torch.Tensor
    scores: torch.Tensor


class BertSelfAttention(nn.Module):
    """q, k, v projections: hidden -> heads * head_dim, with head_dim independent of the hidden size."""

    kind = "mha"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.query = nn.Linear(hidden_size, inner)
        self.key = nn.Linear(hidden_size, inner)
        self.value = nn.Linear(hidden_size, inner)
        self.dropout_p = dropout

    def shape(self) -> dict:
        """The attention fields of this module's LayerSpec (``LayerSpec.ATTENTION_FIELDS``)."""
        return {"num_heads": self.num_heads, "head_dim": self.head_dim, "attention": self.kind}

    def _split(self, x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, heads or self.num_heads, self.head_dim).transpose(1, 2)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, heads, T, head_dim]."""
        return self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, need_trace: bool = False
    ) -> tuple[torch.Tensor, AttentionTrace | None]:
        q, k, v = self._qkv(x)
        p = self.dropout_p if self.training else 0.0
        if not need_trace:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            trace = None
        else:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            ctx = F.dropout(probs, p=p, training=self.training) @ v
            trace = AttentionTrace(probs=probs, scores=scores)
        B, H, T, D = ctx.shape
        return ctx.transpose(1, 2).reshape(B, T, H * D), trace


class BertSelfOutput(nn.Module):
    def __init__(self, inner: int, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(inner, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)


class GroupedQuerySelfAttention(BertSelfAttention):
    """Grouped-query attention: ``num_kv_heads`` key/value heads, each shared by ``num_heads / num_kv_heads``
    consecutive query heads (query head h reads key/value head h // group)."""

    kind = "gqa"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, dropout: float = 0.0,
                 num_kv_heads: int | None = None):
        super().__init__(hidden_size, num_heads, head_dim, dropout)
        if not num_kv_heads or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads {num_heads}, got {num_kv_heads}")
        self.num_kv_heads = num_kv_heads
        self.key = nn.Linear(hidden_size, num_kv_heads * head_dim)
        self.value = nn.Linear(hidden_size, num_kv_heads * head_dim)

    def shape(self) -> dict:
        return {**super().shape(), "num_kv_heads": self.num_kv_heads}

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        G, group = self.num_kv_heads, self.num_heads // self.num_kv_heads

        def shared(t: torch.Tensor) -> torch.Tensor:  # [B, G, T, d] -> [B, G * group, T, d], each kv head repeated
            return t[:, :, None].expand(B, G, group, T, self.head_dim).reshape(B, G * group, T, self.head_dim)

        return (self._split(self.query(x)), shared(self._split(self.key(x), G)),
                shared(self._split(self.value(x), G)))


# attention module per ``LayerSpec.attention``: the builder chooses the class from the spec
SELF_ATTENTION: dict[str, type[BertSelfAttention]] = {"mha": BertSelfAttention, "gqa": GroupedQuerySelfAttention}


class BertAttention(nn.Module):
    """The swappable unit of block retraining: q/k/v + output projection, then residual + LayerNorm.

    ``contribution`` is what a retrained block has to reproduce: the output projection of the attention, before the
    residual and the LayerNorm. ``attention`` (and its own fields, see ``LayerSpec.ATTENTION_FIELDS``) picks the
    q/k/v module from ``SELF_ATTENTION``.
    """

    def __init__(self, cfg: ModelConfig, num_heads: int, head_dim: int, attention: str = "mha", **fields):
        super().__init__()
        if attention not in SELF_ATTENTION:
            raise ValueError(f"unknown attention kind '{attention}'; known: {', '.join(SELF_ATTENTION)}")
        self.self = SELF_ATTENTION[attention](cfg.hidden_size, num_heads, head_dim,
                                              cfg.attention_probs_dropout_prob, **fields)
        self.output = BertSelfOutput(num_heads * head_dim, cfg)

    @classmethod
    def from_spec(cls, cfg: ModelConfig, spec: LayerSpec) -> "BertAttention":
        return cls(cfg, **spec.attention_shape())

    def shape(self) -> dict:
        """The attention fields of the LayerSpec this block fits."""
        return self.self.shape()

    @property
    def num_heads(self) -> int:
        return self.self.num_heads

    @property
    def head_dim(self) -> int:
        return self.self.head_dim

    def contribution(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, need_trace: bool = False
    ) -> tuple[torch.Tensor, AttentionTrace | None]:
        """What the attention adds to the residual stream: heads mixed and projected, before the residual and the
        LayerNorm (the target of block retraining; the teacher cache stores it as feature ``block_{i}``)."""
        ctx, trace = self.self(x, mask, need_trace)
        return self.output.dense(ctx), trace

    def finish(self, x: torch.Tensor, contribution: torch.Tensor) -> torch.Tensor:
        """Residual + LayerNorm around the attention's contribution."""
        return self.output.LayerNorm(x + self.output.dropout(contribution))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.finish(x, self.contribution(x, mask)[0])


class BertIntermediate(nn.Module):
    def __init__(self, cfg: ModelConfig, size: int):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, cfg: ModelConfig, size: int):
        super().__init__()
        self.dense = nn.Linear(size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class BertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.attention = BertAttention.from_spec(cfg, spec)
        self.intermediate = BertIntermediate(cfg, spec.intermediate_size)
        self.output = BertOutput(cfg, spec.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, spec) for spec in cfg.layers)


class BertModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(h)))


class BertLMPredictionHead(nn.Module):
    """Transform + decoder tied to the word embeddings (passed in at call time, so there is one copy) + bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(h), word_embeddings, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)


@dataclass
class BertOutputs:
    last_hidden_state: torch.Tensor
    logits: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None  # embeddings output, then each layer's output


class NoMLMHeadError(RuntimeError):
    """Raised when an MLM-only feature is asked of a model whose checkpoint had no masked-LM head."""


class BertForMaskedLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.cls = BertOnlyMLMHead(cfg) if cfg.has_mlm_head else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- pieces the training scripts call separately ----
    @property
    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    @property
    def has_mlm_head(self) -> bool:
        return self.cls is not None

    def require_mlm_head(self, what: str) -> None:
        if self.cls is None:
            raise NoMLMHeadError(
                f"{what} needs a masked-LM head, but this checkpoint has none (a plain BertModel, e.g. a "
                "sentence-transformers encoder); use a BertForMaskedLM checkpoint or a hidden-state objective"
            )

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert.embeddings(input_ids, token_type_ids)

    def run_layers(
        self, h: torch.Tensor, mask: torch.Tensor | None, start: int = 0, end: int | None = None,
        collect: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run layers [start, end) on hidden state ``h`` (the input of layer ``start``); ``mask`` is extended."""
        for layer in self.layers[start:end]:
            h = layer(h, mask)
            if collect is not None:
                collect.append(h)
        return h

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        self.require_mlm_head("masked-token prediction")
        return self.cls.predictions(h, self.bert.embeddings.word_embeddings.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        with_logits: bool = True,
    ) -> BertOutputs:
        mask = extended_mask(attention_mask)
        h = self.embed(input_ids, token_type_ids)
        hidden = [h] if output_hidden_states else None
        h = self.run_layers(h, mask, collect=hidden)
        logits = self.mlm_logits(h) if (with_logits and self.cls is not None) else None
        return BertOutputs(last_hidden_state=h, logits=logits, hidden_states=hidden)

    def hidden_before(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden state entering ``layer`` (embeddings output for layer 0)."""
        return self.run_layers(self.embed(input_ids, token_type_ids), extended_mask(attention_mask), 0, layer)

    # ---- swapping ----
    def replace_attention(self, index: int, attention: BertAttention, kind: str = "block") -> None:
        """Put ``attention`` (any shape) in place of layer ``index``'s attention block; the layer's spec follows."""
        self._check_index(index)
        self.layers[index].attention = attention
        spec = self.config.layers[index]
        shape = attention.shape()
        for key in LayerSpec.ATTENTION_FIELDS:  # fields the new block does not have are reset
            setattr(spec, key, shape.get(key))
        spec.kind = kind

    def merge_layers(self, index: int, layer: BertLayer, spec: LayerSpec) -> None:
        """Replace layers ``index`` and ``index + 1`` by the single ``layer`` described by ``spec``."""
        self._check_index(index)
        if index + 1 >= len(self.layers):
            raise IndexError(f"cannot merge layer {index} with {index + 1}: the model has {len(self.layers)} layers")
        mods = list(self.layers)
        self.bert.encoder.layer = nn.ModuleList(mods[:index] + [layer] + mods[index + 2:])
        specs = self.config.layers
        self.config.layers = specs[:index] + [spec] + specs[index + 2:]
        self.config.num_hidden_layers = len(self.config.layers)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.layers):
            raise IndexError(f"layer index {index} out of range: the model has layers 0..{len(self.layers) - 1}")

    def layer_index_of(self, teacher_layers: list[int]) -> int:
        """Current index of the layer whose origin is exactly ``teacher_layers``."""
        for i, spec in enumerate(self.config.layers):
            if spec.origin == list(teacher_layers):
                return i
        raise KeyError(f"no layer of this model stands for teacher layers {teacher_layers}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
