"""Quality against size and speed: compressed students of a real masked-LM teacher, retrained vs untrained.

For every setting of the sweep two students are measured on the test split (one seeded [MASK] per sentence, the
protocol of eval_merged_12.py):

  blocks HxD  every attention block cut to H heads of D dims.
              untrained: importance head pruning (keep the H most important teacher heads, truncated SVD of each
              kept head's bilinear maps when D is below the teacher's head_dim) -- exactly the ``--init teacher``
              starting point of retrain_single_block.py;
              retrained: those blocks trained against the teacher's blocks (one shared teacher pass, cached), the
              best validation checkpoint of each block assembled with utils.training.students.build_student.
  merged      each pair of layers (0,1), (2,3), ... replaced by one full layer (6 -> 3 layers for MiniLM).
              untrained: drop every second layer (the merged layer initialised from the first of its pair);
              retrained: the merged layers trained on the teacher's hidden states (MergeDistill), then optionally the
              whole model fine-tuned end to end (ModelDistill, KL at the masks); the dropped baseline gets the same
              fine-tune as a third, "trained" baseline.

Reported: masked-token top-1 / top-5 accuracy, agreement with the teacher's top-1, KL(teacher || student) and the
final-hidden-state cosine, against parameters and latency (median over interleaved repeats of one 32 x 40 batch).
Outputs (in --out): quality.json, quality.md, quality.png.

    python bench/quality.py --teacher ../shared/models/minilm-mlm-wikitext2 --data-dir bench/results/wikitext2_split
    python bench/quality.py --quick --device cuda            # a tiny sweep, a few minutes on a GPU
    python bench/quality.py --save-baseline bench/results/baseline_h4 --heads 4 --head-dim 32   # one untrained model
    python bench/quality.py --blocks 4x32 --no-merge --epochs 3 \
        --loss-variants output,output+relations:balanced,output+relations:1   # block losses side by side, paired

With ``--loss-variants`` every block setting is retrained once per variant (LOSS[:WEIGHT], the weight of the term
added to the output term: 'balanced' or a number) from the same starting blocks, and every pair of variants of a
setting is compared by McNemar's exact test over the same test sentences (top-1 correct, agreement).

Only the library is called (models/, utils/); nothing here imports ``datasets``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from models import load_teacher, weights_hash
from bench.plans import mcnemar
from models.compress import clone_model, compose, drop_every_second
from utils import runtime
from utils.data.batches import TokenizedSentences, make_loader
from utils.data.masking import MLMMasker
from utils.data.text import DataConfig, load_sentences
from utils.evaluation.metrics import compare_models
from utils.storage.features import TeacherCache
from utils.training.loop import TrainConfig, Trainer, Unit
from utils.cli.types import positive_float, term_weight
from utils.training.losses import normalize_criterion
from utils.training.students import build_student, conditioned_teacher, load_model, save_model
from utils.training.tasks import (BALANCE_RATIO, BALANCED, BlockDistill, MergeDistill, ModelDistill, balance_terms,
                                  describe_losses)
from utils.training.units import init_blocks, init_merges, unit_meta, unit_spec

log = logging.getLogger("simplifying_transformers")

DEFAULT_TEACHER = ROOT.parent / "shared" / "models" / "minilm-mlm-wikitext2"
DEFAULT_DATA = ROOT / "bench" / "results" / "wikitext2_split"
FULL_BLOCKS = "12x32,6x32,4x32,12x16,6x16"
BLOCK_LOSSES = ("output", "scores", "output+scores", "mlm", "relations", "output+relations")
QUICK_BLOCKS = "4x32,6x16"


@dataclass
class Data:
    tokenizer: Any
    train: TokenizedSentences
    valid_loader: Any
    test_loader: Any
    train_loader: Any
    sampler: Any
    probe: dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# data
def load_data(args: argparse.Namespace, tokenizer) -> Data:
    if Path(args.data_dir).resolve() == DEFAULT_DATA.resolve() and not (DEFAULT_DATA / "test.txt").is_file():
        # the default split is missing: write it (the teacher's own train split of the shared WikiText-2 text)
        sys.path.insert(0, str(ROOT / "bench"))
        from prepare_wikitext2 import prepare

        prepare(ROOT.parent / "shared" / "data" / "wikitext2" / "valid.txt", DEFAULT_DATA)
    spec = DataConfig(data_dir=str(args.data_dir), seed=args.seed)

    def split(name: str, limit: int | None) -> TokenizedSentences:
        sents = load_sentences(spec, name)
        if limit:
            sents = sents[:limit]
        return TokenizedSentences(sents, tokenizer, args.seq_len, mask_seed=args.seed)

    train = split("train", args.max_train)
    valid = split("valid", args.max_valid)
    test = split("test", args.max_test)
    log.info("data %s: train %d, valid %d, test %d sentences", args.data_dir, len(train), len(valid), len(test))
    pin = args.device_obj.type == "cuda"
    train_loader, sampler = make_loader(train, tokenizer, args.batch_size, shuffle=True, seed=args.seed,
                                        pin_memory=pin)
    valid_loader, _ = make_loader(valid, tokenizer, args.batch_size, shuffle=False, seed=args.seed, pin_memory=pin)
    test_loader, _ = make_loader(test, tokenizer, args.batch_size, shuffle=False, seed=args.seed, pin_memory=pin)
    # the batch retrain_single_block.py ranks heads on: the first one of the unshuffled training split
    probe = next(iter(make_loader(train, tokenizer, args.batch_size, shuffle=False, seed=args.seed)[0]))
    return Data(tokenizer, train, valid_loader, test_loader, train_loader, sampler, probe)


# ---------------------------------------------------------------------------------------------------------------
# students
def pruned_blocks(teacher, probe: dict[str, torch.Tensor], heads: int, head_dim: int, device: torch.device
                  ) -> tuple[dict[int, Any], dict[int, str]]:
    """Untrained blocks: the ``heads`` most important teacher heads per layer (SVD when head_dim shrinks).

    Same importance (on the same probe batch) and the same initialiser as ``retrain_single_block.py --init teacher``.
    """
    cfg = teacher.config
    specs = {i: unit_spec(cfg, [i], "block", num_heads=heads, head_dim=head_dim) for i in range(len(teacher.layers))}
    return init_blocks(teacher, specs, init="teacher", probe=probe)


def dropped_model(teacher):
    """Teacher without layers 1, 3, 5, ... (``finetune_merged.py --drop-every-second``'s student)."""
    return drop_every_second(teacher)[0]


def train_config(args: argparse.Namespace, epochs: int, lr: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, seed=args.seed, warmup=0.06, schedule="linear", clip=1.0,
                       max_steps_per_epoch=args.max_steps)


def retrain_blocks(args, teacher, th: str, data: Data, cache: TeacherCache | None, blocks: dict[int, Any],
                   notes: dict[int, str], run_dir: Path, variant: tuple[str, float | str, float] | None = None):
    """Train ``blocks`` (in place) against the teacher's blocks on ``variant`` (loss, weight of the added term, balance
    ratio; default --block-loss, --term-weight, --balance-ratio); return the assembled best-checkpoint model."""
    cfg = teacher.config
    loss, weight, ratio = variant or (args.block_loss, args.term_weight, args.balance_ratio)
    loss_on = loss.split("+")
    masker = MLMMasker(data.tokenizer, cfg.vocab_size) if loss_on == ["mlm"] else None
    task = BlockDistill(teacher, blocks, loss_on, criterion=args.criterion, score_criterion="CrossEntropy",
                        masker=masker, cache=cache if loss_on != ["mlm"] else None, temperature=args.temperature,
                        seed=args.seed, relation_weight=weight, score_weight=weight,
                        balance_ratio=ratio).to(args.device_obj)
    balance_terms(task, data.probe)  # the scripts' scales: the same probe batch, the blocks as they start
    units = [Unit(f"block_{i}", b, run_dir / f"block_{i}",
                  unit_meta("block", unit_spec(cfg, [i], "block", **b.shape()), cfg, teacher=args.teacher,
                            teacher_hash=th, **describe_losses(task, f"block_{i}"), init=notes[i]))
             for i, b in blocks.items()]
    Trainer(task, units, train_config(args, args.epochs, args.lr), run_dir=run_dir, device=args.device_obj,
            evaluate=lambda: task.evaluate(data.valid_loader), run_meta={"run_dir": str(run_dir)}).fit(
        data.train_loader, data.sampler)
    model, _ = build_student(teacher, [run_dir], th, keep=lambda m: m["kind"] == "block")
    return model


def retrain_merges(args, teacher, th: str, data: Data, cache: TeacherCache | None, run_dir: Path):
    """Every pair merged into one layer initialised from its first layer, trained on the teacher's hidden states
    (conditioned on the already merged earlier pairs with --conditioned); returns the assembled model."""
    cfg = teacher.config
    pairs = list(range(0, len(teacher.layers) - 1, 2))
    # the teacher's shape: no head ranking, so no probe batch
    layers, _ = init_merges(teacher, {i: unit_spec(cfg, [i, i + 1], "merged") for i in pairs}, init="first",
                            probe=None)
    notes = {i: "first layer of the pair" for i in pairs}
    groups = [[i] for i in pairs] if args.conditioned else [pairs]
    for group in groups:
        inputs_from = conditioned_teacher(teacher, run_dir, group[0], teacher_hash=th)[0] if args.conditioned else None
        task = MergeDistill(teacher, {i: layers[i] for i in group}, "hidden", criterion="MSE",
                            cache=None if args.conditioned else cache, inputs_from=inputs_from, temperature=1.0,
                            seed=args.seed).to(args.device_obj)
        units = [Unit(f"merge_{i}", layers[i][0], run_dir / f"merge_{i}",
                      unit_meta("merged_layer", layers[i][1], cfg, teacher=args.teacher, teacher_hash=th,
                                conditioned=args.conditioned, **describe_losses(task), init=notes[i])) for i in group]
        sub = run_dir / (f"merge_{group[0]}" if args.conditioned else "")
        Trainer(task, units, train_config(args, args.epochs, args.lr), run_dir=sub, device=args.device_obj,
                evaluate=lambda t=task: t.evaluate(data.valid_loader), run_meta={"run_dir": str(run_dir)}).fit(
            data.train_loader, data.sampler)
    model, _ = build_student(teacher, [run_dir], th, keep=lambda m: m["kind"] == "merged_layer")
    return model


def finetune(args, teacher, th: str, data: Data, student, run_dir: Path):
    """End-to-end distillation of a whole student (KL at the masks, temperature --temperature-ft); best checkpoint."""
    student = student.to(args.device_obj)
    task = ModelDistill(teacher, student, MLMMasker(data.tokenizer, teacher.config.vocab_size), kl_weight=1.0,
                        mlm_weight=0.0, hidden_weight=args.ft_hidden_weight, temperature=args.ft_temperature,
                        seed=args.seed).to(args.device_obj)
    meta = {"kind": "model", "config": student.config.to_dict(), "teacher": str(args.teacher), "teacher_hash": th,
            **describe_losses(task)}
    unit = Unit("model", student, run_dir / "model", meta)
    Trainer(task, [unit], train_config(args, args.ft_epochs, args.ft_lr), run_dir=run_dir, device=args.device_obj,
            evaluate=lambda: task.evaluate(data.valid_loader), run_meta={"run_dir": str(run_dir)}).fit(
        data.train_loader, data.sampler)
    return load_model(run_dir / "model" / "best")[0].to(args.device_obj)


# ---------------------------------------------------------------------------------------------------------------
# measuring
def arch_key(model) -> str:
    """Shape of every layer (not how it was made): models sharing it share one latency measurement."""
    return " | ".join(f"{s.num_heads}x{s.head_dim} ffn {s.intermediate_size}" for s in model.config.layers)


@torch.no_grad()
def latencies(models: dict[str, Any], device: torch.device, reps: int, batch: int = 32, seq: int = 40,
              vocab: int = 30000) -> dict[str, float]:
    """Median ms per encoder forward (embeddings + layers, no vocabulary projection) of one batch x seq input.

    The MLM decoder (hidden x 30522 for every token) costs more than MiniLM's whole encoder and is the same for every
    student, so it is left out. Models are timed round-robin, so a slow-down of a shared machine hits all alike."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch, seq), generator=g).to(device)  # a tiny vocabulary too
    att = torch.ones(batch, seq, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.eval()
        for _ in range(2):
            m(ids, att, with_logits=False)
    for _ in range(reps):
        for k, m in models.items():
            sync()
            t0 = time.perf_counter()
            m(ids, att, with_logits=False)
            sync()
            times[k].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def evaluate(teacher, student, data: Data, device: torch.device, per_sentence: bool = False) -> dict[str, Any]:
    """The test-split metrics; with ``per_sentence`` also ``right`` / ``agree`` (per test sentence: the student's
    top-1 is the true token / the teacher's), for paired tests."""
    res = compare_models(teacher, student.to(device).eval(), data.test_loader, tokenizer=data.tokenizer,
                         device=device, keep_rows=per_sentence)
    m = res.metrics
    keep = ("student_params", "student_top1", "student_top5", "student_top10", "agreement_top1",
            "kl_teacher_student", "hidden_cosine", "hidden_mse", "teacher_top1", "teacher_params", "sentences")
    out = {k: m[k] for k in keep if k in m}
    if per_sentence and res.rows:
        out["right"] = [r["student"] == r["true"] for r in res.rows]
        out["agree"] = [r["student"] == r["teacher"] for r in res.rows]
    return out


def paired_tests(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """McNemar (exact, two-sided) between every two retrained variants of a setting, on top-1 and agreement."""
    tests = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        done = [r for r in rows if r["setting"] == setting and "right" in r and r["method"] != "untrained"]
        for i, a in enumerate(done):
            for b in done[i + 1:]:
                tests.append({"setting": setting, "a": a["method"], "b": b["method"],
                              "top1": mcnemar(a["right"], b["right"]), "agreement": mcnemar(a["agree"], b["agree"])})
    return tests


def parse_variant(s: str) -> tuple[str, float | str, float]:
    """LOSS[:WEIGHT] of --loss-variants: a --block-loss and the weight of its added term: a number, balanced (ratio
    BALANCE_RATIO) or balanced@R (ratio R)."""
    loss, _, weight = s.strip().partition(":")
    weight, _, ratio = weight.partition("@")
    if loss not in BLOCK_LOSSES or (ratio and weight != BALANCED):
        raise argparse.ArgumentTypeError(f"a loss variant is LOSS[:WEIGHT] with LOSS one of {', '.join(BLOCK_LOSSES)} "
                                         f"and WEIGHT a number, balanced or balanced@RATIO; got '{s}'")
    return (loss, term_weight("--loss-variants")(weight) if weight else BALANCED,
            positive_float(ratio) if ratio else BALANCE_RATIO)


def variant_name(loss: str, weight: float | str, ratio: float) -> str:
    if "+" not in loss:
        return f"retrained: {loss}"
    if weight != BALANCED:
        return f"retrained: {loss}, weight {weight:g}"
    return f"retrained: {loss}, balanced" + ("" if ratio == BALANCE_RATIO else f" x {ratio:g}")


# ---------------------------------------------------------------------------------------------------------------
# reporting
COLS = [("setting", "setting", "{}"), ("method", "method", "{}"), ("params (M)", "params_m", "{:.2f}"),
        ("encoder params (M)", "encoder_params_m", "{:.2f}"), ("encoder ms", "latency_ms", "{:.1f}"),
        ("speed-up", "speedup", "{:.2f}x"), ("top-1", "student_top1", "{:.4f}"), ("top-5", "student_top5", "{:.4f}"),
        ("agreement", "agreement_top1", "{:.4f}"), ("KL(t‖s)", "kl_teacher_student", "{:.4f}"),
        ("hidden cos", "hidden_cosine", "{:.4f}"), ("train s", "train_s", "{:.0f}")]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(c for c, _, _ in COLS) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLS))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else fmt.format(r[k]) for _, k, fmt in COLS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("student_top1", "masked-token top-1 accuracy"), ("agreement_top1", "agreement with teacher top-1"),
               ("hidden_cosine", "final hidden-state cosine")]
    metrics = [m for m in metrics if any(m[0] in r for r in rows)]
    xs = [("encoder_params_m", "encoder parameters, millions (embeddings and MLM head excluded)"),
          ("latency_ms", "encoder latency, ms per 32x40 batch (lower is faster)")]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(14, 4.2 * len(metrics)), squeeze=False)
    settings = [s for s in dict.fromkeys(r["setting"] for r in rows) if s != "teacher"]
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(settings)}
    style = {"untrained": {"marker": "o", "facecolors": "none", "s": 70},
             "retrained": {"marker": "o", "s": 70},
             "retrained + fine-tuned": {"marker": "D", "s": 70},
             "untrained + fine-tuned": {"marker": "s", "facecolors": "none", "s": 70}}
    for row_i, (mk, mlabel) in enumerate(metrics):
        for col_i, (xk, xlabel) in enumerate(xs):
            ax = axes[row_i][col_i]
            for r in rows:
                if mk not in r:
                    continue
                if r["setting"] == "teacher":
                    ax.scatter(r[xk], r[mk], marker="*", s=260, color="black", zorder=5, label="teacher")
                    continue
                st = dict(style.get(r["method"], {"marker": "x", "s": 70}))
                c = colors[r["setting"]]
                if st.get("facecolors") == "none":
                    ax.scatter(r[xk], r[mk], edgecolors=[c], linewidths=1.8, zorder=4, **st)
                else:
                    ax.scatter(r[xk], r[mk], color=c, zorder=4, **st)
            for s in settings:  # arrow untrained -> best trained of the same setting
                pts = [r for r in rows if r["setting"] == s and mk in r]
                base = [r for r in pts if r["method"] == "untrained"]
                done = [r for r in pts if r["method"] != "untrained"]
                if base and done:
                    b, d = base[0], max(done, key=lambda r: r[mk])
                    ax.annotate("", xy=(d[xk], d[mk]), xytext=(b[xk], b[mk]),
                                arrowprops={"arrowstyle": "->", "color": colors[s], "alpha": 0.6, "lw": 1.2})
            ax.set_xlabel(xlabel)
            ax.set_ylabel(mlabel)
            ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="*", color="black", ls="", ms=14, label="teacher"),
               Line2D([], [], marker="o", mfc="none", mec="gray", ls="", ms=9, label="untrained baseline"),
               Line2D([], [], marker="o", color="gray", ls="", ms=9, label="retrained"),
               Line2D([], [], marker="s", mfc="none", mec="gray", ls="", ms=9, label="untrained + fine-tuned"),
               Line2D([], [], marker="D", color="gray", ls="", ms=9, label="retrained + fine-tuned")]
    handles += [Line2D([], [], color=colors[s], lw=6, label=s) for s in settings]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False,
               bbox_to_anchor=(0.5, 1.0), fontsize=10)
    fig.suptitle(title + "\narrows: untrained baseline -> best trained student of the same setting", y=1.05,
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
def parse_shape(s: str) -> tuple[int, int]:
    try:
        h, d = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a block shape is HEADSxHEAD_DIM, e.g. 4x32; got '{s}'") from None
    if h <= 0 or d <= 0:
        raise argparse.ArgumentTypeError(f"heads and head_dim must be positive, got '{s}'")
    return h, d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="masked-LM teacher (folder or hub id)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                   help="train.txt / valid.txt / test.txt (bench/prepare_wikitext2.py writes them)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None, help="output folder (default bench/results/quality, quick: quality_quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny sweep: blocks {QUICK_BLOCKS} + merged pairs, 1 epoch, 1500 train / 500 test sentences")
    p.add_argument("--blocks", default=None, help=f"block shapes HxD, comma-separated (default {FULL_BLOCKS})")
    p.add_argument("--no-merge", action="store_true", help="leave the merged-pairs setting out")
    p.add_argument("--epochs", type=int, default=None, help="block / merged-layer epochs (default 2, quick 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="block / merged-layer learning rate")
    p.add_argument("--block-loss", default="output", choices=BLOCK_LOSSES,
                   help="what a retrained block is trained on (see retrain_single_block.py --loss-on)")
    p.add_argument("--term-weight", type=term_weight("--term-weight"), default=BALANCED,
                   help="weight of the term a combined --block-loss adds to the output term: 'balanced' (equal to it "
                        "at the start) or a number (see retrain_single_block.py --relation-weight / --score-weight)")
    p.add_argument("--balance-ratio", type=positive_float, default=BALANCE_RATIO,
                   help="a balanced term starts at this many times the output term")
    p.add_argument("--loss-variants", default=None, type=lambda v: [parse_variant(x) for x in v.split(",") if x],
                   help="retrain every block setting once per variant LOSS[:WEIGHT], e.g. "
                        "output,output+relations:balanced,output+relations:balanced@0.1,output+relations:1 "
                        "(balanced@R: ratio R), and compare them paired")
    p.add_argument("--criterion", default="MSE", type=normalize_criterion,
                   help="criterion on the block output: MSE, L1, cosine, CrossEntropy")
    p.add_argument("--temperature", type=float, default=1.0, help="for --block-loss mlm")
    p.add_argument("--conditioned", action=argparse.BooleanOptionalAction, default=True,
                   help="train each merged pair on the output of the model whose earlier pairs are merged already")
    p.add_argument("--ft-epochs", type=int, default=None,
                   help="end-to-end fine-tune epochs for the merged / dropped students (0: none; default 1)")
    p.add_argument("--ft-lr", type=float, default=2e-4)
    p.add_argument("--ft-temperature", type=float, default=2.0)
    p.add_argument("--ft-hidden-weight", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=40)
    p.add_argument("--max-train", type=int, default=None, help="first N training sentences (quick: 1500)")
    p.add_argument("--max-valid", type=int, default=None, help="first N validation sentences (quick: 200)")
    p.add_argument("--max-test", type=int, default=None, help="first N test sentences (quick: 500)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on training steps per epoch")
    p.add_argument("--latency-reps", type=int, default=None, help="timed repeats per model (default 30, quick 10)")
    p.add_argument("--cache-dir", default=str(ROOT / "bench" / "results" / "cache"),
                   help="teacher feature cache (shared with retrain_single_block.py --cache-dir)")
    p.add_argument("--no-cache", action="store_true", help="recompute teacher features every batch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", action="store_true", help="only redo quality.md / quality.png from --out's quality.json")
    p.add_argument("--save-baseline", default=None, metavar="DIR",
                   help="only build the untrained pruned model for --heads x --head-dim, save it (utils.assemble "
                        "format, evaluable by eval_merged_12.py --model DIR) and exit")
    p.add_argument("--baseline", choices=["pruned", "dropped"], default="pruned",
                   help="with --save-baseline: importance head pruning (--heads, --head-dim) or drop every second "
                        "layer")
    p.add_argument("--heads", type=int, default=4, help="with --save-baseline")
    p.add_argument("--head-dim", type=int, default=None, help="with --save-baseline (default: the teacher's)")
    return p


def apply_quick_defaults(args: argparse.Namespace) -> None:
    q = args.quick
    defaults = {"epochs": (2, 1), "ft_epochs": (1, 1), "max_train": (None, 1500), "max_valid": (None, 200),
                "max_test": (None, 500), "latency_reps": (30, 10), "blocks": (FULL_BLOCKS, QUICK_BLOCKS)}
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / ("quality_quick" if q else "quality"))
    args.shapes = [parse_shape(s) for s in args.blocks.split(",") if s.strip()]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), torch {torch.__version__}"
    return (f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch threads "
            f"{torch.get_num_threads()}, torch {torch.__version__}")


def save_baseline(args, teacher, tok, th: str) -> int:
    """The untrained baseline alone, saved like an assembled model (eval_merged_12.py --model DIR evaluates it)."""
    if args.baseline == "dropped":
        model = dropped_model(teacher)
        sources = ["untrained: every second teacher layer dropped"]
    else:
        data = load_data(args, tok)
        head_dim = args.head_dim or teacher.config.head_dim
        blocks, notes = pruned_blocks(teacher, data.probe, args.heads, head_dim, args.device_obj)
        for i in sorted(notes):
            print(f"layer {i}: {notes[i]}")
        model = clone_model(compose(teacher, blocks=blocks))
        for spec in model.config.layers:
            spec.kind = "pruned"
        sources = [f"untrained importance pruning to {args.heads}x{head_dim}: layer {i}: {notes[i]}"
                   for i in sorted(notes)]
    save_model(model, args.save_baseline, {"teacher": str(args.teacher), "teacher_hash": th, "sources": sources})
    tok.save_pretrained(str(Path(args.save_baseline) / "tokenizer"))
    print(model.config.describe())
    print(f"parameters: teacher {teacher.num_parameters():,} -> {model.num_parameters():,}")
    print(f"saved to {args.save_baseline}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_quick_defaults(args)
    if args.replot:
        out = Path(args.out)
        report(json.loads((out / "quality.json").read_text()), out)
        return 0
    runtime.setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device_obj = device = runtime.select_device(args.device)
    runtime.seed_everything(args.seed)
    teacher, tok = load_teacher(args.teacher, device)
    teacher.eval().requires_grad_(False)
    th = weights_hash(teacher)
    if args.save_baseline:
        return save_baseline(args, teacher, tok, th)
    if not teacher.has_mlm_head:
        log.warning("the teacher has no masked-LM head: accuracy / agreement are skipped, fidelity is reported, and "
                    "the end-to-end fine-tunes are left out")
        args.ft_epochs = 0
    out = Path(args.out)
    runs = out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_data(args, tok)
    cache = None
    if not args.no_cache:
        names = [f"{k}_{i}" for i in range(len(teacher.layers)) for k in ("in", "block")]
        names += [f"out_{i + 1}" for i in range(0, len(teacher.layers) - 1, 2)]
        cache = TeacherCache(args.cache_dir, teacher, teacher_hash=th, token_ids=data.train.ids,
                             tokenizer_name=str(args.teacher), seq_len=args.seq_len)
        cache.ensure(names, args.batch_size * 4, device)

    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}  # architecture -> one model of it, for the latency pass
    encoder_params: dict[str, int] = {}

    def record(setting: str, method: str, model, train_s: float | None, note: str = "") -> None:
        t0 = time.perf_counter()
        paired = args.loss_variants is not None and method.startswith("retrained")
        r = {"setting": setting, "method": method, **evaluate(teacher, model, data, device, per_sentence=paired),
             "train_s": None if train_s is None else round(train_s, 1), "arch": arch_key(model), "note": note}
        models.setdefault(r["arch"], model)
        encoder_params[r["arch"]] = sum(p.numel() for p in model.layers.parameters())
        rows.append(r)
        log.info("%-12s %-24s top1 %.4f  agree %.4f  cos %.4f  (eval %.0fs)", setting, method,
                 r.get("student_top1", float("nan")), r.get("agreement_top1", float("nan")), r["hidden_cosine"],
                 time.perf_counter() - t0)
        (out / "quality.partial.json").write_text(json.dumps(public(rows), indent=2, default=str))

    record("teacher", "teacher", teacher, None)
    for heads, head_dim in args.shapes:
        setting = f"blocks {heads}x{head_dim}"
        blocks, notes = pruned_blocks(teacher, data.probe, heads, head_dim, device)
        record(setting, "untrained", clone_model(compose(teacher, blocks=copy.deepcopy(blocks))), None,
               "importance pruning" + (", SVD head_dim" if head_dim < teacher.config.head_dim else ""))
        for variant in args.loss_variants or [None]:
            t0 = time.perf_counter()
            name = f"blocks_h{heads}_d{head_dim}"
            if variant is not None:
                loss, weight, ratio = variant
                name += f"_{loss}" + ("" if "+" not in loss else f"_{weight}")
                name += "" if weight != BALANCED or ratio == BALANCE_RATIO else f"{ratio:g}"
            model = retrain_blocks(args, teacher, th, data, cache, copy.deepcopy(blocks), notes, runs / name,
                                   variant)
            method = "retrained" if variant is None else variant_name(*variant)
            loss = variant[0] if variant else args.block_loss
            record(setting, method, model, time.perf_counter() - t0, f"loss {loss} {args.criterion}")
            del model
        del blocks
    if not args.no_merge and len(teacher.layers) >= 2:
        setting = "merged pairs"
        dropped = dropped_model(teacher)
        record(setting, "untrained", dropped, None, "drop every second layer")
        t0 = time.perf_counter()
        merged = retrain_merges(args, teacher, th, data, cache, runs / "merged")
        t_merge = time.perf_counter() - t0
        record(setting, "retrained", merged, t_merge, "hidden MSE" + (", conditioned" if args.conditioned else ""))
        if args.ft_epochs > 0:
            t0 = time.perf_counter()
            ft = finetune(args, teacher, th, data, clone_model(merged), runs / "merged_finetuned")
            record(setting, "retrained + fine-tuned", ft, t_merge + time.perf_counter() - t0,
                   f"+ {args.ft_epochs} ep KL T={args.ft_temperature}")
            t0 = time.perf_counter()
            ft = finetune(args, teacher, th, data, clone_model(dropped), runs / "dropped_finetuned")
            record(setting, "untrained + fine-tuned", ft, time.perf_counter() - t0,
                   f"dropped + {args.ft_epochs} ep KL T={args.ft_temperature}")

    log.info("timing %d architectures x %d repeats", len(models), args.latency_reps)
    lat = latencies(models, device, args.latency_reps, vocab=teacher.config.vocab_size)
    t_lat = lat[arch_key(teacher)]
    for r in rows:
        r["latency_ms"] = lat[r["arch"]]
        r["speedup"] = t_lat / r["latency_ms"]
        r["params_m"] = r["student_params"] / 1e6
        r["encoder_params_m"] = encoder_params[r["arch"]] / 1e6
        r["param_ratio"] = r["student_params"] / r["teacher_params"]
    result = {"machine": machine(device), "device": str(device), "teacher": str(args.teacher),
              "data_dir": str(args.data_dir), "train_sentences": len(data.train), "quick": args.quick,
              "latency": f"median of {args.latency_reps} round-robin repeats, encoder only, batch 32 x seq 40",
              "args": {k: v for k, v in vars(args).items() if k not in ("device_obj", "shapes")},
              "wall_s": round(time.perf_counter() - t_start, 1), "rows": public(rows), "tests": paired_tests(rows)}
    (out / "quality.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "quality.partial.json").unlink(missing_ok=True)
    report(result, out)
    return 0


def public(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows without their per-sentence outcomes (kept in memory for the paired tests only)."""
    return [{k: v for k, v in r.items() if k not in ("right", "agree")} for r in rows]


def tests_markdown(tests: list[dict[str, Any]]) -> str:
    """The paired tests as a table: sentences only a / only b gets right (agrees with the teacher), z, p."""
    if not tests:
        return ""
    lines = ["| setting | a | b | top-1: only a / only b, z, p | agreement: only a / only b, z, p |",
             "|---|---|---|---:|---:|"]
    for t in tests:
        cells = [f"{t[m]['only_a']} / {t[m]['only_b']}, z = {t[m]['z']:+.2f}, p = {t[m]['p']:.3g}"
                 for m in ("top1", "agreement")]
        lines.append(f"| {t['setting']} | {t['a']} | {t['b']} | {cells[0]} | {cells[1]} |")
    return "\n\nPaired tests (McNemar, exact two-sided, over the same test sentences):\n\n" + "\n".join(lines)


def report(result: dict[str, Any], out: Path) -> None:
    """quality.md and quality.png from a quality.json payload (also what --replot redoes)."""
    rows = result["rows"]
    head = (f"Teacher {result['teacher']}; data {result['data_dir']} (train {result['train_sentences']}, test "
            f"{rows[0]['sentences']} sentences); {result['machine']}; latency: {result['latency']}; "
            f"sweep wall time {result['wall_s']:.0f} s")
    table = markdown(rows) + tests_markdown(result.get("tests", []))
    (out / "quality.md").write_text(f"{head}\n\n{table}\n")
    plot(rows, out / "quality.png", f"Quality vs size and speed — {Path(result['teacher']).name}, "
                                    f"{result['machine'].split(',')[0]}")
    print(head)
    print(table)
    print(f"written to {out}/quality.{{json,md,png}}")


if __name__ == "__main__":
    sys.exit(main())
