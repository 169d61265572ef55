"""Block-retraining throughput: the seed's recompute-everything loop vs one shared teacher pass vs the teacher cache.

All blocks of a bert-base-shaped teacher (random weights) are retrained for E epochs on the same N sentences, three
ways, in one process, on identical pre-collated batches (same order, same padding, same students at the start).
The three runs advance step by step in turn, each step timed, so that load from other processes on a shared machine
falls on all of them alike; a method's time is the sum of its steps.

  (a) seed-style: for each block, for each epoch, for each batch: recompute the teacher prefix (embeddings, layers
      0..i-1 and the teacher's block i as the target), then one student step. Teacher work per batch ~ 12*13/2 layers.
  (b) shared:     ``utils.training.tasks.BlockDistill`` without a cache: one teacher pass per batch feeds all 12
      students.
  (c) cached:     the same task on a ``utils.storage.features.TeacherCache`` (fp16, memory-mapped); the one-off build
      (weights hash + one teacher pass over the data + writing the files) is counted in (c) and also shown apart.

A student step is the one ``utils.training.loop.Trainer`` takes: autocast (bf16 on CUDA; ``--amp on`` forces it on CPU
too), backward, per-unit gradient clipping, AdamW (fused on CUDA), the loss read back. The learning-rate schedule is
left out (a scalar per step, the same for all three). The mean final-epoch loss is printed per method: the three do the
same training, so these agree closely (not bit for bit: dropout draws interleave, and (c) reads fp16 features).

    python bench/retrain_throughput.py                     # CPU defaults: 64 sentences, 3 epochs, 6 heads x 64
    python bench/retrain_throughput.py --device cuda --sentences 2048 --batch-size 32
    python bench/retrain_throughput.py --quick             # a tiny teacher, seconds: the smoke test's run
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quick import add_quick  # noqa: E402
from models import BertAttention, BertConfig, BertForMaskedLM, build_model, extended_mask, weights_hash  # noqa: E402
from models.compress import compress_attention  # noqa: E402
from utils.data.batches import BucketBatchSampler, Collator  # noqa: E402
from utils.training.tasks import BlockDistill  # noqa: E402
from utils.storage.features import TeacherCache, teacher_features  # noqa: E402
from utils.training.losses import hidden_loss  # noqa: E402

SHARED = ROOT.parent / "shared"
DEFAULT_TEXT = SHARED / "data" / "wikitext2" / "valid.txt"
DEFAULT_TOKENIZER = SHARED / "models" / "minilm-mlm-wikitext2"
# Fallback lengths (no text/tokenizer at hand): a normal clipped to [5, seq_len] whose mean and truncated share
# match WikiText-2 valid sentences under the bert-base-uncased WordPiece at seq_len 40 (28.9 tokens mean, 27% cut).
FALLBACK_MEAN_FRAC, FALLBACK_STD_FRAC, FALLBACK_MIN_LEN = 31 / 40, 13 / 40, 5
CRITERION = "MSE"


# The teacher's shape: bert-base, or (--quick) a tiny BERT of the same build whose vocabulary still holds the
# fallback's token ids (1000 and up) and [CLS] / [SEP] (101 / 102).
BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
             "num_hidden_layers": 12}
TINY_BERT = {"vocab_size": 1200, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
             "num_hidden_layers": 2}


def random_bert(device: torch.device, *, tiny: bool = False) -> BertForMaskedLM:
    """A BERT teacher with random weights (``BERT_BASE``, or ``TINY_BERT`` for a quick run), built by the library's
    own builder from a ``models.BertConfig`` (what ``load_teacher`` makes of a checkpoint), in eval mode."""
    return build_model(BertConfig(**(TINY_BERT if tiny else BERT_BASE))).to(device).eval()


def load_token_ids(n: int, seq_len: int, vocab_size: int, seed: int, text: Path | None, tokenizer_dir: Path | None
                   ) -> tuple[list[list[int]], str]:
    """``n`` tokenised sentences ([CLS] ... [SEP]) and a description of where they came from (random ids when
    ``text`` or ``tokenizer_dir`` is None or absent)."""
    rng = random.Random(seed)
    if text and tokenizer_dir and text.is_file() and tokenizer_dir.is_dir():
        from transformers import AutoTokenizer

        from utils.data.batches import TokenizedSentences
        from utils.data.text import read_text_file

        sentences = read_text_file(text)
        rng.shuffle(sentences)
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        ids = TokenizedSentences(sentences[:n], tok, seq_len, mask_seed=None).ids
        if len(ids) < n:
            raise SystemExit(f"error: only {len(ids)} usable sentences in {text}, asked for {n}")
        if max(max(x) for x in ids) >= vocab_size:
            raise SystemExit(f"error: {tokenizer_dir} gives token ids up to {max(max(x) for x in ids)}; the teacher's "
                             f"vocabulary has {vocab_size}")
        return ids, f"{text} ({len(sentences)} sentences, shuffled with seed {seed}), tokenizer {tokenizer_dir}"
    ids = []
    for _ in range(n):
        L = round(rng.gauss(FALLBACK_MEAN_FRAC * seq_len, FALLBACK_STD_FRAC * seq_len))
        L = max(FALLBACK_MIN_LEN, min(seq_len, L))
        ids.append([101] + [rng.randrange(1000, vocab_size) for _ in range(L - 2)] + [102])
    return ids, f"random token ids ({text} or {tokenizer_dir} not found), WikiText-2-like lengths"


def make_epochs(ids: list[list[int]], batch_size: int, epochs: int, seed: int) -> list[list[dict[str, torch.Tensor]]]:
    """Length-bucketed, shuffled batches per epoch (the library's sampler and collator), built once for all runs."""
    sampler = BucketBatchSampler([len(x) for x in ids], batch_size, shuffle=True, seed=seed)
    collate = Collator(pad_token_id=0)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append([collate([{"index": i, "input_ids": ids[i]} for i in b]) for b in sampler])
    return out


def make_students(teacher: BertForMaskedLM, heads: int, head_dim: int) -> dict[int, BertAttention]:
    """One student block per teacher layer, initialised from the teacher (kept heads / SVD)."""
    return {i: compress_attention(layer.attention, teacher.config, num_heads=heads, head_dim=head_dim)[0]
            for i, layer in enumerate(teacher.layers)}


def freeze_layernorm(block: BertAttention) -> None:
    """As ``DistillTask`` does: a retrained block keeps the teacher's post-attention LayerNorm."""
    block.output.LayerNorm.requires_grad_(False)


class Stepper:
    """The optimiser half of ``Trainer``'s step: AdamW (decay on matrices only), per-unit clipping."""

    def __init__(self, units: list[torch.nn.Module], device: torch.device, lr: float, clip: float):
        self.units, self.clip = units, clip
        params = [p for u in units for p in u.parameters() if p.requires_grad]
        kw = {"fused": True} if device.type == "cuda" else {}
        self.opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                                      {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                     lr=lr, **kw)

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            for u in self.units:
                torch.nn.utils.clip_grad_norm_([p for p in u.parameters() if p.grad is not None], self.clip)
        self.opt.step()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_style_steps(teacher: BertForMaskedLM, students: dict[int, BertAttention], epochs: list[list[dict]],
                     device: torch.device, amp: bool, lr: float, clip: float, final: list[float]) -> Iterator[None]:
    """(a), one step per ``next``: per block, per epoch, per batch: teacher prefix up to block i, then a step of
    student i alone. Mean loss of each block's last epoch is appended to ``final``."""
    for i, student in students.items():
        freeze_layernorm(student)
        student.train()
        stepper = Stepper([student], device, lr, clip)
        for batches in epochs:
            losses = []
            for batch in batches:
                b = to_device(batch, device)
                att = b["attention_mask"]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    feats = teacher_features(teacher, b["input_ids"], att, names=[f"in_{i}", f"block_{i}"])
                    out, _ = student.contribution(feats[f"in_{i}"], extended_mask(att))
                    loss = hidden_loss(out, feats[f"block_{i}"], att.bool(), criterion=CRITERION)
                stepper.step(loss)
                losses.append(loss.item())  # the real loop reads the loss every step too
                yield
        final.append(statistics.fmean(losses))


def task_steps(task: BlockDistill, epochs: list[list[dict]], device: torch.device, amp: bool, lr: float,
               clip: float, final: list[float]) -> Iterator[None]:
    """(b)/(c), one step per ``next``: the library task, all blocks per batch, one optimiser over all units."""
    task.train()
    stepper = Stepper(list(task.students.values()), device, lr, clip)
    names = list(task.students)
    for batches in epochs:
        per_block = []
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, logs = task(to_device(batch, device))
            stepper.step(loss)
            loss.item()
            per_block.append(torch.stack([logs[f"{n}/loss"] for n in names]))
            yield
    final[:] = [float(x) for x in torch.stack(per_block).mean(0)]


def interleave(runs: dict[str, tuple[Iterator[None], int]], device: torch.device) -> dict[str, float]:
    """Advance each run one step at a time, always the one least far along (steps done / its total), and time
    every step. Load from other processes then falls on all runs alike. Returns seconds per run."""
    spent = {k: 0.0 for k in runs}
    done = {k: 0 for k in runs}
    live = dict(runs)
    while live:
        k = min(live, key=lambda n: done[n] / live[n][1])
        sync(device)
        t0 = time.perf_counter()
        try:
            next(live[k][0])
        except StopIteration:
            del live[k]
            continue
        sync(device)
        spent[k] += time.perf_counter() - t0
        done[k] += 1
    return spent


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def warm_up(teacher: BertForMaskedLM, students: dict[int, BertAttention], batch: dict, device: torch.device,
            amp: bool) -> None:
    """One untimed teacher pass and student step on throwaway copies: allocator, kernels, thread pools."""
    b = to_device(batch, device)
    probe = copy.deepcopy(students[0]).train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        feats = teacher_features(teacher, b["input_ids"], b["attention_mask"],
                                 names=[f"{k}_{i}" for i in students for k in ("in", "block")])
        out, _ = probe.contribution(feats["in_0"], extended_mask(b["attention_mask"]))
        loss = hidden_loss(out, feats["block_0"], b["attention_mask"].bool(), criterion=CRITERION)
    Stepper([probe], device, 1e-4, 1.0).step(loss)
    sync(device)


# --quick: the same three runs on a tiny teacher (TINY_BERT) and a few random sentences, in seconds; a flag given
# explicitly still wins (a tokenizer whose ids fit the tiny vocabulary, say).
QUICK = {"sentences": 8, "epochs": 2, "batch_size": 4, "heads": 2, "head_dim": 8, "text": None, "tokenizer": None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_quick(ap, QUICK, f"a tiny teacher ({TINY_BERT['num_hidden_layers']} layers x {TINY_BERT['hidden_size']}), "
                         "8 random sentences, 2 epochs (not a measurement)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--sentences", type=int, default=64, help="N: sentences retrained on (the same every epoch)")
    ap.add_argument("--epochs", type=int, default=3, help="E: epochs per block")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=40, help="max tokens incl. [CLS]/[SEP]")
    ap.add_argument("--heads", type=int, default=6, help="student heads per block")
    ap.add_argument("--head-dim", type=int, default=64, help="student per-head dimension")
    ap.add_argument("--repeats", type=int, default=1, help="full runs of (a), (b) and (c); medians reported")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast for all three methods; auto: on CUDA only, as utils.training.loop.Trainer does")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--cache-root", type=Path, default=ROOT / "bench" / "results",
                    help="a temporary cache folder is made (and removed) here")
    ap.add_argument("--json", type=Path, default=None, help="default: bench/results/retrain_throughput_<device>.json")
    args = ap.parse_args(argv)
    for flag in ("sentences", "epochs", "batch_size", "heads", "head_dim", "repeats"):
        if getattr(args, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be positive")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")
    torch.manual_seed(args.seed)
    teacher = random_bert(device, tiny=args.quick).requires_grad_(False)
    ids, source = load_token_ids(args.sentences, args.seq_len, teacher.config.vocab_size, args.seed, args.text,
                                 args.tokenizer)
    epochs = make_epochs(ids, args.batch_size, args.epochs, args.seed)
    real_tokens = sum(len(x) for x in ids)
    padded_tokens = sum(int(b["input_ids"].numel()) for b in epochs[0])
    base_students = make_students(teacher, args.heads, args.head_dim)
    n_blocks = len(base_students)
    student_params = sum(p.numel() for p in base_students[0].parameters())
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or platform.machine())
    print(f"device {device} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"bf16 autocast {'on' if amp else 'off'}")
    print(f"data: {source}")
    print(f"{args.sentences} sentences, {real_tokens} tokens ({padded_tokens} padded per epoch), batch "
          f"{args.batch_size}, {len(epochs[0])} batches/epoch, {args.epochs} epochs; {n_blocks} students of "
          f"{args.heads} heads x {args.head_dim} ({student_params / 1e6:.2f}M parameters each) vs teacher blocks "
          f"{teacher.config.num_attention_heads} x {teacher.config.head_dim}", flush=True)

    warm_up(teacher, base_students, epochs[0][0], device, amp)
    sent_epochs = args.sentences * args.epochs

    def fresh() -> dict[int, BertAttention]:
        return copy.deepcopy(base_students)

    n_steps = args.epochs * len(epochs[0])
    runs: dict[str, list[float]] = {"a": [], "b": [], "c_build": [], "c_train": []}
    loss_a, loss_b, loss_c, cache_bytes = [], [], [], 0
    args.cache_root.mkdir(parents=True, exist_ok=True)
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory(dir=args.cache_root, prefix="bench_cache_") as root:
            task_b = BlockDistill(teacher, fresh(), ["output"], criterion=CRITERION, seed=args.seed).to(device)
            task_c = BlockDistill(teacher, fresh(), ["output"], criterion=CRITERION, seed=args.seed).to(device)

            def build() -> TeacherCache:
                cache = TeacherCache(root, teacher, teacher_hash=weights_hash(teacher), token_ids=ids,
                                     tokenizer_name=str(args.tokenizer), seq_len=args.seq_len)
                return cache.ensure(task_c.feature_names(), args.batch_size * 4, device)

            print(f"run {r + 1}/{args.repeats}: building the teacher cache for (c) ...", flush=True)
            t_build, task_c.cache = timed(build, device)
            cache_bytes = sum(p.stat().st_size for p in Path(root).rglob("*.npy"))
            print(f"run {r + 1}/{args.repeats}: (a), (b), (c) interleaved step by step ({n_blocks * n_steps} + "
                  f"{n_steps} + {n_steps} steps) ...", flush=True)
            loss_a, loss_b, loss_c = [], [], []
            spent = interleave({
                "a": (seed_style_steps(teacher, fresh(), epochs, device, amp, args.lr, args.clip, loss_a),
                      n_blocks * n_steps),
                "b": (task_steps(task_b, epochs, device, amp, args.lr, args.clip, loss_b), n_steps),
                "c": (task_steps(task_c, epochs, device, amp, args.lr, args.clip, loss_c), n_steps),
            }, device)
            task_c.cache = None  # drop the memory maps before the folder goes
        runs["a"].append(spent["a"])
        runs["b"].append(spent["b"])
        runs["c_build"].append(t_build)
        runs["c_train"].append(spent["c"])
        print(f"    (a) {spent['a']:.1f}s  (b) {spent['b']:.1f}s  (c) build {t_build:.1f}s + train "
              f"{spent['c']:.1f}s", flush=True)

    t_a, t_b = statistics.median(runs["a"]), statistics.median(runs["b"])
    t_build, t_c_train = statistics.median(runs["c_build"]), statistics.median(runs["c_train"])
    t_c = t_build + t_c_train
    rows = [
        ("(a) seed-style: prefix recomputed per block", t_a, loss_a),
        ("(b) ours: one shared teacher pass per batch", t_b, loss_b),
        ("(c) ours: teacher cache, build included", t_c, loss_c),
        ("    (c) training only, cache reused", t_c_train, loss_c),
    ]
    print(f"\n{n_blocks} blocks x {args.epochs} epochs x {args.sentences} sentences on {device}, students "
          f"{args.heads}x{args.head_dim}; median of {args.repeats} run(s)\n")
    print("| method | seconds | sentences/s | vs (a) | mean final-epoch loss |")
    print("|---|---:|---:|---:|---:|")
    for name, t, losses in rows:
        print(f"| {name} | {t:.1f} | {sent_epochs / t:.2f} | {t_a / t:.2f}x | {statistics.fmean(losses):.4g} |")
    print(f"\ncache build (hash + one teacher pass + fp16 write): {t_build:.1f}s, {cache_bytes / 2**20:.1f} MiB; "
          "sentences/s counts sentence-epochs trained for all blocks")
    ratio_b, ratio_c = t_a / t_b, t_a / t_c
    met = None if args.quick else max(ratio_b, ratio_c) >= 5
    verdict = "not judged (--quick: tiny shapes)" if met is None else "met" if met else "MISSED"
    print(f"(b)/(a) = {ratio_b:.2f}x   (c)/(a) = {ratio_c:.2f}x   (c, cache reused)/(a) = {t_a / t_c_train:.2f}x   "
          f"target (b) or (c) >= 5x: {verdict}")

    result = {
        "benchmark": "retrain_throughput", "quick": args.quick, "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "bf16_autocast": amp, "data": source,
        "sentences": args.sentences, "epochs": args.epochs, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens": real_tokens, "padded_tokens_per_epoch": padded_tokens, "blocks": n_blocks,
        "student": {"heads": args.heads, "head_dim": args.head_dim, "parameters": student_params},
        "repeats": args.repeats,
        "seconds": {"a_seed_style": t_a, "b_shared": t_b, "c_cached_total": t_c, "c_build": t_build,
                    "c_train": t_c_train, "runs": runs},
        "sentences_per_s": {"a": sent_epochs / t_a, "b": sent_epochs / t_b, "c": sent_epochs / t_c,
                            "c_train": sent_epochs / t_c_train},
        "ratios": {"b_over_a": ratio_b, "c_over_a": ratio_c, "c_train_over_a": t_a / t_c_train},
        "cache_mib": cache_bytes / 2**20,
        "final_epoch_loss": {"a": loss_a, "b": loss_b, "c": loss_c},
        "target_5x_met": met,
    }
    path = args.json or ROOT / "bench" / "results" / f"retrain_throughput_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
