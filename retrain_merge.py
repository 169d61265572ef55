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
from utils.assemble import build_student, load_merged_layer
from utils.checkpoint import CheckpointError, find_checkpoints
from utils.cli import add_training_args, common_parser, positive_float, positive_int
from utils.distill import MergeDistill, MLMMasker, OneMasker, describe_losses
from utils.features import teacher_features
from utils.losses import normalize_criterion
from utils.session import (Session, claim_units, print_units, run_main, sample_printer, start, teacher_cache,
                           teacher_config)
from utils.recipes import MERGE, add_heads_alias, probability, reject, run_record, set_dropout, use_recipes
from utils.train import Trainer, Unit, make_train_config

log = logging.getLogger("simplifying_transformers")
HIDDEN_CRITERIA = ("MSE", "cosine", "L1", "aRRMSE")


def criterion_arg(s: str) -> str:
    key = s.replace("-", "").replace("_", "").lower()
    c = normalize_criterion(s) if key in ("mse", "l1", "cosine", "cos", "cosinesimilarity", "arrmse") else s
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
    g.add_argument("--block-heads", type=positive_int("--block-heads"), default=None)
    g.add_argument("--block-d-k", "--head-dim", type=positive_int("--block-d-k"), default=None)
    g.add_argument("--ffn-dim", type=positive_int("--ffn-dim"), default=None, help="default: the teacher's")
    g.add_argument("--criterion", type=criterion_arg, default="MSE",
                   help="loss on the hidden state: MSE, cosine, L1, aRRMSE")
    g.add_argument("--loss-on", choices=["hidden", "mlm"], default="hidden",
                   help="hidden state leaving N+1, or KL on the masked-LM output through the frozen rest")
    g.add_argument("--init", choices=["first", "second", "average", "random"])
    g.add_argument("--mask-inputs", action=argparse.BooleanOptionalAction,
                   help="one [MASK] per training sentence, redrawn every step (the seed's training data)")
    g.add_argument("--dropout", type=probability,
                   help="dropout of the merged layer (attention probabilities and hidden states; default: the "
                        "teacher's)")
    g.add_argument("--model-checkpoint", default=None,
                   help="start the merged layer(s) from this merged-layer checkpoint (or a run folder, searched by "
                        "metadata)")
    g.add_argument("--conditioned", action="store_true",
                   help="inputs come from the teacher whose earlier pairs are already merged (found by metadata)")
    g.add_argument("--conditioned-on", default=None,
                   help="folder with the earlier merged layers (default: this run's folder)")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="for --loss-on mlm")
    g.add_argument("--cache-teacher", action="store_true", help="compute teacher features once and reuse them")
    g.add_argument("--cache-dir", default=None, help="teacher feature cache (default: <--out>/cache)")
    g.add_argument("--max-steps-per-epoch", type=positive_int("--max-steps-per-epoch"), default=None,
                   help=argparse.SUPPRESS)
    add_heads_alias(p)
    reject(p, "the seed stored it for merged layers but never used it; the merged layer's dropout is --dropout",
           "--block-dropout")
    use_recipes(p, MERGE)
    return p


def starting_layers(path: str, pairs: list[int]) -> dict[int, tuple[Path, dict]]:
    """--model_checkpoint: the newest merged-layer checkpoint (path, metadata) for each pair under ``path``."""
    newest: dict[int, tuple[Path, dict]] = {}
    for p, m in find_checkpoints([path], ["merged_layer"], "best"):
        first = m["layers"][0]
        if first in pairs and m.get("saved_at", "") >= newest.get(first, (None, {}))[1].get("saved_at", ""):
            newest[first] = (p, m)
    missing = [i for i in pairs if i not in newest]
    if missing:
        raise CheckpointError(f"--model_checkpoint '{path}' holds no merged-layer checkpoint for pair(s) starting at "
                              f"{missing}")
    return newest


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
    hf = teacher_config(args.teacher)
    n_layers = hf.num_hidden_layers
    if args.block != "all-pairs" and int(args.block) + 1 >= n_layers:
        parser.error(f"--block {args.block}: layer {int(args.block) + 1} does not exist, so there is no pair to merge "
                     f"(the teacher has layers 0..{n_layers - 1}; N may be 0..{n_layers - 2})")
    if n_layers < 2:
        parser.error("the teacher has a single layer: nothing to merge")
    if args.mask_inputs and args.loss_on == "mlm":
        parser.error("--mask-inputs does not combine with --loss-on mlm, which masks its inputs itself")
    pairs = list(range(0, n_layers - 1, 2)) if args.block == "all-pairs" else [int(args.block)]
    start_from = starting_layers(args.model_checkpoint, pairs) if args.model_checkpoint else {}
    shapes = {(m["num_heads"], m["head_dim"], m["intermediate_size"]) for _, m in start_from.values()}
    if len(shapes) > 1:
        raise CheckpointError(f"the --model_checkpoint layers have different shapes {sorted(shapes)}; train them in "
                              "separate runs (one --block each)")
    heads, head_dim, ffn = shapes.pop() if shapes else (args.block_heads or hf.num_attention_heads,
                                                        args.block_d_k or hf.hidden_size // hf.num_attention_heads,
                                                        args.ffn_dim or hf.intermediate_size)
    for flag, want, have in (("--block_heads", args.block_heads, heads), ("--block_d_k", args.block_d_k, head_dim),
                             ("--ffn-dim", args.ffn_dim, ffn)):
        if want is not None and want != have:
            raise CheckpointError(f"{flag} {want} does not match the --model_checkpoint layer's {have}")
    tag = "mlm" if args.loss_on == "mlm" else args.criterion.lower()
    # every pair owns <run_dir>/merge_N: separate --block N jobs share run_dir, never a unit's state
    run_dir = Path(args.out) / (args.run_name or
                                f"merge_h{heads}_d{head_dim}_f{ffn}_{tag}{'_conditioned' if args.conditioned else ''}"
                                + ("_seed" if args.recipe == "seed" else ""))
    record = run_record(args, make_train_config(args), init=args.init, heads=heads, head_dim=head_dim, ffn_dim=ffn,
                        criterion=args.criterion)
    with claim_units([run_dir / f"merge_{i}" for i in pairs], "merged pair") as locks:
        return train_merges(args, run_dir, pairs, heads, head_dim, ffn, start_from, record, locks)


def train_merges(args: argparse.Namespace, run_dir: Path, pairs: list[int], heads: int, head_dim: int, ffn: int,
                 start_paths: dict[int, tuple[Path, dict]], record: dict, locks: list) -> Path:
    s = start(args)
    cfg = s.teacher.config
    train_ds, valid_ds = s.sentences("train"), s.sentences("valid")
    train_loader, sampler = s.loader(train_ds, shuffle=True)
    valid_loader, _ = s.loader(valid_ds, shuffle=False)
    probe = s.global_batch(train_ds)  # the same on every rank
    if start_paths:
        layers, notes = {}, {}
        for i, (p, _) in start_paths.items():
            _, layer, spec = load_merged_layer(p, cfg, s.teacher_hash, args.force)
            layers[i], notes[f"merge_{i}"] = (layer.to(s.device), spec), f"from {p}"
    else:
        layers, notes = make_layers(s, pairs, lambda i: LayerSpec(heads, head_dim, ffn, [i, i + 1], "merged"),
                                    args.init, probe)
    if args.dropout is not None:
        for layer, _ in layers.values():
            set_dropout(layer, args.dropout)
    masker = MLMMasker(s.tokenizer, cfg.vocab_size) if args.loss_on == "mlm" else None
    base_meta = {"kind": "merged_layer", "teacher": args.teacher, "teacher_hash": s.teacher_hash,
                 "hidden_size": cfg.hidden_size, "num_heads": heads, "head_dim": head_dim, "intermediate_size": ffn,
                 "conditioned": args.conditioned}
    cache = None
    if args.cache_teacher and args.mask_inputs:
        log.warning("--cache-teacher ignored with --mask-inputs: the inputs are re-masked every step")
    elif args.cache_teacher and args.loss_on != "mlm":
        # a conditioned pair with no earlier pair (N < 2) still takes its input from the teacher, so from the cache
        names = [f"out_{i + 1}" for i in pairs] + [f"in_{i}" for i in pairs if not args.conditioned or i < 2]
        cache = teacher_cache(s, train_ds, names)

    def train(group: list[int], group_dir: Path, inputs_from=None) -> dict[str, float]:
        task = MergeDistill(s.teacher, {i: layers[i] for i in group}, args.loss_on, args.criterion, masker, cache,
                            inputs_from, args.temperature, args.seed,
                            OneMasker(s.tokenizer) if args.mask_inputs else None).to(s.device)
        units = [Unit(f"merge_{i}", layers[i][0], run_dir / f"merge_{i}",
                      {**base_meta, **describe_losses(task), "layers": [i, i + 1], "init": notes[f"merge_{i}"]})
                 for i in group]
        view = lambda: compose(inputs_from or s.teacher, merges={i: layers[i] for i in group})  # noqa: E731
        trainer = Trainer(task, units, make_train_config(args), group_dir, s.device,
                          evaluate=lambda: task.evaluate(valid_loader),
                          samples=sample_printer(s, view, valid_loader) if args.print_samples else None,
                          run_meta={"run_dir": str(run_dir)}, setup=s.training_setup(train_ds), record=record,
                          locks=locks)
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
