"""Fine-tune a compressed model (merged layers and/or retrained blocks) end to end by distillation.

    python finetune_merged.py                                   # merged layers found under checkpoints/
    python finetune_merged.py --merged checkpoints/merge_h12_d64_f3072_mse --export-hf checkpoints/finetuned_hf
    python finetune_merged.py --drop-every-second               # baseline: keep layers 0, 2, 4, ... only
"""
from __future__ import annotations

from utils.stops import install_stop_handlers

if __name__ == "__main__":  # first, before the imports below: a stop while they load is one line, 143 / 130
    install_stop_handlers()

import argparse
import logging
import sys
from pathlib import Path

from models.compress import drop_every_second
from utils import runtime
from utils.assemble import build_student, load_model
from utils.cli import (UsageError, add_training_args, common_parser, criterion_arg, non_negative_float, positive_float,
                       positive_int)
from utils.distill import ModelDistill, lm_targets, describe_losses
from utils.evaluate import compare_models, evaluate_student
from utils.export import add_export_args, check_export_targets, run_exports
from utils.recipes import FINETUNE, alias, probability, reject, run_record, set_dropout, use_recipes
from utils.session import claim_units, run_main, sample_printer, start
from utils.train import Trainer, Unit, make_train_config

log = logging.getLogger("simplifying_transformers")
REPORTED = ("student_top1", "agreement_top1", "kl_teacher_student", "hidden_cosine")


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints")
    add_training_args(p, epochs=3, lr=1e-4)
    g = p.add_argument_group("student")
    g.add_argument("--merged", nargs="+", default=["checkpoints"],
                   help="folders of merged-layer / block / model checkpoints, found by metadata (searched recursively)")
    g.add_argument("--which", choices=["best", "last"], default="best")
    g.add_argument("--dropout", type=probability,
                   help="dropout of the student (attention probabilities and hidden states; default: the teacher's)")
    g.add_argument("--drop-every-second", action="store_true",
                   help="baseline student: the teacher with layers 1, 3, 5, ... removed (no checkpoints needed)")
    g = p.add_argument_group("objective")
    g.add_argument("--kl-weight", type=non_negative_float("--kl-weight"), default=1.0,
                   help="KL(teacher || student) at masked positions")
    g.add_argument("--mlm-weight", type=non_negative_float("--mlm-weight"), default=0.0,
                   help="hard-label masked-LM cross-entropy")
    g.add_argument("--hidden-weight", type=non_negative_float("--hidden-weight"), default=0.0,
                   help="hidden-state loss at matched layers")
    hidden = criterion_arg("--hidden-criterion", "hidden", exclude=("CrossEntropy",))
    g.add_argument("--hidden-criterion", type=hidden, default="cosine",
                   help=f"hidden-state loss: {', '.join(hidden.allowed)}")
    g.add_argument("--temperature", type=positive_float, default=2.0)
    g.add_argument("--relation-weight", type=float, default=0.0,
                   help="MiniLMv2 query/key/value self-attention relation KL at matched layers (any head counts)")
    g.add_argument("--relation-heads", type=positive_int("--relation-heads"), default=None,
                   help="relation heads (must divide teacher and student heads x head_dim; default: automatic)")
    g = p.add_argument_group("output")
    add_export_args(g)
    g.add_argument("--eval-batches", type=positive_int("--eval-batches"), default=None,
                   help="limit the per-epoch validation comparison to N batches")
    g.add_argument("--max-steps-per-epoch", type=positive_int("--max-steps-per-epoch"), default=None,
                   help=argparse.SUPPRESS)
    alias(p, "--merged", "--model-checkpoint")
    reject(p, "no single block is trained here; the student's dropout is --dropout", "--block-dropout")
    use_recipes(p, FINETUNE)
    return p


def main(args: argparse.Namespace) -> Path:
    if args.kl_weight == args.mlm_weight == args.hidden_weight == 0:
        raise UsageError("--kl-weight, --mlm-weight and --hidden-weight are all 0: nothing to train on")
    check_export_targets(args)  # an export that cannot be written fails now, not after training
    run_dir = Path(args.out) / (args.run_name or ("finetune_dropped" if args.drop_every_second else "finetune_merged"))
    with claim_units([run_dir / "model"], "fine-tuned model") as locks:
        return finetune(args, run_dir, locks)


def finetune(args: argparse.Namespace, run_dir: Path, locks: list) -> Path:
    s = start(args)
    if args.drop_every_second:
        student, sources = drop_every_second(s.teacher)
    else:
        student, sources = build_student(s.teacher, args.merged, s.teacher_hash, args.force, args.which)
    student = student.to(s.device)
    if args.dropout is not None:
        set_dropout(student, args.dropout)
    for line in sources:
        log.info("student: %s", line)
    log.info("student plan:\n%s", student.config.describe())
    train_ds, valid_ds = s.sentences("train"), s.sentences("valid")
    train_loader, sampler = s.loader(train_ds, shuffle=True)
    valid_loader, _ = s.loader(valid_ds, shuffle=False)
    masker = lm_targets(s.tokenizer, s.teacher)
    task = ModelDistill(s.teacher, student, masker, args.kl_weight, args.mlm_weight, args.hidden_weight,
                        args.hidden_criterion, args.temperature, args.seed, args.relation_weight,
                        args.relation_heads).to(s.device)
    meta = {"kind": "model", "config": student.config.to_dict(), "teacher": args.teacher,
            "teacher_hash": s.teacher_hash, "sources": sources, **describe_losses(task)}
    unit = Unit("model", student, run_dir / "model", meta)

    def evaluate() -> dict[str, float]:
        m = task.evaluate(valid_loader)
        cmp = compare_models(s.teacher, student, valid_loader, s.tokenizer, s.device, keep_rows=False,
                             max_batches=args.eval_batches).metrics
        m.update({f"model/{k}": float(cmp[k]) for k in REPORTED if k in cmp})
        return m

    trainer = Trainer(task, [unit], make_train_config(args), run_dir, s.device, evaluate,
                      sample_printer(s, lambda: student, valid_loader) if args.print_samples else None,
                      {"run_dir": str(run_dir)}, setup=s.training_setup(train_ds),
                      record={"sources": sources, **run_record(args, make_train_config(args))}, locks=locks)
    trainer.fit(train_loader, sampler)
    runtime.barrier()  # rank 0 wrote the best checkpoint
    best, _ = load_model(run_dir / "model" / "best")
    evaluate_student(s, best, run_dir / "eval", {"model": str(run_dir / "model" / "best"), "sources": sources})
    if runtime.is_main_process():
        run_exports(best.cpu(), s.tokenizer, args)
    return run_dir


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
