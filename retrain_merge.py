"""Replace two consecutive teacher layers (N, N+1) by one trained layer.

    python retrain_merge.py --block 6 --block_heads 12 --block_d_k 64
    python retrain_merge.py --block all-pairs --conditioned --teacher DIR --data-dir DIR
"""
from __future__ import annotations

from utils.stops import install_stop_handlers

if __name__ == "__main__":  # first, before the imports below: a stop while they load is one line, 143 / 130
    install_stop_handlers()

import argparse
import logging
import sys
from pathlib import Path

from models import LayerSpec, ModelConfig
from models.hf import config_from_hf
from models.compress import compose
from utils.assemble import load_merged_layer
from utils.checkpoint import CheckpointError, find_checkpoints
from utils.cli import add_training_args, common_parser, criterion_arg, positive_float, positive_int
from utils.distill import MergeDistill, lm_targets, OneMasker, describe_losses
from utils.session import (claim_units, print_units, run_main, sample_printer, start, teacher_cache,
                           teacher_config)
from utils.recipes import MERGE, add_heads_alias, probability, reject, run_record, set_dropout, use_recipes
from utils.train import Trainer, Unit, make_train_config
from utils.units import (add_shape_args, conditioned_teacher, init_merges, shape_from_args, spec_from_meta,
                         starting_shape, unit_meta, unit_spec)

log = logging.getLogger("simplifying_transformers")
# a merged layer's output is a hidden state: a softmax over its features (CrossEntropy) means nothing there
MERGE_CRITERION = criterion_arg("--criterion", "hidden", exclude=("CrossEntropy",), what="a merged layer")


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
    add_shape_args(g, ffn=True)
    g.add_argument("--criterion", type=MERGE_CRITERION, default="MSE",
                   help=f"loss on the hidden state: {', '.join(MERGE_CRITERION.allowed)}")
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
    tcfg = config_from_hf(hf, has_lm_head=False)
    if start_from:
        started = [spec_from_meta(m, tcfg) for _, m in start_from.values()]
        shape = starting_shape(args, started, "layer")
        ffns = {s.intermediate_size for s in started}
        if len(ffns) > 1:
            raise CheckpointError(f"the --model_checkpoint layers have different feed-forward sizes {sorted(ffns)}; "
                                  "train them in separate runs (one --block each)")
        ffn = ffns.pop()
        if args.ffn_dim is not None and args.ffn_dim != ffn:
            raise CheckpointError(f"--ffn-dim {args.ffn_dim} does not match the --model_checkpoint layer's {ffn}")
    else:
        shape, ffn = shape_from_args(args), args.ffn_dim
    specs = {i: unit_spec(tcfg, [i, i + 1], "merged", ffn, **shape) for i in pairs}
    spec = specs[pairs[0]]
    heads, head_dim, ffn = spec.num_heads, spec.head_dim, spec.intermediate_size
    tag = "mlm" if args.loss_on == "mlm" else args.criterion.lower()
    # every pair owns <run_dir>/merge_N: separate --block N jobs share run_dir, never a unit's state
    run_dir = Path(args.out) / (args.run_name or
                                f"merge_{spec.shape_tag()}_f{ffn}_{tag}{'_conditioned' if args.conditioned else ''}"
                                + ("_seed" if args.recipe == "seed" else ""))
    record = run_record(args, make_train_config(args), init=args.init, heads=heads, head_dim=head_dim, ffn_dim=ffn,
                        criterion=args.criterion)
    with claim_units([run_dir / f"merge_{i}" for i in pairs], "merged pair") as locks:
        return train_merges(args, run_dir, specs, start_from, record, locks)


def train_merges(args: argparse.Namespace, run_dir: Path, specs: dict[int, LayerSpec],
                 start_paths: dict[int, tuple[Path, dict]], record: dict, locks: list) -> Path:
    s = start(args)
    cfg = s.teacher.config
    pairs = list(specs)
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
        made, why = init_merges(s.teacher, specs, args.init, probe)
        layers, notes = {i: (l.to(s.device), spec) for i, (l, spec) in made.items()}, {}
        for i, (_, spec) in layers.items():
            notes[f"merge_{i}"] = why[i]
            log.info("pair (%d, %d) -> one layer, %d heads x %d%s, ffn %d; init %s", i, i + 1, spec.num_heads,
                     spec.head_dim, spec.attention_note(), spec.intermediate_size, why[i])
    if args.dropout is not None:
        for layer, _ in layers.values():
            set_dropout(layer, args.dropout)
    masker = lm_targets(s.tokenizer, s.teacher) if args.loss_on == "mlm" else None
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
                      unit_meta("merged_layer", layers[i][1], cfg, args.teacher, s.teacher_hash,
                                conditioned=args.conditioned, **describe_losses(task), init=notes[f"merge_{i}"]))
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
        inputs_from, used = conditioned_teacher(s.teacher, source, i, s.teacher_hash, args.force)
        if inputs_from is not None:
            log.info("pair (%d, %d) conditioned on: %s", i, i + 1, "; ".join(used))
        train([i], run_dir / f"merge_{i}", inputs_from)
    return run_dir


if __name__ == "__main__":
    parser = build_parser()
    sys.exit(run_main(lambda a: main(a, parser), parser))
