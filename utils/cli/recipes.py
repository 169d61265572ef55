"""Named recipes (``--recipe seed|default``) and the seed project's flag spellings.

A recipe is a table of argparse defaults. ``default`` is this project's own setup; ``seed`` is the original project's
experimental setup where it is well defined (random init, loss on raw attention scores, one [MASK] per training
sentence, Adam with L2 weight decay and a constant learning rate, its learning rates, batch size and epochs, the judge
and half the test split in evaluation). Flags given on the command line always win over the recipe.

How it works: ``Parser`` (utils/cli/parser.py) parses into a namespace whose every field starts as an "unset" marker,
so the fields still unset afterwards are exactly those the user did not give; those take the chosen recipe's value, or
the parser's own default where the recipe says nothing. ``args.recipe`` names the recipe, ``args.explicit`` lists the
settings given on the command line.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from .types import non_negative_int, positive_int, probability

RECIPES = ("default", "seed")

# setting -> (value under --recipe seed, value under --recipe default)
COMMON = {"batch_size": (64, 32)}
TRAINING = {
    "optimizer": ("adam", "adamw"),     # seed: torch.optim.Adam, weight decay as L2 on every trained parameter
    "adam_beta1": (0.9, 0.9),
    "adam_beta2": (0.999, 0.999),
    "weight_decay": (0.01, 0.01),
    "warmup_steps": (0, None),          # None: --warmup (a fraction of all steps) applies
    "schedule": ("constant", "linear"),
    "clip": (0.0, 1.0),
}
BLOCK = {**TRAINING, "epochs": (15, 5), "lr": (1e-3, 5e-4), "init": ("random", "teacher"),
         "loss_on": ("scores", "output"), "score_target": ("logits", "probs"), "criterion": ("CrossEntropy", "MSE"),
         "mask_inputs": (True, False), "block_dropout": (0.1, None)}
MERGE = {**TRAINING, "epochs": (15, 5), "lr": (1e-6, 5e-4), "init": ("random", "first"),
         "mask_inputs": (True, False), "dropout": (0.1, None)}
FINETUNE = {**TRAINING, "epochs": (50, 3), "lr": (1e-4, 1e-4), "dropout": (0.1, None)}
EVAL = {"judge": ("bert-large-uncased", None), "percentage_data": (0.5, 1.0)}

_UNSET = object()


def use_recipes(p: argparse.ArgumentParser, *tables: dict[str, tuple[Any, Any]]) -> None:
    """Attach the recipe tables to ``p`` (a ``utils.cli.Parser``) and add ``--recipe``.

    The parser's own defaults become the ``default`` recipe's values, so ``--help`` shows them; the ``--recipe``
    help lists what ``seed`` changes.
    """
    merged: dict[str, tuple[Any, Any]] = {}
    for t in (COMMON, *tables):
        merged.update(t)
    dests = {a.dest for a in p._actions}
    merged = {k: v for k, v in merged.items() if k in dests}
    p.recipes = {"seed": {k: v[0] for k, v in merged.items()}, "default": {k: v[1] for k, v in merged.items()}}
    p.set_defaults(**p.recipes["default"])
    changed = ", ".join(f"{k}={v[0]}" for k, v in merged.items() if v[0] != v[1])
    p.add_argument("--recipe", choices=RECIPES, default="default",
                   help=f"named set of defaults; flags given explicitly override it. seed = the original project's "
                        f"setup: {changed}")


def parse_with_recipe(p: argparse.ArgumentParser, parse: Callable, args: list[str]) -> tuple[argparse.Namespace,
                                                                                             list[str]]:
    """Parse ``args`` with ``parse`` (the plain argparse parse_known_args), then fill unset settings from the recipe."""
    actions = {}
    for a in p._actions:
        if a.dest != argparse.SUPPRESS and a.default is not argparse.SUPPRESS:
            actions.setdefault(a.dest, a)
    # a repeatable flag (action append) adds to what is there: it starts from None, which it never appends
    unset = {d: None if isinstance(a, argparse._AppendAction) else _UNSET for d, a in actions.items()}
    ns, extras = parse(args, argparse.Namespace(**unset))
    explicit = sorted(d for d in actions if getattr(ns, d) is not unset[d])
    name = ns.recipe if ns.recipe is not _UNSET else "default"
    table = p.recipes[name]
    for d, action in actions.items():
        if getattr(ns, d) is not unset[d]:
            continue
        value = table[d] if d in table else p._defaults.get(d, action.default)
        if isinstance(value, str) and action.type is not None and d not in table:
            value = p._get_value(action, value)
        setattr(ns, d, value)
    ns.recipe, ns.explicit = name, explicit
    return ns, extras


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether ``dest`` was set on the command line (not by a recipe or a default)."""
    return dest in getattr(args, "explicit", ())


# ---- seed flag spellings ----
def alias(p: argparse.ArgumentParser, target: str, *names: str) -> None:
    """Accept ``names`` as further spellings of the existing option ``target`` (same setting, same checks)."""
    a = p._option_string_actions[target]
    g = _seed_group(p)
    kw: dict[str, Any] = {"dest": a.dest, "default": argparse.SUPPRESS, "help": f"the seed's spelling of {target}"}
    if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        kw["action"] = "store_true" if isinstance(a, argparse._StoreTrueAction) else "store_false"
    else:
        kw.update(type=a.type, choices=a.choices, nargs=a.nargs, metavar=a.metavar or a.dest.upper())
    g.add_argument(*names, **kw)


class _Reject(argparse.Action):
    def __init__(self, option_strings, dest, reason: str = "", **kw):
        kw.setdefault("nargs", "?")
        super().__init__(option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, **kw)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.reason}")


def reject(p: argparse.ArgumentParser, reason: str, *names: str, takes_value: bool = True) -> None:
    """Seed flags that mean nothing in this script: refused with ``reason`` instead of "unrecognized arguments"."""
    for n in names:
        _seed_group(p).add_argument(n, action=_Reject, reason=reason, nargs="?" if takes_value else 0,
                                    help=argparse.SUPPRESS)


class _WarnStudentHeads(argparse.Action):
    """``--heads``: kept as a spelling of --block_heads, with a warning (the seed's --heads set the teacher's)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} {values} sets the heads of the NEW (student) block here; in the seed, --heads "
              f"was the teacher's head count. Use --block_heads to say so without this warning.", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_heads_alias(p: argparse.ArgumentParser) -> None:
    a = p._option_string_actions["--block-heads"]
    _seed_group(p).add_argument("--heads", dest=a.dest, type=a.type, default=argparse.SUPPRESS,
                                action=_WarnStudentHeads, help="deprecated spelling of --block_heads (warns)")


def _seed_group(p: argparse.ArgumentParser):
    for g in p._action_groups:
        if g.title == "seed spellings":
            return g
    return p.add_argument_group("seed spellings", "the original project's flags, with their meaning there")


def add_common_seed_flags(p: argparse.ArgumentParser) -> None:
    """-b, -o / --storage_directory, -w: every script."""
    alias(p, "--batch-size", "-b")
    alias(p, "--out", "-o", "--storage-directory")
    alias(p, "--num-workers", "-w")


def add_training_seed_flags(p: argparse.ArgumentParser) -> None:
    """Optimiser, warm-up, logging and checkpoint-loading flags of the seed's training configs."""
    g = p.add_argument_group("optimiser (seed flags)")
    g.add_argument("--optimizer", choices=["adamw", "adam"], default="adamw",
                   help="adamw: decoupled weight decay on matrices only; adam: the seed's torch.optim.Adam, weight "
                        "decay as an L2 term on every trained parameter")
    g.add_argument("--adam-beta1", type=probability, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=probability, default=0.999, help="Adam beta2")
    g.add_argument("--warmup-steps", type=non_negative_int("--warmup-steps"), default=None,
                   help="linear warm-up over this many optimizer steps (overrides --warmup); 0: none")
    g.add_argument("--log-freq", type=positive_int("--log-freq"), default=10,
                   help="print the loss, and write training scalars to tensorboard, every N steps (tensorboard every "
                        "10 steps when not given)")
    alias(p, "--weight-decay", "--adam-weight-decay")
    alias(p, "--resume", "--block-load-checkpoint")
    _seed_group(p).add_argument("--block-no-checkpoint", dest="resume", action="store_false",
                                default=argparse.SUPPRESS, help="start fresh (the seed's opposite of "
                                                                "--block_load_checkpoint)")
    _seed_group(p).add_argument("--print-no-samples", dest="print_samples", action="store_false",
                                default=argparse.SUPPRESS, help="do not print sample predictions (the default)")


def add_eval_seed_flags(p: argparse.ArgumentParser, script: str) -> None:
    """Evaluation trains nothing: the seed's training flags are refused with that reason."""
    why = f"{script} trains nothing; this is a training setting"
    reject(p, why, "--adam-weight-decay", "--adam-beta1", "--adam-beta2", "--warmup-steps", "--block-dropout",
           "--dropout", "--log-freq")
    reject(p, f"{script} trains nothing, so there is no checkpoint to continue from; give the checkpoint to "
              "evaluate with --model_checkpoint", "--block-load-checkpoint", "--block-no-checkpoint", takes_value=False)
    _seed_group(p).add_argument("--print-no-samples", dest="print_samples", action="store_false", default=False,
                                help="accepted for the seed's command lines: evaluation prints no samples to stdout, "
                                     "it writes predictions.tsv")
