"""What every model family shares: a stack of layers whose attention blocks and layers can be swapped.

A family's model (``models.bert.BertForMaskedLM``, ``models.llama.LlamaForCausalLM``) subclasses ``SwappableModel``
and supplies its embeddings, what its layers receive besides the hidden state (``context``: a padding mask for BERT,
a causal mask and rotary angles for Llama), its language-model head (``lm_logits``) and where its layer list lives
(``LAYERS``). Its layers subclass ``SwappableLayer``: an attention block (``ATTENTION`` names the attribute) whose
``contribution`` is what it adds to the residual stream and whose ``finish`` adds it, then a feed-forward part.
Everything else (running a range of layers, replacing a block, merging two layers, light views that share the
teacher's modules) is written once here.

torch only: this file is copied next to exported models (remote code) as it is.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerSpec, ModelConfig


@dataclass
class ModelOutputs:
    """``last_hidden_state``: the last layer's output (before a family's final norm, which ``lm_logits`` applies)."""

    last_hidden_state: torch.Tensor
    logits: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None  # embeddings output, then each layer's output


@dataclass
class AttentionTrace:
    """What the slow path returns besides the output: softmax probabilities and pre-softmax scores [B, H, T, T]."""

    probs: torch.Tensor
    scores: torch.Tensor


class NoLMHeadError(RuntimeError):
    """Raised when a language-model feature is asked of a model whose checkpoint had no LM head."""


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act '{name}'; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, dropout: float,
           training: bool, need_trace: bool, causal: bool = False) -> tuple[torch.Tensor, "AttentionTrace | None"]:
    """Scaled dot-product attention of [B, H, T, d] q and [B, H, S, d] k, v: the fused kernel, or with ``need_trace``
    the explicit softmax whose probabilities and scores are returned too. ``mask``: boolean, True = attend;
    ``causal`` (with no mask): query i attends to the keys up to its own position, the last query to all."""
    p = dropout if training else 0.0
    if not need_trace:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                              is_causal=causal and mask is None), None
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal and mask is None:
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    return F.dropout(probs, p=p, training=training) @ v, AttentionTrace(probs=probs, scores=scores)


def repeat_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    """[B, G, T, d] key/value heads -> [B, G * group, T, d]: each head serves ``group`` consecutive query heads."""
    if group == 1:
        return t
    B, G, T, d = t.shape
    return t[:, :, None].expand(B, G, group, T, d).reshape(B, G * group, T, d)


def init_weights(m: nn.Module, std: float = 0.02) -> None:
    """The usual transformer initialisation: normal(0, std) matrices and embeddings, zero biases, unit norms."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=std)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    if hasattr(m, "reset_norm"):
        m.reset_norm()


class SwappableAttention(nn.Module):
    """An attention block: what the student units of block retraining are.

    Subclasses give ``heads`` (the mixed values before the output projection, [B, T, num_heads * head_dim], and on
    request the attention trace), the projections ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (for initialisers
    and relation losses; kinds without heads have only what they have), ``contribution`` and ``finish``.
    ``FROZEN`` names parameters a retrained block keeps from the teacher (its norm).
    """

    FROZEN: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = ""

    def contribution(self, x: torch.Tensor, ctx: Any = None, need_trace: bool = False
                     ) -> tuple[torch.Tensor, AttentionTrace | None]:
        raise NotImplementedError

    def finish(self, x: torch.Tensor, contribution: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self.finish(x, self.contribution(x, ctx)[0])

    def shape(self) -> dict[str, Any]:
        """The attention fields of the LayerSpec this block fits."""
        raise NotImplementedError

    def frozen(self) -> list[nn.Parameter]:
        """The parameters a retrained block keeps as the teacher's."""
        return [p for n, p in self.named_parameters() if n.startswith(self.FROZEN)] if self.FROZEN else []


class SwappableLayer(nn.Module):
    """One layer: an attention block (attribute ``ATTENTION``) then a feed-forward part (``feed_forward``)."""

    ATTENTION: ClassVar[str] = "attention"

    @property
    def block(self) -> SwappableAttention:
        return getattr(self, self.ATTENTION)

    def set_block(self, module: SwappableAttention) -> None:
        """Put ``module`` in place of the attention block (nn.Module attributes bypass property setters)."""
        setattr(self, self.ATTENTION, module)

    def feed_forward(self, a: torch.Tensor) -> torch.Tensor:
        """The layer's output from the attention block's output ``a``."""
        raise NotImplementedError

    def neurons(self, a: torch.Tensor) -> torch.Tensor:
        """The feed-forward part's hidden activations [..., width] for the attention block's output ``a`` (what its
        output projection reads; for ranking its neurons)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self.feed_forward(self.block(x, ctx))


class SwappableModel(nn.Module):
    """Embeddings, a list of ``SwappableLayer`` at attribute path ``LAYERS``, and a language-model head."""

    LAYERS: ClassVar[tuple[str, ...]] = ()
    TASK: ClassVar[str] = ""  # "mlm" (masked LM) or "causal" (next-token LM)
    config: ModelConfig

    # ---- what a family supplies ----
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def context(self, attention_mask: torch.Tensor | None, seq_len: int | None = None, *, always_mask: bool = False
                ) -> Any:
        """What every layer receives besides the hidden state, for a [B, T] 0/1 mask (None: no padding);
        ``always_mask``: apply the mask even when it masks nothing (no data-dependent branch, for tracing)."""
        raise NotImplementedError

    @property
    def has_lm_head(self) -> bool:
        raise NotImplementedError

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from last-layer hidden states (any leading shape)."""
        raise NotImplementedError

    # the names of the masked-LM days, kept until every caller says lm
    has_mlm_head = property(lambda self: self.has_lm_head)

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_logits(h)

    def require_mlm_head(self, what: str) -> None:
        self.require_lm_head(what)

    # ---- shared ----
    @property
    def layers(self) -> nn.ModuleList:
        owner = self
        for name in self.LAYERS:
            owner = getattr(owner, name)
        return owner

    def _set_layers(self, layers: list[nn.Module]) -> None:
        owner = self
        for name in self.LAYERS[:-1]:
            owner = getattr(owner, name)
        setattr(owner, self.LAYERS[-1], nn.ModuleList(layers))

    # how a missing head is explained: what the head is, what checkpoints lack it, which have it
    NO_HEAD: ClassVar[tuple[str, str, str]] = ("a language-model head", "a plain encoder", "a checkpoint with its head")

    def require_lm_head(self, what: str) -> None:
        if not self.has_lm_head:
            head, without, use = self.NO_HEAD
            raise NoLMHeadError(f"{what} needs {head}, but this checkpoint has none ({without}); use {use} or a "
                                "hidden-state objective")

    def run_layers(self, h: torch.Tensor, ctx: Any, start: int = 0, *, end: int | None = None,
                   collect: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Run layers [start, end) on hidden state ``h`` (the input of layer ``start``); ``ctx`` from ``context``."""
        for layer in self.layers[start:end]:
            h = layer(h, ctx)
            if collect is not None:
                collect.append(h)
        return h

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, *, output_hidden_states: bool = False,
                with_logits: bool = True) -> ModelOutputs:
        ctx = self.context(attention_mask, input_ids.shape[1])
        h = self.embed(input_ids, token_type_ids)
        hidden = [h] if output_hidden_states else None
        h = self.run_layers(h, ctx, collect=hidden)
        logits = self.lm_logits(h) if (with_logits and self.has_lm_head) else None
        return ModelOutputs(last_hidden_state=h, logits=logits, hidden_states=hidden)

    def hidden_before(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int, *,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden state entering ``layer`` (embeddings output for layer 0)."""
        ctx = self.context(attention_mask, input_ids.shape[1])
        return self.run_layers(self.embed(input_ids, token_type_ids), ctx, 0, end=layer)

    # ---- swapping ----
    def replace_attention(self, index: int, attention: SwappableAttention, kind: str = "block") -> None:
        """Put ``attention`` (any shape) in place of layer ``index``'s attention block; the layer's spec follows."""
        self._check_index(index)
        self.layers[index].set_block(attention)
        spec = self.config.layers[index]
        shape = attention.shape()
        for key in LayerSpec.ATTENTION_FIELDS:  # fields the new block does not have are reset
            setattr(spec, key, shape.get(key))
        spec.kind = kind

    def replace_layer(self, index: int, layer: SwappableLayer, spec: LayerSpec) -> None:
        """Put ``layer`` (described by ``spec``, standing for the same teacher layers) in place of layer ``index``."""
        self._check_index(index)
        self.layers[index] = layer
        self.config.layers[index] = copy.deepcopy(spec)

    def merge_layers(self, index: int, layer: SwappableLayer, spec: LayerSpec) -> None:
        """Replace layers ``index`` and ``index + 1`` by the single ``layer`` described by ``spec``."""
        self._check_index(index)
        if index + 1 >= len(self.layers):
            raise IndexError(f"cannot merge layer {index} with {index + 1}: the model has {len(self.layers)} layers")
        mods = list(self.layers)
        self._set_layers(mods[:index] + [layer] + mods[index + 2:])
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

    def view(self) -> "SwappableModel":
        """A model that shares every module with this one but has its own layer list, layer modules and plan, so
        that layers and blocks can be swapped in the view without touching this model (no weights are copied)."""
        view = copy.copy(self)
        view._modules = dict(self._modules)
        view.config = copy.deepcopy(self.config)
        owner = view
        for name in self.LAYERS[:-1]:
            child = copy.copy(getattr(owner, name))
            child._modules = dict(child._modules)
            owner._modules[name] = child
            owner = child
        layers = []
        for layer in getattr(owner, self.LAYERS[-1]):
            own = copy.copy(layer)
            own._modules = dict(layer._modules)
            layers.append(own)
        owner._modules[self.LAYERS[-1]] = nn.ModuleList(layers)
        return view


def apply_renames(key: str, renames: list[tuple[str, str | None]]) -> str | None:
    """A checkpoint key through a family's table of (regex, replacement) in order; None: the key matches a pattern
    whose replacement is None (a tensor our model does not keep: tied, or recomputed)."""
    for pattern, repl in renames:
        if repl is None:
            if re.search(pattern, key):
                return None
        else:
            key = re.sub(pattern, repl, key)
    return key

