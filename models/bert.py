"""The BERT family: a from-scratch BERT encoder + masked-LM head whose attention blocks and layers can be swapped,
and its Hugging Face conversion.

Module names mirror Hugging Face ``BertForMaskedLM`` so that a checkpoint maps onto this model with a short rename
table (``RENAMES``). Every layer takes its shape from ``config.layers``, so layers of different sizes live side by
side and a compressed model is rebuilt from its config alone. Attention kinds: ``mha`` and ``gqa``
(``models.kinds``); the q/k/v module of each is registered in ``SELF_ATTENTION``.

torch only (transformers inside the conversion functions): this file is copied next to exported models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .kinds import implements
from .base import (ACTIVATIONS, AttentionTrace, ModelOutputs, NoLMHeadError, SwappableAttention, SwappableLayer,
                   SwappableModel, activation, apply_renames, attend, init_weights, repeat_kv)
from .config import LayerSpec, ModelConfig

_ACTIVATIONS = ACTIVATIONS  # (older name)
REQUIRED_TOKENS = ("cls_token", "sep_token", "pad_token", "mask_token")  # what the tokenizer of a teacher must have
NoMLMHeadError = NoLMHeadError  # the name this error had before there were several families
BertOutputs = ModelOutputs


def extended_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T] 0/1 mask -> boolean [B, 1, 1, T] (True = attend), or None when nothing is masked."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


@dataclass
class BertConfig(ModelConfig):
    """A BERT encoder: absolute positions, token types, post-LayerNorm layers, GELU feed-forward."""

    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    has_mlm_head: bool = True

    family: ClassVar[str] = "bert"

    @classmethod
    def from_hf(cls, hf_config: Any, has_mlm_head: bool = True) -> "BertConfig":
        """Read the fields we need from a transformers ``BertConfig``."""
        pos_type = getattr(hf_config, "position_embedding_type", "absolute")
        if pos_type not in (None, "absolute"):
            raise ValueError(f"only absolute position embeddings are supported, found '{pos_type}'")
        return cls(
            vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads, intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers, max_position_embeddings=hf_config.max_position_embeddings,
            type_vocab_size=hf_config.type_vocab_size, layer_norm_eps=hf_config.layer_norm_eps,
            hidden_act=hf_config.hidden_act,
            pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
            hidden_dropout_prob=hf_config.hidden_dropout_prob,
            attention_probs_dropout_prob=hf_config.attention_probs_dropout_prob, has_mlm_head=has_mlm_head,
        )


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
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


SELF_ATTENTION: dict[str, type[nn.Module]] = {}  # attention kind -> q/k/v module of a BERT attention block


@implements(SELF_ATTENTION, "mha")
class BertSelfAttention(nn.Module):
    """q, k, v projections: hidden -> heads * head_dim, with head_dim independent of the hidden size."""

    kind = "mha"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.query = nn.Linear(hidden_size, inner)
        self.key = nn.Linear(hidden_size, inner)
        self.value = nn.Linear(hidden_size, inner)
        self.dropout_p = dropout

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    def shape(self) -> dict:
        """The attention fields of this module's LayerSpec (``LayerSpec.ATTENTION_FIELDS``)."""
        return {"num_heads": self.num_heads, "head_dim": self.head_dim, "attention": self.kind}

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, need_trace: bool = False
                ) -> tuple[torch.Tensor, AttentionTrace | None]:
        group = self.num_heads // self.num_kv_heads
        q = self._split(self.query(x), self.num_heads)
        k = repeat_kv(self._split(self.key(x), self.num_kv_heads), group)
        v = repeat_kv(self._split(self.value(x), self.num_kv_heads), group)
        ctx, trace = attend(q, k, v, mask=mask, dropout=self.dropout_p, training=self.training, need_trace=need_trace)
        B, H, T, D = ctx.shape
        return ctx.transpose(1, 2).reshape(B, T, H * D), trace


@implements(SELF_ATTENTION, "gqa")
class GroupedQuerySelfAttention(BertSelfAttention):
    """Grouped-query attention: ``num_kv_heads`` key/value heads, each shared by ``num_heads / num_kv_heads``
    consecutive query heads (query head h reads key/value head h // group)."""

    kind = "gqa"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, dropout: float = 0.0,
                 num_kv_heads: int | None = None):
        super().__init__(hidden_size, num_heads, head_dim, dropout=dropout)
        if not num_kv_heads or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads {num_heads}, got {num_kv_heads}")
        self._kv = num_kv_heads
        self.key = nn.Linear(hidden_size, num_kv_heads * head_dim)
        self.value = nn.Linear(hidden_size, num_kv_heads * head_dim)

    @property
    def num_kv_heads(self) -> int:
        return self._kv

    def shape(self) -> dict:
        return {**super().shape(), "num_kv_heads": self.num_kv_heads}


class BertSelfOutput(nn.Module):
    def __init__(self, inner: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(inner, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)


class BertAttention(SwappableAttention):
    """The swappable unit of block retraining: q/k/v + output projection, then residual + LayerNorm.

    ``contribution`` is what a retrained block has to reproduce: the output projection of the attention, before the
    residual and the LayerNorm. ``attention`` (and its own fields, see ``LayerSpec.ATTENTION_FIELDS``) picks the
    q/k/v module from ``SELF_ATTENTION``. A retrained block keeps the teacher's LayerNorm (``FROZEN``).
    """

    FROZEN = ("output.LayerNorm",)

    def __init__(self, cfg: BertConfig, num_heads: int, head_dim: int, *, attention: str = "mha", **fields):
        super().__init__()
        if attention not in SELF_ATTENTION:
            raise ValueError(f"attention kind '{attention}' is not available for BERT; available: "
                             f"{', '.join(SELF_ATTENTION)}")
        self.self = SELF_ATTENTION[attention](cfg.hidden_size, num_heads, head_dim,
                                              dropout=cfg.attention_probs_dropout_prob, **fields)
        self.output = BertSelfOutput(num_heads * head_dim, cfg)

    @classmethod
    def from_spec(cls, cfg: BertConfig, spec: LayerSpec) -> "BertAttention":
        return cls(cfg, **spec.attention_shape())

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.self.kind

    def shape(self) -> dict:
        return self.self.shape()

    @property
    def num_heads(self) -> int:
        return self.self.num_heads

    @property
    def head_dim(self) -> int:
        return self.self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.self.num_kv_heads

    # the projections, by the names every family's initialisers use
    q_proj = property(lambda self: self.self.query)
    k_proj = property(lambda self: self.self.key)
    v_proj = property(lambda self: self.self.value)
    o_proj = property(lambda self: self.output.dense)

    def projection_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the q/k/v projections read: the hidden state itself (post-norm layers)."""
        return x

    def heads(self, x: torch.Tensor, mask: Any = None, need_trace: bool = False
              ) -> tuple[torch.Tensor, AttentionTrace | None]:
        """Each head's mixed values, concatenated [B, T, heads * head_dim], before the output projection."""
        return self.self(x, mask, need_trace)

    def contribution(self, x: torch.Tensor, mask: Any = None, need_trace: bool = False
                     ) -> tuple[torch.Tensor, AttentionTrace | None]:
        """What the attention adds to the residual stream: heads mixed and projected, before the residual and the
        LayerNorm (the target of block retraining; the teacher cache stores it as feature ``block_{i}``)."""
        ctx, trace = self.heads(x, mask, need_trace)
        return self.output.dense(ctx), trace

    def finish(self, x: torch.Tensor, contribution: torch.Tensor) -> torch.Tensor:
        """Residual + LayerNorm around the attention's contribution."""
        return self.output.LayerNorm(x + self.output.dropout(contribution))


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig, size: int):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig, size: int):
        super().__init__()
        self.dense = nn.Linear(size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class BertLayer(SwappableLayer):
    def __init__(self, cfg: BertConfig, spec: LayerSpec):
        super().__init__()
        if spec.intermediate_size <= 0:
            raise ValueError(f"a BERT layer needs a feed-forward part, got intermediate_size {spec.intermediate_size}")
        self.attention = BertAttention.from_spec(cfg, spec)
        self.intermediate = BertIntermediate(cfg, spec.intermediate_size)
        self.output = BertOutput(cfg, spec.intermediate_size)

    # the feed-forward projections, by the names every family's initialisers use
    up_proj = property(lambda self: self.intermediate.dense)
    down_proj = property(lambda self: self.output.dense)
    gate_proj = None

    def ffn_norm(self) -> nn.Module:
        """The norm that belongs to the feed-forward part (BERT: the LayerNorm after it)."""
        return self.output.LayerNorm

    def feed_forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(a), a)

    def neurons(self, a: torch.Tensor) -> torch.Tensor:
        return self.intermediate(a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, spec) for spec in cfg.layers)


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(h)))


class BertLMPredictionHead(nn.Module):
    """Transform + decoder tied to the word embeddings (passed in at call time, so there is one copy) + bias."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(h), word_embeddings, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)


class BertForMaskedLM(SwappableModel):
    """Embeddings, encoder layers and (when the checkpoint has one) the masked-LM head."""

    LAYERS = ("bert", "encoder", "layer")
    TASK = "mlm"
    NO_HEAD = ("a masked-LM head", "a plain BertModel, e.g. a sentence-transformers encoder",
               "a BertForMaskedLM checkpoint")

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.cls = BertOnlyMLMHead(cfg) if cfg.has_mlm_head else None
        self.apply(init_weights)

    @staticmethod
    def make_block(cfg: BertConfig, spec: LayerSpec) -> BertAttention:
        return BertAttention.from_spec(cfg, spec)

    @staticmethod
    def make_layer(cfg: BertConfig, spec: LayerSpec) -> BertLayer:
        return BertLayer(cfg, spec)

    @property
    def has_lm_head(self) -> bool:
        return self.cls is not None

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert.embeddings(input_ids, token_type_ids)

    def context(self, attention_mask: torch.Tensor | None, seq_len: int | None = None, *,
                always_mask: bool = False) -> torch.Tensor | None:
        if always_mask:  # no data-dependent branch (a traced graph)
            return attention_mask.bool()[:, None, None, :]
        return extended_mask(attention_mask)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        self.require_lm_head("masked-token prediction")
        return self.cls.predictions(h, self.bert.embeddings.word_embeddings.weight)



# ---------------------------------------------------------------------------------------------------------------
# Hugging Face conversion. Hugging Face key -> our key, applied in order; a key mapped to None is dropped.
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
    key = apply_renames(key, RENAMES)
    if key is None:
        return None
    if not key.startswith("cls."):
        key = "bert." + key
    return key


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: BertConfig | None = None
                       ) -> tuple[dict[str, torch.Tensor], bool]:
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


def to_hf_state_dict(model: BertForMaskedLM) -> dict[str, torch.Tensor]:
    """Our weights under the names of HF ``BertForMaskedLM`` (or ``BertModel`` without a head)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.has_lm_head:
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
        return sd
    return {k.removeprefix("bert."): v for k, v in sd.items()}


def plain_export_problem(cfg: BertConfig) -> str | None:
    """Why this model cannot be written as a plain HF BERT (BertForMaskedLM, or BertModel without a head), or None."""
    other = sorted({s.attention for s in cfg.layers} - {"mha"})
    if other:
        return f"layers with attention of kind {other}; HF BERT has plain multi-head attention only"
    shapes = {(s.num_heads, s.head_dim, s.intermediate_size) for s in cfg.layers}
    if len(shapes) > 1:
        return f"layers differ in shape (heads, head_dim, ffn): {sorted(shapes)}; HF BertConfig has one shape for all"
    heads, hd, _ = shapes.pop()
    if heads * hd != cfg.hidden_size:
        return (f"heads x head_dim = {heads}x{hd} = {heads * hd} != hidden size {cfg.hidden_size}; "
                "HF BERT needs equality")
    return None


def to_hf_config(cfg: BertConfig) -> Any:
    """The transformers ``BertConfig`` of a model of one plain BERT shape (see ``plain_export_problem``)."""
    from transformers import BertConfig as HFBertConfig

    spec = cfg.layers[0]
    return HFBertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=len(cfg.layers),
        num_attention_heads=spec.num_heads, intermediate_size=spec.intermediate_size, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        hidden_dropout_prob=cfg.hidden_dropout_prob, attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
    )


def to_hf_model(cfg: BertConfig) -> Any:
    """An (empty) transformers model of the plain class a model of one plain shape is exported as."""
    from transformers import BertForMaskedLM as HFBertForMaskedLM
    from transformers import BertModel as HFBertModel

    hf_cfg = to_hf_config(cfg)
    return HFBertForMaskedLM(hf_cfg) if cfg.has_mlm_head else HFBertModel(hf_cfg, add_pooling_layer=False)


def plain_config_fields(cfg: BertConfig) -> dict[str, Any] | None:
    """The config.json fields of a remote-code export that plain transformers BERT can read (``model_type`` bert),
    or None where plain BERT classes built from them would take the weights silently: every layer plain multi-head
    attention with heads x head_dim == hidden and the config's feed-forward size, only its heads split differently
    (4 x 8 instead of 8 x 4, say). Anything else, they refuse: its weights have other shapes."""
    if all(s.attention == "mha" and s.num_heads * s.head_dim == cfg.hidden_size
           and s.intermediate_size == cfg.intermediate_size for s in cfg.layers):
        return None
    return {
        "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": len(cfg.layers), "hidden_act": cfg.hidden_act,
        "hidden_dropout_prob": cfg.hidden_dropout_prob,
        "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id, "initializer_range": 0.02,
        "tie_word_embeddings": False,
    }


def hf_class_name(cfg: BertConfig) -> str:
    """The transformers class a plain export is written as."""
    return "BertForMaskedLM" if cfg.has_mlm_head else "BertModel"
