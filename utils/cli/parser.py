"""The one argparse parser every script shares: underscore spellings of every flag, the common, training and
evaluation flags (the scripts' own groups are in ``utils.cli.groups``)."""
from __future__ import annotations

import argparse
import sys

from .groups import add_eval_text_arg
from .recipes import EVAL, add_common_seed_flags, add_eval_seed_flags, add_training_seed_flags, use_recipes
from .types import (device_map_arg, fraction, int_at_least, judge_arg, non_negative_float, non_negative_int,
                    positive_float, positive_int, ratios, run_name, seed, train_text, warmup_fraction)


class Parser(argparse.ArgumentParser):
    """ArgumentParser that also accepts ``--foo_bar`` for every ``--foo-bar`` flag (the seed's spellings).

    Underscores in a flag's name are turned into dashes before parsing, so help shows one spelling per flag.
    """

    recipes: dict | None = None  # set by utils.cli.recipes.use_recipes: --recipe NAME fills the settings not given

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = [self._dash(a) for a in (sys.argv[1:] if args is None else list(args))]
        if self.recipes and namespace is None:
            from .recipes import parse_with_recipe

            return parse_with_recipe(self, super().parse_known_args, args)
        return super().parse_known_args(args, namespace)

    def _dash(self, arg: str) -> str:
        if not arg.startswith("--") or "_" not in arg:
            return arg
        name, eq, value = arg.partition("=")
        dashed = "--" + name[2:].replace("_", "-")
        return dashed + eq + value if dashed in self._option_string_actions else arg


def common_parser(description: str, default_out: str) -> Parser:
    """Flags every script has: teacher, data, sequence length, batch size, device, seed, output, workers."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("common")
    g.add_argument("--teacher", default="bert-base-uncased",
                   help="Hugging Face hub id or local folder (config.json + weights) of the teacher: a BERT masked "
                        "LM or a Llama / Qwen2 decoder (SmolLM2 is a Llama)")
    g.add_argument("--dataset", default="wikitext2", choices=["wikitext2"], help="corpus from the Hugging Face Hub")
    g.add_argument("--data-dir", default=None,
                   help="local text instead: train.txt/valid.txt/test.txt (one sentence per line) or one .txt split "
                        "by --split-ratio")
    g.add_argument("--split-ratio", type=ratios, default=(0.8, 0.1, 0.1),
                   help="train,valid,test of a single file (or, read by documents, of a folder's documents)")
    g.add_argument("--split-by", choices=["sentences", "documents"], default=None,
                   help="how the text is read and cut into splits: sentences (short ones dropped; a single file's "
                        "shuffled into splits) or documents (whole articles / files in order, every line kept; a "
                        "single file's or folder's documents assigned whole to splits in order) (default: documents "
                        "for a decoder, sentences for a masked LM, whose teacher was trained on its sentence split)")
    g.add_argument("--seq-len", type=int_at_least("--seq-len", 3), default=40,
                   help="max tokens per sentence or window ([CLS]/[SEP] included for BERT)")
    g.add_argument("--batch-size", type=positive_int("--batch-size"), default=32)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--teacher-device-map", type=device_map_arg, default=None, metavar="MAP",
                   help="spread the teacher over several devices (accelerate): auto, balanced or sequential (whole "
                        "layers placed by free memory), or FILE.json mapping module names (model.layers.3) to devices; "
                        "the teacher is read on the CPU first. For the cache job (--cache-only) of a teacher too large "
                        "for one device")
    g.add_argument("--seed", type=seed, default=0)
    g.add_argument("--out", default=default_out, help="output folder")
    g.add_argument("--num-workers", type=non_negative_int("--num-workers"), default=0, help="DataLoader workers")
    g.add_argument("--verbose", action="store_true")
    add_common_seed_flags(p)
    return p


def add_training_args(p: Parser, epochs: int, lr: float, *, keep_start: bool = False, ffn_refit: bool = False
                      ) -> None:
    """Flags of the shared training loop (retrain_single_block, retrain_merge, finetune_merged, the map's units).
    ``keep_start``: --keep-start on by default (--no-keep-start turns it off); ``ffn_refit``: the script builds
    single-layer units that may keep fewer feed-forward neurons (--ffn-refit-tokens)."""
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int("--epochs"), default=epochs)
    g.add_argument("--lr", type=positive_float, default=lr)
    g.add_argument("--weight-decay", type=non_negative_float("--weight-decay"), default=0.01)
    g.add_argument("--warmup", type=warmup_fraction, default=0.06, help="fraction of steps of linear warm-up")
    g.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    g.add_argument("--clip", type=non_negative_float("--clip"), default=1.0,
                   help="gradient-norm clipping per trained module (0: off)")
    g.add_argument("--percentage-data", type=fraction, default=1.0, help="fraction of each split to use")
    g.add_argument("--train-text", type=train_text, action="append", default=None, metavar="NAME=PATH[:WEIGHT]",
                   help="a decoder's training mixture (repeatable): its training and validation windows drawn from "
                        "these texts (a file or folder, read as documents and cut into train and valid by document) "
                        "and the data split's own text (--data-weight), in proportion to WEIGHT (default 1) counted "
                        "in tokens, as many tokens as the data split alone would give")
    g.add_argument("--data-weight", type=non_negative_float("--data-weight"), default=1.0,
                   help="with --train-text: the weight of the data split's own training text (0: the named texts only)")
    g.add_argument("--save-checkpoint-every", type=non_negative_int("--save-checkpoint-every"), default=0,
                   help="also keep an epoch_K snapshot every K epochs (last and best are always kept)")
    g.add_argument("--resume", action="store_true",
                   help="continue each unit from its resume point in --out (end of an epoch, --save-every-steps, or "
                        "the save made when the job was stopped); nothing there: start from scratch")
    g.add_argument("--save-every-steps", type=non_negative_int("--save-every-steps"), default=0,
                   help="also write a mid-epoch resume point every K optimizer steps (0: at epoch ends only); "
                        "SIGTERM / SIGUSR1 / SIGINT always save one before stopping")
    g.add_argument("--keep-start", action=argparse.BooleanOptionalAction if keep_start else "store_true",
                   default=keep_start,
                   help="validate before the first step and keep the starting weights as best unless an epoch beats "
                        "them (a run that only makes validation worse, e.g. at too high an lr, returns its start and "
                        "warns)" + (", per unit; on by default: units start from the teacher's weights, and the lr "
                                    "that trains one teacher's units wrecks another's" if keep_start else ""))
    if ffn_refit:
        g.add_argument("--ffn-refit-tokens", type=non_negative_int("--ffn-refit-tokens"), default=16384,
                       help="a unit that keeps fewer of its layer's feed-forward neurons starts with its output "
                            "projection refit by least squares (ridge towards the copied weights) on this many of the "
                            "first training tokens (rounded up to whole windows); 0: the kept neurons' weights as "
                            "copied")
    g.add_argument("--force-config", action="store_true",
                   help="--resume although the training setup (criterion, lr, seed, data...) differs; logged")
    g.add_argument("--force", action="store_true", help="accept checkpoints made against a different teacher")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained modules")
    g.add_argument("--print-samples", action="store_true",
                   help="after each epoch, print predictions for a few validation sentences")
    g.add_argument("--run-name", type=run_name, default=None,
                   help="sub-folder of --out (default: derived from the settings)")
    add_training_seed_flags(p)



def add_cache_only_arg(group: argparse._ActionsContainer, features: str) -> None:
    """--cache-only: build the teacher features the given units read (``features``, named for the help) and exit."""
    group.add_argument("--cache-only", action="store_true",
                       help=f"build the teacher features these units read from the cache ({features}) in --cache-dir "
                            "and exit, training nothing: one job (the teacher over several devices with "
                            "--teacher-device-map) builds them, then each per-unit job reads only its own files; use "
                            "the same data flags (--data-dir, --seq-len, --percentage-data) as those jobs")


def add_eval_args(p: Parser) -> None:
    """Flags of the evaluation scripts (eval_merged_12, eval_merge_layer): split, judge, amount of data."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--percentage-data", type=fraction, default=1.0, help="fraction of the test split to use")
    g.add_argument("--split", choices=["test", "valid"], default="test")
    g.add_argument("--judge", type=judge_arg,
                   help="a larger masked-LM (hub id or folder) judging the predictions; 'none': no judge")
    g.add_argument("--force", action="store_true", help="accept checkpoints made against a different teacher")
    g.add_argument("--max-batches", type=positive_int("--max-batches"), default=None, help="stop after N batches")
    add_eval_text_arg(g)


def add_eval_recipe(p: Parser, script: str) -> None:
    """The seed's flags and --recipe (seed: the judge and 50%% of the test split) for an evaluation script."""
    add_eval_seed_flags(p, script)
    use_recipes(p, EVAL)
