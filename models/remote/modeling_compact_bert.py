"""CompactBERT: a BERT whose layers each have their own number of heads, per-head size and feed-forward size.

Written next to an exported model by simplifying-transformers so that
``AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)`` loads a compressed student without that
repository. Self-contained: it imports only torch and transformers (>= 4.40, 5.x). Weight names follow Hugging Face
``BertForMaskedLM`` (``bert.embeddings.*``, ``bert.encoder.layer.N.*``, ``cls.predictions.*``); the masked-LM decoder
reuses the word-embedding matrix, so it has no weight of its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

try:  # transformers 5 renamed the base class; the old name is an alias there
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class CompactBertConfig(_BaseConfig):
    """BERT config plus ``layer_plan``: one ``{num_heads, head_dim, intermediate_size}`` dict per layer."""

    model_type = "compact_bert"

    def __init__(self, vocab_size=30522, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                 num_hidden_layers=12, layer_plan=None, hidden_act="gelu", hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                 initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads  # the teacher's, for reference; layers use layer_plan
        self.intermediate_size = intermediate_size
        if layer_plan is None:
            layer_plan = [{"num_heads": num_attention_heads, "head_dim": hidden_size // num_attention_heads,
                           "intermediate_size": intermediate_size}] * num_hidden_layers
        self.layer_plan = [dict(p) for p in layer_plan]
        self.num_hidden_layers = len(self.layer_plan)
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        kwargs.setdefault("tie_word_embeddings", False)  # the decoder reads the embedding matrix directly
        super().__init__(pad_token_id=pad_token_id, **kwargs)


def _act(name):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act '{name}'; supported: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


class CompactBertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        if token_type_ids is None:
            h = h + self.token_type_embeddings.weight[0]
        else:
            h = h + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(h))


class CompactBertSelfAttention(nn.Module):
    """Multi-head attention, or grouped-query with ``num_kv_heads`` key/value heads shared by consecutive query
    heads (query head h reads key/value head h // (num_heads / num_kv_heads))."""

    def __init__(self, config, num_heads, head_dim, num_kv_heads=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.query = nn.Linear(config.hidden_size, num_heads * head_dim)
        self.key = nn.Linear(config.hidden_size, self.num_kv_heads * head_dim)
        self.value = nn.Linear(config.hidden_size, self.num_kv_heads * head_dim)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x, mask=None):
        B, T, _ = x.shape
        G, group = self.num_kv_heads, self.num_heads // self.num_kv_heads

        def split(t, heads):
            return t.view(B, T, heads, self.head_dim).transpose(1, 2)

        def shared(t):
            return t[:, :, None].expand(B, G, group, T, self.head_dim).reshape(B, G * group, T, self.head_dim)

        k, v = shared(split(self.key(x), G)), shared(split(self.value(x), G))
        ctx = F.scaled_dot_product_attention(split(self.query(x), self.num_heads), k, v,
                                             attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0)
        return ctx.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)


class CompactBertSelfOutput(nn.Module):
    def __init__(self, config, inner):
        super().__init__()
        self.dense = nn.Linear(inner, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class CompactBertAttention(nn.Module):
    def __init__(self, config, num_heads, head_dim, num_kv_heads=None):
        super().__init__()
        self.self = CompactBertSelfAttention(config, num_heads, head_dim, num_kv_heads)
        self.output = CompactBertSelfOutput(config, num_heads * head_dim)

    def forward(self, x, mask=None):
        return self.output.LayerNorm(x + self.output.dropout(self.output.dense(self.self(x, mask))))


class CompactBertIntermediate(nn.Module):
    def __init__(self, config, size):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, size)
        self.act = _act(config.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class CompactBertOutput(nn.Module):
    def __init__(self, config, size):
        super().__init__()
        self.dense = nn.Linear(size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class CompactBertLayer(nn.Module):
    def __init__(self, config, plan):
        super().__init__()
        kind = plan.get("attention", "mha")
        if kind not in ("mha", "gqa"):
            raise ValueError(f"this CompactBERT file does not know attention kind '{kind}'")
        kv = int(plan["num_kv_heads"]) if kind == "gqa" else None
        self.attention = CompactBertAttention(config, int(plan["num_heads"]), int(plan["head_dim"]), kv)
        self.intermediate = CompactBertIntermediate(config, int(plan["intermediate_size"]))
        self.output = CompactBertOutput(config, int(plan["intermediate_size"]))

    def forward(self, x, mask=None):
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class CompactBertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(CompactBertLayer(config, plan) for plan in config.layer_plan)


class CompactBertPreTrainedModel(PreTrainedModel):
    config_class = CompactBertConfig
    base_model_prefix = "bert"

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, CompactBertLMPredictionHead):
            nn.init.zeros_(module.bias)


class CompactBertModel(CompactBertPreTrainedModel):
    """The encoder: embeddings and layers (no pooler), returning the last hidden state."""

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = CompactBertEmbeddings(config)
        self.encoder = CompactBertEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if input_ids is None:
            raise ValueError("CompactBertModel needs input_ids")
        # [B, T] 0/1 -> [B, 1, 1, T] boolean (True = attend), as scaled_dot_product_attention takes it
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        h = self.embeddings(input_ids, token_type_ids)
        hidden = [h] if output_hidden_states else None
        for layer in self.encoder.layer:
            h = layer(h, mask)
            if hidden is not None:
                hidden.append(h)
        out = BaseModelOutput(last_hidden_state=h, hidden_states=tuple(hidden) if hidden is not None else None)
        return out if return_dict is not False else out.to_tuple()


class CompactBertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = _act(config.hidden_act)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h, word_embeddings):
        h = self.transform.LayerNorm(self.act(self.transform.dense(h)))
        return F.linear(h, word_embeddings, self.bias)


class CompactBertForMaskedLM(CompactBertPreTrainedModel):
    """Encoder + masked-LM head whose decoder is the word-embedding matrix."""

    def __init__(self, config):
        super().__init__(config)
        self.bert = CompactBertModel(config)
        self.cls = nn.Module()
        self.cls.predictions = CompactBertLMPredictionHead(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.bert.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.bert.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        enc = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states)
        logits = self.cls.predictions(enc.last_hidden_state, self.bert.embeddings.word_embeddings.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=enc.hidden_states)
        return out if return_dict is not False else out.to_tuple()
