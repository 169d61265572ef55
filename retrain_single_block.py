"""Retrain smaller attention blocks (fewer heads, smaller head_dim) to mimic the teacher's, block by block.

    python retrain_single_block.py --block 6 --criterion MSE
    python retrain_single_block.py --block 6 --criterion CrossEntropy --loss_on_logits
    python retrain_single_block.py --block 6 --criterion CrossEntropy --loss_on_scores
    python retrain_single_block.py --block all --block_heads 4 --teacher DIR --data-dir DIR --cache-teacher
    python retrain_single_block.py --block 6 --criterion MSE --recipe seed      # the seed project's setup
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
from utils.assemble import load_block
from utils.checkpoint import CheckpointError, find_checkpoints
from utils.cli import add_training_args, common_parser, criterion_arg, positive_float, positive_int
from utils.distill import BlockDistill, lm_targets, OneMasker, describe_losses
from utils.losses import criteria_for
from utils.recipes import BLOCK, add_heads_alias, given, probability, reject, run_record, set_dropout, use_recipes
from utils.session import (Session, claim_units, print_units, run_main, sample_printer, start, teacher_cache,
                           teacher_config)
from utils.train import Trainer, Unit, make_train_config
from utils.units import (add_shape_args, init_blocks, shape_from_args, spec_from_meta, starting_shape, unit_meta,
                         unit_spec)

log = logging.getLogger("simplifying_transformers")


def block_arg(s: str) -> str:
    if s == "all" or s.isdigit():
        return s
    raise argparse.ArgumentTypeError(f"--block must be a layer index (0, 1, ...) or 'all', got '{s}'")


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints")
    add_training_args(p, epochs=5, lr=5e-4)
    g = p.add_argument_group("block")
    g.add_argument("--block", type=block_arg, required=True, help="teacher layer index (0-based) or 'all'")
    add_shape_args(g)
    g.add_argument("--criterion", type=criterion_arg("--criterion", "hidden", "probs", "logits"), default="MSE",
                   help=f"loss on the block output: {', '.join(criteria_for('hidden'))}; with --loss_on_scores: "
                        f"{', '.join(criteria_for('probs'))} (raw scores: {', '.join(criteria_for('logits'))})")
    g.add_argument("--loss-on", choices=["output", "scores", "output+scores", "mlm", "relations", "output+relations"],
                   help="what is compared: block output, attention scores (see --score-target), both, the masked-LM "
                        "output through the frozen rest of the teacher (KL), or relations: MiniLMv2 query-query, "
                        "key-key, value-value self-attention relations (KL, any student head count)")
    g.add_argument("--relation-heads", type=positive_int("--relation-heads"), default=None,
                   help="relation heads the q/k/v vectors are split into (must divide teacher and student heads x "
                        "head_dim; default: the largest such divisor up to the teacher's head count)")
    g.add_argument("--relation-weight", type=positive_float, default=1.0,
                   help="weight of the relation loss (with --loss-on ...relations)")
    g.add_argument("--loss-on-logits", action="store_true", help="the seed's flag: loss on the block output")
    g.add_argument("--loss-on-scores", action="store_true", help="the seed's flag: loss on attention scores")
    g.add_argument("--score-target", choices=["probs", "logits"],
                   help="scores loss on the attention distributions (softmax over keys), or on the raw scaled "
                        "pre-softmax scores QK^T/sqrt(d_k) as in the seed (MSE / L1; padding excluded)")
    g.add_argument("--mask-inputs", action=argparse.BooleanOptionalAction,
                   help="one [MASK] per training sentence, redrawn every step (the seed's training data)")
    g.add_argument("--block-dropout", type=probability,
                   help="dropout of the new block's attention probabilities (default: the teacher's)")
    g.add_argument("--model-checkpoint", default=None,
                   help="start the new block(s) from this block checkpoint (or a run folder, searched by metadata)")
    g.add_argument("--score-criterion", type=criterion_arg("--score-criterion", "probs", "logits"), default=None,
                   help="criterion for attention distributions when both losses are on (default CrossEntropy)")
    g.add_argument("--init", choices=["teacher", "random"],
                   help="start from the teacher's block (important heads, SVD for smaller head_dim) or random; a block "
                        "of the teacher's own shape starts random unless --init teacher is given explicitly")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="for --loss-on mlm")
    g.add_argument("--cache-teacher", action="store_true",
                   help="compute the teacher's features once, store them (fp16, memory-mapped) and reuse them")
    g.add_argument("--cache-dir", default=None,
                   help="teacher feature cache (default: <--out>/cache); safe to share between runs, also running "
                        "at the same time")
    g.add_argument("--max-steps-per-epoch", type=positive_int("--max-steps-per-epoch"), default=None,
                   help=argparse.SUPPRESS)
    add_heads_alias(p)
    reject(p, "the seed's --dropout was the teacher BERT's dropout, which is always off here (the teacher runs in "
              "eval mode); the new block's is --block_dropout", "--dropout")
    use_recipes(p, BLOCK)
    return p


def loss_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[str], str, str]:
    if given(args, "loss_on") or not (args.loss_on_logits or args.loss_on_scores):
        loss_on = args.loss_on.split("+")  # --loss-on, or the recipe's (seed: scores, default: output)
    else:
        loss_on = (["output"] if args.loss_on_logits else []) + (["scores"] if args.loss_on_scores else [])
    score_criterion = args.score_criterion or ("CrossEntropy" if "output" in loss_on or args.criterion == "cosine"
                                               else args.criterion)
    if loss_on == ["scores"] and args.criterion not in criteria_for("probs"):
        parser.error(f"--criterion {args.criterion} does not apply to attention distributions; "
                     f"choose one of {', '.join(criteria_for('probs'))}")
    if "output" in loss_on and args.criterion not in criteria_for("hidden"):
        parser.error(f"--criterion {args.criterion} does not apply to block outputs; choose one of "
                     f"{', '.join(criteria_for('hidden'))}")
    return loss_on, args.criterion, score_criterion


def starting_blocks(path: str, layers: list[int]) -> dict[int, tuple[Path, dict]]:
    """--model_checkpoint: the newest block checkpoint (path, metadata) for each of ``layers`` under ``path``."""
    newest: dict[int, tuple[Path, dict]] = {}
    for p, m in find_checkpoints([path], ["block"], "best"):
        if m["layer"] in layers and m.get("saved_at", "") >= newest.get(m["layer"], (None, {}))[1].get("saved_at", ""):
            newest[m["layer"]] = (p, m)
    missing = [i for i in layers if i not in newest]
    if missing:
        raise CheckpointError(f"--model_checkpoint '{path}' holds no block checkpoint for layer(s) {missing}")
    return newest


def block_specs(args: argparse.Namespace, cfg: ModelConfig, layers: list[int],
                start_from: dict[int, tuple[Path, dict]]) -> dict[int, LayerSpec]:
    """The spec of each new block: the flags, else the starting checkpoint's, else the teacher's."""
    shape = (starting_shape(args, [spec_from_meta(m, cfg) for _, m in start_from.values()], "block") if start_from
             else shape_from_args(args))
    return {i: unit_spec(cfg, [i], "block", **shape) for i in layers}


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    hf = teacher_config(args.teacher)
    n_layers = hf.num_hidden_layers
    if args.block != "all" and int(args.block) >= n_layers:
        parser.error(f"--block {args.block} is out of range: the teacher has layers 0..{n_layers - 1} (or 'all')")
    loss_on, criterion, score_criterion = loss_plan(args, parser)
    if args.mask_inputs and loss_on == ["mlm"]:
        parser.error("--mask-inputs does not combine with --loss-on mlm, which masks its inputs itself")
    layers = list(range(n_layers)) if args.block == "all" else [int(args.block)]
    start_from = starting_blocks(args.model_checkpoint, layers) if args.model_checkpoint else {}
    tcfg = config_from_hf(hf, has_lm_head=False)
    specs = block_specs(args, tcfg, layers, start_from)
    spec = specs[layers[0]]
    heads, head_dim = spec.num_heads, spec.head_dim
    init = args.init
    if init == "teacher" and not start_from and spec.attention_shape() == tcfg.layers[layers[0]].attention_shape():
        if given(args, "init"):
            parser.error(f"--init teacher with the teacher's own shape ({heads} heads x {head_dim}) makes an exact "
                         "copy of the teacher's block: nothing to train. Give a smaller --block_heads / --block_d_k "
                         "(e.g. --block_heads 4), or --init random")
        log.info("the new block has the teacher's shape (%d heads x %d): starting it random, as an exact copy of the "
                 "teacher's block would train nothing (a smaller --block_heads / --block_d_k starts from the "
                 "teacher's most important heads)", heads, head_dim)
        init = "random"
    tag = "+".join(loss_on) + ("" if loss_on in (["mlm"], ["relations"]) else f"_{criterion.lower()}")
    if "scores" in loss_on and args.score_target == "logits" and score_criterion in ("MSE", "L1"):
        tag += "_logits"
    # every block owns <run_dir>/block_N: separate --block N jobs share run_dir, never a unit's state
    run_dir = Path(args.out) / (args.run_name or f"blocks_{spec.shape_tag()}_{tag}"
                                + ("_seed" if args.recipe == "seed" else ""))
    record = run_record(args, make_train_config(args), init=init, loss_on=loss_on, criterion=criterion,
                        score_criterion=score_criterion, heads=heads, head_dim=head_dim,
                        **{k: v for k, v in spec.attention_shape().items() if k not in ("num_heads", "head_dim")
                           and v != "mha"})
    with claim_units([run_dir / f"block_{i}" for i in layers], "block") as locks:
        return train_blocks(args, run_dir, specs, loss_on, criterion, score_criterion, init, start_from, record,
                            locks)


def train_blocks(args: argparse.Namespace, run_dir: Path, specs: dict[int, LayerSpec], loss_on: list[str],
                 criterion: str, score_criterion: str, init: str, start_paths: dict[int, tuple[Path, dict]],
                 record: dict, locks: list) -> Path:
    s: Session = start(args)
    cfg = s.teacher.config
    start_from = {i: load_block(p, cfg, s.teacher_hash, args.force)[1] for i, (p, _) in start_paths.items()}

    train_ds, valid_ds = s.sentences("train"), s.sentences("valid")
    train_loader, sampler = s.loader(train_ds, shuffle=True)
    valid_loader, _ = s.loader(valid_ds, shuffle=False)

    # students, initialised from the teacher where shapes allow; heads are ranked on one batch (the same on every
    # rank) with a single teacher pass for all layers
    layers = list(specs)
    probe = s.global_batch(train_ds)  # drawn in every case: its loader draws from the global RNG
    if start_from:
        blocks = {i: b.to(s.device) for i, b in start_from.items()}
        notes = {i: f"from {args.model_checkpoint}" for i in layers}
    else:
        blocks, notes = init_blocks(s.teacher, specs, init, probe)
    for i in layers:
        if args.block_dropout is not None:
            set_dropout(blocks[i], args.block_dropout, hidden=False)
        teacher_attn = s.teacher.layers[i].block
        log.info("block %d: %d heads x %d -> %d heads x %d%s; init %s", i, teacher_attn.num_heads,
                 teacher_attn.head_dim, specs[i].num_heads, specs[i].head_dim, specs[i].attention_note(), notes[i])

    cache = None
    if args.cache_teacher:
        if loss_on == ["mlm"] or args.mask_inputs:
            log.warning("--cache-teacher ignored with %s: the inputs are re-masked every step",
                        "--mask-inputs" if args.mask_inputs else "--loss-on mlm")
        else:
            cache = teacher_cache(s, train_ds, [f"{k}_{i}" for i in layers for k in ("in", "block")])
    masker = lm_targets(s.tokenizer, s.teacher) if loss_on == ["mlm"] else None
    task = BlockDistill(s.teacher, blocks, loss_on, criterion, score_criterion, masker, cache, args.temperature,
                        args.seed, args.score_target, OneMasker(s.tokenizer) if args.mask_inputs else None,
                        args.relation_heads, args.relation_weight).to(s.device)
    units = [Unit(f"block_{i}", blocks[i], run_dir / f"block_{i}",
                  unit_meta("block", specs[i], cfg, args.teacher, s.teacher_hash, **describe_losses(task),
                            init=notes[i]))
             for i in layers]

    trainer = Trainer(task, units, make_train_config(args), run_dir, s.device,
                      evaluate=lambda: task.evaluate(valid_loader),
                      samples=sample_printer(s, lambda: compose(s.teacher, blocks=blocks), valid_loader)
                      if args.print_samples else None,
                      run_meta={"run_dir": str(run_dir)}, setup=s.training_setup(train_ds), record=record,
                      locks=locks)
    final = trainer.fit(train_loader, sampler)
    print_units(units, {u.name: notes[int(u.name.split("_")[1])] for u in units}, final)
    return run_dir


if __name__ == "__main__":
    parser = build_parser()
    sys.exit(run_main(lambda a: main(a, parser), parser))
