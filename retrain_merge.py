"""Replace two consecutive teacher layers (N, N+1) by one trained layer.

    python retrain_merge.py --block 6 --block_heads 12 --block_d_k 64
    python retrain_merge.py --block all-pairs --conditioned --teacher DIR --data-dir DIR
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models import LayerSpec
from models.compress import compose, head_importance, init_merged_layer
from models.bert import extended_mask
from utils.assemble import build_student
from utils.cli import add_training_args, common_parser, positive_float, positive_int
from utils.distill import MergeDistill, MLMMasker, describe_losses
from utils.features import teacher_features
from utils.losses import normalize_criterion
from utils.session import (Session, print_units, run_main, sample_printer, start, teacher_cache, teacher_layer_count,
                           write_run_file)
from utils.train import Trainer, Unit, make_train_config

log = logging.getLogger("simplifying_transformers")
HIDDEN_CRITERIA = ("MSE", "cosine", "L1")


def criterion_arg(s: str) -> str:
    c = normalize_criterion(s) if s.replace("-", "").lower() in ("mse", "l1", "cosine", "cos") else s
    if c not in HIDDEN_CRITERIA:
        raise argparse.ArgumentTypeError(f"--criterion for a merged layer must be one of {', '.join(HIDDEN_CRITERIA)}")
    return c


def pair_arg(s: str) -> str:
    if s in ("all-pairs", "all") or s.isdigit():
        return "all-pairs" if s == "all" else s
    raise argparse.ArgumentTypeError(f"--block must be a layer index N (merging N and N+1) or 'all-pairs', got '{s}'")


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints")
    add_training_args(p, epochs=5, lr=5e-4)
    g = p.add_argument_group("merge")
    g.add_argument("--block", type=pair_arg, required=True,
                   help="first teacher layer N of the pair (N, N+1), or 'all-pairs' for (0,1), (2,3), ...")
    g.add_argument("--block-heads", "--heads", type=positive_int("--block-heads"), default=None)
    g.add_argument("--block-d-k", "--head-dim", type=positive_int("--block-d-k"), default=None)
    g.add_argument("--ffn-dim", type=positive_int("--ffn-dim"), default=None, help="default: the teacher's")
    g.add_argument("--criterion", type=criterion_arg, default="MSE", help="loss on the hidden state: MSE, cosine, L1")
    g.add_argument("--loss-on", choices=["hidden", "mlm"], default="hidden",
                   help="hidden state leaving N+1, or KL on the masked-LM output through the frozen rest")
    g.add_argument("--init", choices=["first", "second", "average", "random"], default="first")
    g.add_argument("--conditioned", action="store_true",
                   help="inputs come from the teacher whose earlier pairs are already merged (found by metadata)")
    g.add_argument("--conditioned-on", default=None,
                   help="folder with the earlier merged layers (default: this run's folder)")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="for --loss-on mlm")
    g.add_argument("--cache-teacher", action="store_true", help="compute teacher features once and reuse them")
    g.add_argument("--cache-dir", default=None, help="teacher feature cache (default: <--out>/cache)")
    g.add_argument("--max-steps-per-epoch", type=positive_int("--max-steps-per-epoch"), default=None,
                   help=argparse.SUPPRESS)
    return p


def make_layers(s: Session, pairs: list[int], spec_of, init: str, probe) -> tuple[dict, dict[str, str]]:
    layers, notes = {}, {}
    cfg = s.teacher.config
    # heads are ranked on the input of the source layer; one teacher pass gives it for every pair
    offset = {"first": 0, "second": 1}.get(init)
    rank_heads = offset is not None and any(spec_of(i).num_heads < cfg.num_attention_heads for i in pairs)
    ids, att = probe["input_ids"].to(s.device), probe["attention_mask"].to(s.device)
    feats = teacher_features(s.teacher, ids, att, [f"in_{i + offset}" for i in pairs]) if rank_heads else {}
    for i in pairs:
        spec = spec_of(i)
        first, second = s.teacher.layers[i], s.teacher.layers[i + 1]
        importance = None
        if rank_heads and spec.num_heads < cfg.num_attention_heads:
            src = (first, second)[offset]
            x = feats[f"in_{i + offset}"]
            importance = head_importance(src.attention, [(x, extended_mask(att), att.bool())])
        layer, note = init_merged_layer(cfg, spec, first, second, init, importance)
        layers[i] = (layer, spec)
        notes[f"merge_{i}"] = note
        log.info("pair (%d, %d) -> one layer, %d heads x %d, ffn %d; init %s", i, i + 1, spec.num_heads,
                 spec.head_dim, spec.intermediate_size, note)
    return layers, notes


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    n_layers = teacher_layer_count(args.teacher)
    if args.block != "all-pairs" and int(args.block) + 1 >= n_layers:
        parser.error(f"--block {args.block}: layer {int(args.block) + 1} does not exist, so there is no pair to merge "
                     f"(the teacher has layers 0..{n_layers - 1}; N may be 0..{n_layers - 2})")
    if n_layers < 2:
        parser.error("the teacher has a single layer: nothing to merge")
    s = start(args)
    cfg = s.teacher.config
    heads = args.block_heads or cfg.num_attention_heads
    head_dim = args.block_d_k or cfg.head_dim
    ffn = args.ffn_dim or cfg.intermediate_size
    pairs = list(range(0, n_layers - 1, 2)) if args.block == "all-pairs" else [int(args.block)]
    tag = "mlm" if args.loss_on == "mlm" else args.criterion.lower()
    run_dir = Path(args.out) / (args.run_name or
                                f"merge_h{heads}_d{head_dim}_f{ffn}_{tag}{'_conditioned' if args.conditioned else ''}")
    write_run_file(run_dir, args)
    train_ds, valid_ds = s.sentences("train"), s.sentences("valid")
    train_loader, sampler = s.loader(train_ds, shuffle=True)
    valid_loader, _ = s.loader(valid_ds, shuffle=False)
    probe = s.global_batch(train_ds)  # the same on every rank
    layers, notes = make_layers(s, pairs, lambda i: LayerSpec(heads, head_dim, ffn, [i, i + 1], "merged"),
                                args.init, probe)
    masker = MLMMasker(s.tokenizer, cfg.vocab_size) if args.loss_on == "mlm" else None
    base_meta = {"kind": "merged_layer", "teacher": args.teacher, "teacher_hash": s.teacher_hash,
                 "hidden_size": cfg.hidden_size, "num_heads": heads, "head_dim": head_dim, "intermediate_size": ffn,
                 "conditioned": args.conditioned}
    cache = None
    if args.cache_teacher and args.loss_on != "mlm":
        # a conditioned pair with no earlier pair (N < 2) still takes its input from the teacher, so from the cache
        names = [f"out_{i + 1}" for i in pairs] + [f"in_{i}" for i in pairs if not args.conditioned or i < 2]
        cache = teacher_cache(s, train_ds, names)

    def train(group: list[int], group_dir: Path, inputs_from=None) -> dict[str, float]:
        task = MergeDistill(s.teacher, {i: layers[i] for i in group}, args.loss_on, args.criterion, masker, cache,
                            inputs_from, args.temperature, args.seed).to(s.device)
        units = [Unit(f"merge_{i}", layers[i][0], run_dir / f"merge_{i}",
                      {**base_meta, **describe_losses(task), "layers": [i, i + 1], "init": notes[f"merge_{i}"]})
                 for i in group]
        view = lambda: compose(inputs_from or s.teacher, merges={i: layers[i] for i in group})  # noqa: E731
        trainer = Trainer(task, units, make_train_config(args), group_dir, s.device,
                          evaluate=lambda: task.evaluate(valid_loader),
                          samples=sample_printer(s, view, valid_loader) if args.print_samples else None,
                          run_meta={"run_dir": str(run_dir)})
        final = trainer.fit(train_loader, sampler)
        print_units(units, notes, final)
        return final

    if not args.conditioned:
        train(pairs, run_dir)
        return run_dir
    # conditioned: pair by pair, each fed by the model whose earlier pairs are merged already
    source = Path(args.conditioned_on) if args.conditioned_on else run_dir
    for i in pairs:
        earlier = list(range(i % 2, i, 2))
        if earlier:
            inputs_from, used = build_student(
                s.teacher, [source], s.teacher_hash, args.force,
                keep=lambda m: m["kind"] == "merged_layer" and m["layers"][0] in earlier)
            got = sorted(l for l, spec in enumerate(inputs_from.config.layers) if spec.kind == "merged")
            if len(got) != len(earlier):
                raise FileNotFoundError(f"conditioned training of pair ({i}, {i + 1}) needs merged layers for pairs "
                                        f"starting at {earlier} in '{source}'; found {len(got)}: {used}")
            log.info("pair (%d, %d) conditioned on: %s", i, i + 1, "; ".join(used))
        else:
            inputs_from = s.teacher
        train([i], run_dir / f"merge_{i}", inputs_from if earlier else None)
    return run_dir


if __name__ == "__main__":
    parser = build_parser()
    sys.exit(run_main(lambda a: main(a, parser), parser))
