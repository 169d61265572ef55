"""Planned students against uniform ones and layer-removal baselines at equal measured speed (issues 15 and 22).

For every target (--targets: speed-ups of the map's --speed latency; for a decoder also --kv-targets: fractions of
the teacher's KV cache per token) these students are built from one sensitivity map:

  planned     the planner's per-layer plan (utils.planning.planner.choose_plan, cost = --cost), re-timed before
              training: its units composed into the teacher and timed against it, planned again while it falls
              short (utils.planning.students.retimed_plan), so it meets the target as measured;
  uniform     the same option in every layer (a merge in every pair): the one of least summed map cost that meets
              the target as measured;
  ShortGPT    (decoders) the n layers of lowest Block Influence dropped, n the fewest that meet the target as
              measured (utils.planning.baselines);
  SLEB        (decoders) layers dropped one at a time, each time the one whose removal raises calibration perplexity
              least, n the fewest that meet the target as measured;
  untrained   every method's student again without any training: units as initialised from the teacher, no KD
              fine-tune (for a masked LM as before: kept top heads and dropped layers).

"Meets a speed-up as measured" is one rule for every method: two timings of its untrained units in the teacher
(round-robin), both at least --speed-margin above the target (3%: about the spread of one timing on a loaded CPU),
on --latency-threads CPU threads when given (the students may heal on more threads than the speed-ups are stated for).
Calibration windows (ShortGPT, SLEB) are the first --calibration-sentences of the training split, never the test
split. Trained students are built as plan_student.py builds its one (units retrained from the teacher cache,
composed, fine-tuned end to end by KD with --ft-epochs / --ft-lr: the same healing for every method); a plan reached
by several targets or methods is built once. Every model is evaluated on the same test sentences or windows, timed
round-robin with the teacher on this device (prefill; decoders also decode), and at each target the planned student
is compared with every other method by paired tests: McNemar's exact test (masked LM: top-1 right and agreement per
sentence; decoder: agreement per token) and, for a decoder, the paired t-test and sign test of per-token NLL.
Each --eval-text NAME=PATH (repeatable) is scored the same way, every model on its own items (a decoder: its
documents in order as token windows), with the same paired tests per target: "texts" in plans.json, a section per
text in plans.md. With --chat-prompts (a decoder teacher), every model answers the chat prompts greedily through the
teacher's chat template and is compared with the teacher's replies, generated once (utils.evaluation.chat; each
model's replies in <its folder>/chat), and at each target the planned student with every other method: McNemar's
exact test on the prompts whose first 8 reply tokens equal the teacher's, and the tests above on the teacher's reply
tokens, teacher-forced (agreement, NLL): "chat" in plans.json, a chat table per target in plans.md.
--runtime llama.cpp|vllm keeps only the map's units that runtime runs (utils.planning.runtimes), for every method.
With --runtime llama.cpp every speed is llama.cpp's as well (utils.evaluation.llama_cpp.LlamaCppTimer: --gguf-type
GGUF files, --latency-threads threads, default one): the planned student's re-timing, every method's "meets as
measured" (so a rival has at least the planned student's llama.cpp speed target), and each student's final prefill and
decode speed-ups against the teacher's file, round-robin ("llama_cpp" per row, its columns in plans.md, the plot's x);
the PyTorch timings are kept beside them. --methods leaves methods out (budget). Outputs in --out/--run-name:
plans.json, plans.md, pareto.png, and methods.json (every target's methods and plans: a stopped bench run again with
the same settings reads them back, so it heals the students it had begun).

    python bench/plans.py --map bench/results/sensitivity_minilm --teacher ../shared/models/minilm-mlm-wikitext2 \\
        --data-dir bench/results/wikitext2_split --device cpu --max-train-sentences 2000 --eval-sentences 300
    python bench/plans.py --map runs/smolmap/sensitivity --teacher bench/results/smollm2-135m-instruct \\
        --data-dir bench/results/wikitext2_split --seq-len 256 --batch-size 4 --targets 1.3,1.5,2 --kv-targets 1/3
    python bench/plans.py --map runs/smolmap/sensitivity ... --targets 1.5,2 --kv-targets none \\
        --runtime llama.cpp --gguf-type q8_0 --latency-threads 1 --methods planned,ShortGPT,SLEB
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quick import add_quick  # noqa: E402
from models import SwappableModel  # noqa: E402
from models.staging import read_kept, write_kept, write_staged  # noqa: E402
from utils import session  # noqa: E402
from utils.cli.configs import chat_config, map_config, plan_finetune, record, session_config, train_config  # noqa: E402
from utils.cli.groups import (add_chat_args, add_eval_text_items_arg, add_finetune_args,  # noqa: E402
                              add_gguf_type_arg, add_map_args, add_retime_args, add_sharding_args)
from utils.cli.parser import add_training_args, common_parser  # noqa: E402
from utils.cli.run import run_main  # noqa: E402
from utils.cli.types import number, positive_int  # noqa: E402
from utils.data.text import DataError  # noqa: E402
from utils.evaluation.chat import (FIRST, PREFIX_TOKENS, ChatConfig, compare_chat, paired_chat,  # noqa: E402
                                   read_prompts, teacher_chat)
from utils.evaluation.llama_cpp import LlamaCppTimer, check_llama_cpp, llama_timer  # noqa: E402
from utils.evaluation.metrics import compare_models, token_scores  # noqa: E402
from utils.evaluation.stats import mcnemar, paired_t, sign_test  # noqa: E402
from utils.evaluation.speed import LoadLog, Timing, load_text  # noqa: E402
from utils.evaluation.texts import read_texts, text_dataset  # noqa: E402
from utils.planning import baselines  # noqa: E402
from utils.planning.planner import COSTS, SPEED_KEYS, PlanError, Target, meets_as_measured  # noqa: E402
from utils.planning.runtimes import check_runtime_teacher, runtime_map  # noqa: E402
from utils.planning.sensitivity import Option, option_from_dict, speed_fn  # noqa: E402
from utils.planning.students import (context, make_student, read_map, retimed_plan, student_dir,  # noqa: E402
                                     time_plan)
from utils.training.students import load_model  # noqa: E402
from utils.errors import SettingError  # noqa: E402
from utils.storage.checkpoint import CheckpointError  # noqa: E402
from utils.storage.lock import claim_units  # noqa: E402
from utils.training.loop import run_record  # noqa: E402
from utils.training.tasks import kd_temperature  # noqa: E402

log = logging.getLogger("simplifying_transformers")
METHODS = ("planned", "uniform", "ShortGPT", "SLEB")
GROUP = 4  # students in memory at once, each read once: scored on one teacher pass per text, chatted, timed together
METRICS = ("student_top1", "student_top5", "agreement_top1", "kl_teacher_student", "hidden_cosine",
           "student_perplexity", "teacher_perplexity")


def numbers(name: str, lo: float, hi: float) -> Callable[[str], list[float]]:
    def parse(s: str) -> list[float]:
        if s.strip().lower() == "none":
            return []
        try:
            v = [number(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated numbers (or ratios such as 1/3), got "
                                             f"'{s}'") from None
        if any(not lo < x < hi for x in v):
            raise argparse.ArgumentTypeError(f"{name} must lie in ({lo:g}, {hi:g}), got '{s}'")
        return v
    return parse


# --quick: every method built, healed and scored as in a real run, on a budget of seconds for a tiny teacher
QUICK = {"seq_len": 16, "batch_size": 8, "epochs": 1, "max_steps_per_epoch": 3, "max_train_sentences": 48,
         "eval_sentences": 16, "valid_batches": 1, "latency_reps": 3, "latency_batch": 1, "ft_epochs": 1,
         "ft_max_steps": 1, "test_sentences": 24, "calibration_sentences": 16}


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="bench/results")
    add_training_args(p, epochs=1, lr=1e-3, keep_start=True, ffn_refit=True)
    add_sharding_args(p)  # the heal's; the map's units train unsharded
    g = p.add_argument_group("plans")
    g.add_argument("--map", required=True, help="sensitivity.json or its folder (sensitivity_map.py)")
    g.add_argument("--targets", type=numbers("--targets", 1, math.inf), default=None,
                   help="speed-ups to plan for (default: 1.3,1.5,2,3 for a masked LM, 1.3,1.5,2 for a decoder; none: "
                        "no speed target)")
    g.add_argument("--speed", choices=["prefill", "decode"], default="prefill", help="what --targets times")
    g.add_argument("--kv-targets", type=numbers("--kv-targets", 0, 1), default=None,
                   help="decoders: KV-cache fractions to plan for (default 1/3; none: no KV-cache target)")
    g.add_argument("--cost", choices=list(COSTS), default="kl", help="what a unit costs, from the map")
    g.add_argument("--calibration-sentences", type=positive_int("--calibration-sentences"), default=32,
                   help="ShortGPT / SLEB calibration: the first N sentences of the training split")
    g.add_argument("--no-untrained", action="store_true", help="skip the untrained version of every student")
    g.add_argument("--methods", type=method_list, default=list(METHODS),
                   help="the methods to build, comma-separated (ShortGPT and SLEB: decoders only) "
                        "(default: all)")
    add_eval_text_items_arg(g)
    add_retime_args(g)  # --retime-rounds 0: the map's plans as they are, planned and uniform
    add_finetune_args(p)
    add_map_args(p)
    add_gguf_type_arg(p, default="q8_0", what="with --runtime llama.cpp: the GGUF files every llama.cpp timing uses")
    add_chat_args(p)
    add_quick(p, QUICK, "one epoch of 3 steps, a 1-step heal, 24 test sentences (a tiny --teacher and its --map)")
    return p


def method_list(s: str) -> list[str]:
    got = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in got if m not in METHODS]
    if bad or not got:
        raise argparse.ArgumentTypeError(f"--methods takes {', '.join(METHODS)}, comma-separated; got '{s}'")
    if "planned" not in got:
        raise argparse.ArgumentTypeError("--methods must include planned: every other method is tested against it")
    return got


# ---- plans ----
def uniform(opt: Option, n: int) -> dict[int, Option]:
    """``opt`` in every layer (a merge in every pair (0,1), (2,3), ...; an odd last layer is kept)."""
    step = len(opt.covers(0))
    return {i: opt for i in range(0, n, step) if opt.applies(i, n)}


def unmapped(smap: dict[str, Any], choices: dict[int, Option]) -> list[tuple[int, str]]:
    """The plan's units the map has no entry for (layer, option name)."""
    cells = {(e["layer"], e["option"]) for e in smap["entries"]}
    return [(i, o.name) for i, o in choices.items() if (i, o.name) not in cells]


def predicted(smap: dict[str, Any], choices: dict[int, Option], key: str) -> float:
    """The map's summed ``key`` (a saving, a cost) over the plan's units."""
    cells = {(e["layer"], e["option"]): e for e in smap["entries"]}
    missing = unmapped(smap, choices)
    if missing:
        raise CheckpointError(f"the map has no entries for {missing}; map every layer (no --layers) for this bench")
    return sum(float(cells[i, o.name][key]) for i, o in choices.items())


def _need(smap: dict[str, Any], target: Target) -> tuple[str, float]:
    """(the map's saving key, how much the target needs saved)."""
    if target.kv_cache is not None:
        total = smap["teacher_kv_bytes_per_token"]
        return "kv_bytes_saved", total * (1 - target.kv_cache)
    total_key, gain_key, _ = SPEED_KEYS[target.speed]
    return gain_key, smap["timing"][total_key] * (1 - 1 / target.speedup)


class Bench:
    """One bench run: the session, the map, the context that trains units, how every model is timed, the measuring
    helpers."""

    def __init__(self, args: argparse.Namespace, s, smap: dict[str, Any], ctx, timing: Timing,
                 llama: LlamaCppTimer | None = None):
        self.args, self.s, self.smap, self.ctx, self.timing, self.llama = args, s, smap, ctx, timing, llama
        self.teacher = s.teacher
        self.causal = s.teacher.TASK == "causal"
        self.options = [option_from_dict(o) for o in smap["options"]]
        self.n = smap["layers"]
        self.orders: dict[str, list[int]] = {}
        self.why: dict[str, list[str]] = {}
        self.load = LoadLog()  # the machine's load during every timing of this run

    def measured_speedup(self, choices: dict[int, Option], speed: str) -> float:
        """The speed-up of the plan's units (untrained: the same speed) in the teacher, timed round-robin (with
        --runtime llama.cpp, in llama.cpp)."""
        return time_plan(self.teacher, choices, speed=speed, timing=self.timing, llama=self.llama,
                         load=self.load)["measured_speedup"]

    def meets(self, target: Target, trace: list[str] | None = None) -> Callable[[dict[int, Option]], bool]:
        """Whether a plan meets ``target``: its KV-cache fraction, or (a speed-up) the planned student's rule
        (planner.aim) for every method; each speed verdict, with its timings, appended to ``trace`` when given."""
        if target.kv_cache is not None:
            return lambda c: baselines.kv_fraction(self.teacher, c) <= target.kv_cache + 1e-9
        bar = target.speedup * (1 + self.args.speed_margin)

        def check(c: dict[int, Option]) -> bool:
            got: list[float] = []

            def measure() -> float:
                got.append(self.measured_speedup(c, target.speed))
                return got[-1]
            ok = meets_as_measured(measure, bar)
            if trace is not None:  # (a layer-removal plan: one dropped layer per entry)
                trace.append(f"{len(c)} dropped: measured {', '.join(f'{x:.3f}x' for x in got)} against "
                             f"{bar:.3f}x: {'meets' if ok else 'short'}")
            return ok
        return check

    def removal_orders(self) -> None:
        """ShortGPT's order of the layers, on the calibration windows; SLEB's is grown step by step as targets
        need it (``_extend_sleb``)."""
        if self.orders or not self.causal:
            return
        try:
            calib = self.s.first_sentences("train", self.args.calibration_sentences)
        except DataError as e:  # a training mixture shares these sentences' tokens among its sources
            raise DataError(f"--calibration-sentences {self.args.calibration_sentences}: {e}; use more") from None
        self.calibration, _ = self.s.loader(calib, shuffle=False)
        order, bi = baselines.shortgpt_order(self.teacher, self.calibration, device=self.s.device)
        self.orders["ShortGPT"] = order
        self.why["ShortGPT"] = [f"Block Influence (1 - cos(in, out)) on {len(calib)} calibration windows: "
                                + ", ".join(f"{i}: {bi[i]:.4f}" for i in order)]
        self.orders["SLEB"], self.sleb_trace = [], []

    def _extend_sleb(self) -> bool:
        new, trace = baselines.sleb_order(self.teacher, self.calibration, device=self.s.device, steps=1,
                                          start=self.orders["SLEB"])
        self.orders["SLEB"] += new
        self.sleb_trace += trace
        return bool(new)

    def _first_guess(self, target: Target) -> int:
        """Where to start looking for the fewest drops: a layer under the proportional guess."""
        if target.kv_cache is not None:
            return max(1, math.floor(self.n * (1 - target.kv_cache)) - 1)
        return max(1, math.floor(self.n * (1 - 1 / target.speedup)) - 1)

    def candidates(self, target: Target) -> list[dict[str, Any]]:
        """The methods at one target: planned, best uniform by the map, the layer-removal baselines (decoders), and
        (a masked LM) the untrained kept-heads and dropped-layers baselines."""
        wanted = self.args.methods
        out = self._planned(target) + (self._uniform(target) if "uniform" in wanted else [])
        if self.causal:
            if {"ShortGPT", "SLEB"} & set(wanted):
                self.removal_orders()
            where = "in llama.cpp" if self.llama is not None else "in PyTorch"
            for method, order in self.orders.items():
                if method not in wanted:
                    continue
                timed: list[str] = []
                n = baselines.fewest_drops(order, self.meets(target, timed), start=self._first_guess(target),
                                           limit=self.n - 1, extend=self._extend_sleb if method == "SLEB" else None)
                if n is None:
                    log.warning("%s: %s cannot meet it", target.name, method)
                    continue
                why = self.why.get(method) or ["greedy removal, calibration perplexity after each step: " + ", ".join(
                    f"-{i}: {p:.3f}" for i, p in zip(self.orders['SLEB'], self.sleb_trace))]
                out.append({"method": method, "trained": True, "choices": baselines.drop_choices(order, n),
                            "why": why + [f"drop the first {n}: {sorted(order[:n])}"] + (
                                [f"the fewest drops that meet {target.label} as measured ({where}):"] + timed
                                if timed else [])})
        elif target.speedup is not None:
            out += self._bert_untrained(target)
        if not self.args.no_untrained:
            out += [{**m, "method": f"{m['method']}, untrained", "trained": False} for m in list(out)
                    if m["trained"]]
        return out

    def _planned(self, target: Target) -> list[dict[str, Any]]:
        try:
            plan, _ = retimed_plan(self.teacher, self.smap, target, cost=self.args.cost, timing=self.timing,
                                   rounds=self.args.retime_rounds, margin=self.args.speed_margin,
                                   runtime=self.args.runtime, llama=self.llama)
        except PlanError as e:
            log.warning("%s: no planned plan (%s)", target.name, e)
            return []
        byname = {o.name: o for o in self.options}
        return [{"method": "planned", "trained": True, "choices": {i: byname[c] for i, c in plan.choices.items()},
                 "why": plan.lines}]

    def _uniform(self, target: Target) -> list[dict[str, Any]]:
        """The uniform plan of least map cost that meets the target as measured (a speed-up: timed like the planned
        one, cheapest first, among those the map says save at least half the need; with no re-timing, by the map)."""
        key, need = _need(self.smap, target)
        plans = [(o, uniform(o, self.n)) for o in self.options]
        plans = sorted(((o, c) for o, c in plans if c and predicted(self.smap, c, key) >= need / 2),
                       key=lambda oc: predicted(self.smap, oc[1], COSTS[self.args.cost]))
        if target.kv_cache is None and self.args.retime_rounds == 0:  # the map's plans as they are
            plans = [(o, c) for o, c in plans if predicted(self.smap, c, key) >= need][:1]
            return [{"method": "uniform", "trained": True, "choices": c,
                     "why": [f"the uniform plan of least map cost that meets {target.name} by the map: {o.name}"]}
                    for o, c in plans]
        meets, short = self.meets(target), []
        for o, c in plans:
            if meets(c):
                why = f"the uniform plan of least map cost that meets {target.name} as measured: {o.name}"
                return [{"method": "uniform", "trained": True, "choices": c,
                         "why": [why + (f" (cheaper, but short as measured: {', '.join(short)})" if short else "")]}]
            short.append(o.name)
        log.warning("%s: no uniform plan meets it as measured (tried %s)", target.name, ", ".join(short) or "none")
        return []

    def _bert_untrained(self, target: Target) -> list[dict[str, Any]]:
        key, need = _need(self.smap, target)
        feasible = [(o, uniform(o, self.n)) for o in self.options]
        feasible = [(o, c) for o, c in feasible if c and predicted(self.smap, c, key) >= need]
        full_dim = max(o.head_dim for o in self.options)  # the teacher's: only the head_dim options halve it
        out = []
        heads = [(o, c) for o, c in feasible if o.kind == "block" and o.head_dim == full_dim]
        if heads:
            out.append({"method": "untrained: kept top heads", "trained": False,
                        "choices": max(heads, key=lambda oc: oc[0].num_heads)[1], "why": []})
        drops = [c for o, c in feasible if o.name == "merge next"]
        if drops:
            out.append({"method": "untrained: dropped layers", "trained": False, "choices": drops[0], "why": []})
        return out


def selection_key(b: Bench, targets: list[Target]) -> str:
    """What every method's choice at every target depends on: the teacher, the map (as --runtime keeps it), the
    training split (the calibration windows come from it), the targets and the settings that time and choose."""
    a = b.args
    fields = {"teacher": b.s.teacher_hash, "data": b.ctx.setup.get("data_hash"), "device": str(b.s.device),
              "map": hashlib.sha256(json.dumps(b.smap, sort_keys=True, default=str).encode()).hexdigest(),
              "targets": [(t.name, t.speed, t.speedup, t.kv_cache) for t in targets],
              **{k: getattr(a, k, None) for k in ("methods", "cost", "calibration_sentences", "retime_rounds",
                                                  "speed_margin", "runtime", "gguf_type", "latency_reps",
                                                  "latency_batch", "latency_threads", "no_untrained", "seq_len")}}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def chosen_methods(b: Bench, targets: list[Target], out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every target's methods and their plans (``Bench.candidates``), kept in <out>/methods.json. A stopped bench
    run again with the same settings (``selection_key``) reads them back instead of timing and calibrating anew: it
    goes on healing the students it had begun (timing noise could otherwise choose another plan, whose folder starts
    from scratch) and skips the re-timing and SLEB's search (minutes a layer on a 0.5B teacher). Other settings
    choose anew; so does removing the file."""
    path, key = out / "methods.json", selection_key(b, targets)
    kept = read_kept(path, key)
    if kept is not None:
        log.info("methods and plans of every target read from %s (chosen %s; remove it to choose anew)", path,
                 kept.get("chosen"))
        return {name: [{**m, "choices": {int(i): option_from_dict(o) for i, o in m["choices"].items()}}
                       for m in methods] for name, methods in kept["targets"].items()}
    if path.is_file():
        log.info("%s was chosen with other settings: choosing anew", path)
    per_target = {t.name: b.candidates(t) for t in targets}
    saved = {name: [{**m, "choices": {str(i): asdict(o) for i, o in m["choices"].items()}} for m in methods]
             for name, methods in per_target.items()}
    write_kept(path, key, {"chosen": time.strftime("%Y-%m-%dT%H:%M:%S"), "targets": saved}, indent=2)
    return per_target


def plan_key(choices: dict[int, Option], trained: bool) -> str:
    body = ", ".join(f"{i}{'+' + str(i + 1) if o.kind == 'merge' else ''}: {o.name}"
                     for i, o in sorted(choices.items()))
    return ("" if trained else "untrained ") + (body or "teacher")


# ---- the bench ----
def main(args: argparse.Namespace) -> Path:
    out = Path(args.out) / (args.run_name or "plans")
    with claim_units([out], "plans bench"):
        return bench(args, out)


def bench(args: argparse.Namespace, out: Path) -> Path:
    docs = read_texts(args.eval_text)  # before the teacher loads
    if args.chat_prompts is not None:
        read_prompts(args.chat_prompts)  # likewise
    if args.runtime == "llama.cpp":
        check_llama_cpp()  # likewise
    smap = read_map(args.map,
                    teacher_layers=len(session.model_config(args.teacher).layers))  # its layers: the teacher's
    s = session.start(session_config(args))
    if smap.get("teacher_hash") != s.teacher_hash and not args.force:
        raise CheckpointError(f"--map was made for another teacher ({smap.get('teacher')}); pass --force to use it")
    train, mc = train_config(args), map_config(args)
    check_runtime_teacher(mc.runtime, s.teacher, s.tokenizer)
    smap = runtime_map(smap, s.teacher.config, mc.runtime)  # --runtime: only the units it runs, for every method
    ctx = context(s, mc, train=train, record=run_record(record(args), batch_size=s.data.batch_size, train=train,
                                                         percentage_data=s.data.fraction))
    in_llama = mc.runtime == "llama.cpp"
    with llama_timer(s.teacher, s.tokenizer, mc.gguf_timing(s.data.seq_len) if in_llama else None) as llama:
        return run_bench(Bench(args, s, smap, ctx, mc.timing(s.data.seq_len), llama), docs, out)


def run_bench(b: Bench, docs: dict[str, list], out: Path) -> Path:
    args, s = b.args, b.s
    chat = bench_chat_config(b)
    speeds = args.targets if args.targets is not None else [1.3, 1.5, 2.0] if b.causal else [1.3, 1.5, 2.0, 3.0]
    targets = [Target(speedup=t, speed=args.speed) for t in speeds]
    if b.causal:
        targets += [Target(kv_cache=f) for f in ([1 / 3] if args.kv_targets is None else args.kv_targets)]
    if not targets:
        raise SettingError("--targets none and --kv-targets none leave nothing to plan for")
    per_target = chosen_methods(b, targets, out)
    models = build_models(b, per_target, out)
    ev = evaluate(b, models, s.first_sentences("test", args.test_sentences), docs, chat)
    for key, m in ev.test.metrics.items():
        models[key]["metrics"] = m
    result = summarise(b, per_target, models, ev.test, ev.timed, targets)
    if ev.texts:
        result["texts"] = named_texts(b, ev, docs, per_target, targets)
    if ev.chat is not None and ev.chat.metrics:
        result["chat"] = chat_result(b, ev, per_target, targets)
    table = markdown(result) + "\n"
    write_staged({out / "plans.md": table, out / "plans.json": json.dumps(result, indent=2, default=str)})
    plot(result, out / "pareto.png")
    print(table)
    return out


def build_models(b: Bench, per_target: dict[str, list[dict[str, Any]]], out: Path) -> dict[str, dict[str, Any]]:
    """Every distinct student of every target, built once (trained ones retrained and healed alike); each saved as
    <out>/model_<hash of its plan>/model/best and read from there where it is used (``loaded``): a 0.5B teacher's
    students held all at once beside a heal took 18.6 GB. A student that folder already holds, built with the same
    settings, is loaded (a stopped bench resumes; students of another run can be linked in)."""
    models: dict[str, dict[str, Any]] = {}
    for name, methods in per_target.items():
        for m in methods:
            key = m["key"] = plan_key(m["choices"], m["trained"])
            if key in models:
                continue
            run = out / f"model_{hashlib.sha1(key.encode()).hexdigest()[:10]}"  # the same plan: the same folder
            student = make_student(b.s, b.ctx, m["choices"], run=run, origin=f"bench/plans.py: {key}",
                                   finetune=plan_finetune(b.args), train=m["trained"], map_units=map_units(b.args))
            models[key] = {"key": key, "run": str(run), "trained": m["trained"], "params": student.num_parameters(),
                           "kv_bytes": student.config.kv_cache_bytes_per_token()}
            del student
            log.info("built %s", key)
    return models


def loaded(b: Bench, models: dict[str, dict[str, Any]], keys: list[str]) -> dict[str, SwappableModel]:
    """The students ``keys`` name, read from their folders onto the bench's device (only those in memory)."""
    return {key: load_model(student_dir(models[key]["run"]))[0].to(b.s.device).eval() for key in keys}


def groups(keys: list[str], size: int = GROUP) -> list[list[str]]:
    return [keys[k:k + size] for k in range(0, len(keys), size)]


def map_units(args: argparse.Namespace) -> Path | None:
    """The map's trained units (next to its sensitivity.json), unless --retrain-units."""
    if args.retrain_units:
        return None
    p = Path(args.map)
    return (p if p.is_dir() else p.parent) / "units"


def bench_chat_config(b: Bench) -> ChatConfig | None:
    """--chat-prompts' settings; an encoder teacher has none: said in one line, and the bench goes on without."""
    config = chat_config(b.args)
    if config is not None and not b.causal:
        print("chat: an encoder (masked-LM teacher) has no chat; --chat-prompts is left out")
        return None
    return config


@dataclass
class Scores:
    """One text's scores: the teacher's (``base``), and each student's metrics and per-item values (what the paired
    tests read)."""
    base: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    per: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Evaluation:
    """Every student on the test split, each --eval-text (by name) and the chat prompts, and its speeds."""
    test: Scores
    texts: dict[str, Scores]
    chat: Scores | None
    chat_shared: dict[str, Any]
    timed: dict[str, dict[str, float]]


def evaluate(b: Bench, models: dict[str, dict[str, Any]], test, docs: dict[str, list],
             chat: ChatConfig | None) -> Evaluation:
    """Each student read from its folder once, ``GROUP`` at a time: while in memory together they are scored on the
    test split and on each --eval-text (a decoder's on one teacher pass per text), answer the chat prompts against
    the teacher's replies (generated once), and are timed round-robin with the teacher."""
    s = b.s
    sets = {"": test}  # the test split, then each --eval-text by name
    sets.update({t.name: text_dataset(docs[t.name], s).first(b.args.eval_text_items) for t in b.args.eval_text})
    loaders = {name: s.loader(items, shuffle=False)[0] for name, items in sets.items()}
    scores = {name: Scores() for name in loaders}
    replies = teacher_chat(b.teacher, s.tokenizer, teacher_name=s.teacher_name, config=chat) \
        if chat is not None and models else None
    chatted, shared = (Scores(), {}) if replies is not None else (None, {})
    speeds = ("prefill", "decode") if b.causal else ("prefill",)
    timed: dict[str, dict[str, float]] = {k: {} for sp in speeds for k in (sp, f"{sp}_teacher")}
    if b.llama is not None:
        timed["llama_cpp"] = {}
    # an untrained model whose trained twin is timed has its shapes, so its speed: it is not timed again
    timing = {key for key, v in models.items() if v["trained"] or key.removeprefix("untrained ") not in models}
    for some in groups(list(models)):
        group = loaded(b, models, some)
        for name, loader in loaders.items():
            score_group(b, group, loader, into=scores[name], label=name or "test")
        if replies is not None:
            shared = chat_group(b, group, models, replies=replies, config=chat, into=chatted)
        time_group(b, {k: m for k, m in group.items() if k in timing}, speeds=speeds, into=timed)
        del group  # before the next group is read: never two groups in memory
    for speed in speeds:
        teacher_ms = list(timed[f"{speed}_teacher"].values())
        timed[speed]["teacher"] = statistics.median(teacher_ms) if teacher_ms else b.timing.ms(
            {"teacher": speed_fn(b.teacher, speed, batch=b.timing.batch, seq=b.timing.seq)}, s.device,
            load=b.load)["teacher"]
    return Evaluation(test=scores.pop(""), texts=scores, chat=chatted, chat_shared=shared, timed=timed)


def score_group(b: Bench, group: dict[str, SwappableModel], loader, *, into: Scores, label: str) -> None:
    """The students of ``group`` on one text's items, against the teacher: a decoder's token by token on one teacher
    pass, a masked LM's one student at a time (the teacher's own metrics once)."""
    s, t = b.s, b.teacher
    if b.causal:
        tok = token_scores(t, group, loader, device=s.device)
        into.base = {"teacher_perplexity": tok.perplexity(), "predicted_tokens": len(tok.teacher_nll)}
        for key in group:
            into.metrics[key] = {"student_perplexity": tok.perplexity(key),
                                 "teacher_perplexity": into.base["teacher_perplexity"],
                                 "agreement_top1": tok.mean(tok.agree[key]),
                                 "kl_teacher_student": tok.mean(tok.kl[key])}
            into.per[key] = {"nll": tok.nll[key], "agree": tok.agree[key]}
            log.info("%s on %s: %s", key, label, {k: round(x, 4) for k, x in into.metrics[key].items()})
        return
    if not into.base:
        into.base = compare_models(t, t, loader, tokenizer=s.tokenizer, device=s.device, keep_rows=False).metrics
    for key, student in group.items():
        res = compare_models(t, student, loader, tokenizer=s.tokenizer, device=s.device, keep_rows=True)
        into.metrics[key] = {k: res.metrics[k] for k in METRICS if k in res.metrics}
        into.per[key] = {"right": [r["student"] == r["true"] for r in res.rows],
                         "agree": [r["student"] == r["teacher"] for r in res.rows]}
        log.info("%s on %s: %s", key, label, {k: round(x, 4) for k, x in into.metrics[key].items()})


def chat_group(b: Bench, group: dict[str, SwappableModel], models: dict[str, dict[str, Any]], *, replies,
               config: ChatConfig, into: Scores) -> dict[str, Any]:
    """Each student of ``group`` answering the chat prompts, compared with the teacher's ``replies``
    (``evaluation.chat``; its replies and chat.md in <its folder>/chat); returns what every comparison shares."""
    shared: dict[str, Any] = {}
    for key, student in group.items():
        res = compare_chat(b.teacher, student, replies=replies, config=config, out=Path(models[key]["run"]) / "chat")
        shared = {k: res.metrics.pop(k) for k in ("prompts", "max_new_tokens", "end_of_turn", "teacher_reply_tokens",
                                                 "teacher_unfinished")}
        into.metrics[key], into.per[key] = res.metrics, res.per_item()
        log.info("chat %s: first %d tokens equal %.3f, agreement %.4f", key, PREFIX_TOKENS, res.metrics[FIRST],
                 res.metrics["teacher_forced"]["agreement_top1"])
    return {**shared, "prompts_file": replies.source}


def time_group(b: Bench, group: dict[str, SwappableModel], *, speeds: tuple[str, ...],
               into: dict[str, dict[str, float]]) -> None:
    """Prefill (and a decoder's decode) ms of each model of ``group``, round-robin with the teacher; each model's
    speed-up is against the teacher of its own round-robin ("<speed>_teacher"). With --runtime llama.cpp also each
    model's llama.cpp speeds against the teacher's file (``LlamaCppTimer.speeds``) under "llama_cpp"."""
    if not group:
        return
    for speed in speeds:
        fns = {"teacher": speed_fn(b.teacher, speed, batch=b.timing.batch, seq=b.timing.seq)}
        fns.update({key: speed_fn(m, speed, batch=b.timing.batch, seq=b.timing.seq) for key, m in group.items()})
        ms = b.timing.ms(fns, b.s.device, load=b.load)
        into[speed].update({key: ms[key] for key in group})
        into[f"{speed}_teacher"].update({key: ms["teacher"] for key in group})
    if b.llama is not None:  # each against the teacher's file, round-robin, in llama.cpp
        into["llama_cpp"].update({key: b.llama.speeds(m) for key, m in group.items()})


def named_texts(b: Bench, ev: Evaluation, docs: dict[str, list], per_target, targets: list[Target]) -> dict[str, Any]:
    """Each --eval-text's scores, and the planned student against every other method at each target by the test
    split's paired tests."""
    out = {}
    for t in b.args.eval_text:
        sc = ev.texts[t.name]
        items, teacher = _teacher_part(sc.base)
        out[t.name] = {"path": t.path, "documents": len(docs[t.name]), "items_limit": b.args.eval_text_items,
                       "items": items, "teacher_metrics": teacher, "metrics": sc.metrics,
                       "tests": [x for target in targets
                                 for x in paired_tests(b, target, per_target[target.name], sc.per)]}
    return out


def chat_result(b: Bench, ev: Evaluation, per_target, targets: list[Target]) -> dict[str, Any]:
    """The chat comparison of every model with the teacher, and the planned student against every other method at
    each target: McNemar on the prompts' first reply tokens, the tests of the test split on the teacher's reply
    tokens (teacher-forced NLL and agreement)."""
    if ev.chat is None or not ev.chat.metrics:
        return {}
    forced = next(iter(ev.chat.metrics.values()))["teacher_forced"]
    shared = dict(ev.chat_shared)
    return {"prompts_file": shared.pop("prompts_file"), **shared, "teacher_perplexity": forced["teacher_perplexity"],
            "reply_tokens": forced["tokens"], "metrics": ev.chat.metrics,
            "tests": [x for t in targets for x in paired_tests(b, t, per_target[t.name], ev.chat.per)]}


def _teacher_part(base: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """How many items a text's scores cover (predicted tokens of a decoder, sentences of a masked LM) and the
    teacher's metrics on them."""
    return (base.get("predicted_tokens", base.get("sentences")),
            {k: base[k] for k in ("teacher_top1", "teacher_top5", "teacher_perplexity") if k in base})


def _ms(timed: dict[str, dict[str, float]], key: str, speed: str) -> tuple[float, float]:
    """A model's ms at ``speed`` and the teacher's in the same round-robin (an untrained model: its trained twin's)."""
    for k in (key, key.removeprefix("untrained ")):
        if k in timed[speed]:
            return timed[speed][k], timed[f"{speed}_teacher"][k]
    return math.nan, math.nan


def _speed_fields(timed: dict[str, dict[str, float]], key: str, speed: str) -> dict[str, float]:
    ms, teacher_ms = _ms(timed, key, speed)
    return {f"{speed}_ms": ms, "speedup" if speed == "prefill" else f"{speed}_speedup": teacher_ms / ms}


def summarise(b: Bench, per_target, models, scored: Scores, timed, targets: list[Target]) -> dict[str, Any]:
    rows, tests = [], []
    for t in targets:
        methods = per_target[t.name]
        for m in methods:
            v = models[m["key"]]
            row = {"target": t.name, "label": t.label, "method": m["method"], "plan": m["key"], "why": m["why"],
                   "params": v["params"], "kv_bytes": v["kv_bytes"], "metrics": v["metrics"],
                   "predicted": _predicted(b.smap, m["choices"], t),
                   **_speed_fields(timed, m["key"], "prefill")}
            if b.causal:
                row.update(_speed_fields(timed, m["key"], "decode"))
            if "llama_cpp" in timed:
                row["llama_cpp"] = timed["llama_cpp"][m["key"].removeprefix("untrained ")]
            rows.append(row)
        tests += paired_tests(b, t, methods, scored.per)
    items, teacher = _teacher_part(scored.base)
    return {"teacher": str(b.args.teacher), "map": str(b.args.map), "device": str(b.s.device), "causal": b.causal,
            "teacher_metrics": teacher,
            "teacher_params": b.teacher.num_parameters(),
            "teacher_kv_bytes": b.teacher.config.kv_cache_bytes_per_token(),
            "teacher_prefill_ms": timed["prefill"]["teacher"],
            "teacher_decode_ms": timed.get("decode", {}).get("teacher"),
            "timing_load": b.load.summary(),
            "test_items": items,
            "targets": [t.name for t in targets], "rows": rows, "tests": tests,
            "budget": {"max_train_sentences": b.args.max_train_sentences, "epochs": b.args.epochs,
                       "lr": b.ctx.train_cfg.lr, "keep_start": b.ctx.train_cfg.keep_start,
                       "ft_epochs": b.args.ft_epochs, "ft_lr": b.args.ft_lr, "ft_keep_start": b.args.ft_keep_start,
                       "ft_max_steps": b.args.ft_max_steps, "ft_train_sentences": b.args.ft_train_sentences,
                       "temperature": kd_temperature(b.teacher, b.args.temperature),
                       "max_steps_per_epoch": b.args.max_steps_per_epoch, "eval_sentences": b.args.eval_sentences,
                       "test_sentences": b.args.test_sentences, "latency_reps": b.args.latency_reps,
                       "latency_threads": b.timing.threads_used(),
                       "calibration_sentences": b.args.calibration_sentences, "seq_len": b.args.seq_len},
            "runtime": b.args.runtime}


def _predicted(smap: dict[str, Any], choices: dict[int, Option], target: Target) -> float | None:
    """What the map predicts for a plan in the target's terms: its speed-up, or the KV-cache fraction it keeps; None
    for a plan of units the map did not measure (a rival's dropped layers, the map's --options without drop)."""
    key, _ = _need(smap, target)
    if unmapped(smap, choices):
        return None
    saved = predicted(smap, choices, key)
    if target.kv_cache is not None:
        return 1 - saved / smap["teacher_kv_bytes_per_token"]
    total = smap["timing"][SPEED_KEYS[target.speed][0]]
    return total / (total - saved)


def paired_tests(b: Bench, target: Target, methods: list[dict[str, Any]], per: dict[str, Any]) -> list[dict[str, Any]]:
    """The planned student against every other method at one target: healed against healed (and a masked LM's
    untrained baselines), and the untrained versions against each other."""
    out = []
    for suffix in ("", ", untrained"):  # healed against healed (and the masked-LM untrained baselines); raw vs raw
        name = "planned" + suffix
        planned = next((m for m in methods if m["method"] == name), None)
        if planned is None:
            continue
        a = per[planned["key"]]
        for m in methods:
            if m["method"].endswith(", untrained") != bool(suffix) or m is planned or m["key"] == planned["key"]:
                continue
            o = per[m["key"]]
            x = {"target": target.name, "label": target.label, "planned": name, "against": m["method"],
                 "plan": m["key"], "agreement": mcnemar(a["agree"], o["agree"])}
            if FIRST in a:  # chat: the first reply tokens per prompt, the teacher's reply tokens teacher-forced
                x.update(paired_chat(a, o))
            elif b.causal:
                x["nll_t"] = paired_t(a["nll"], o["nll"])
                x["nll_sign"] = sign_test(a["nll"], o["nll"])
            else:
                x["top1"] = mcnemar(a["right"], o["right"])
            out.append(x)
    return out


def markdown(r: dict[str, Any]) -> str:
    text = (_markdown_causal if r["causal"] else _markdown_mlm)(r)
    for name, t in r.get("texts", {}).items():  # each named text: the same tables, on its own items
        rows = [dict(row, metrics=t["metrics"][row["plan"]]) for row in r["rows"]]
        part = dict(r, rows=rows, tests=t["tests"], teacher_metrics=t["teacher_metrics"], test_items=t["items"])
        del part["texts"]
        part.pop("chat", None)
        text += f"\n\n## Text {name} ({t['path']}, {t['documents']:,} documents)\n\n" + markdown(part)
    if "chat" in r:
        text += "\n\n" + _markdown_chat(r)
    return text


def _timed_on(r: dict[str, Any]) -> str:
    """The device the run timed on, and the machine's load during its timings (results of older runs: the device)."""
    load = load_text(r.get("timing_load") or {})
    return f"{r['device']}, {load}" if load else r["device"]


def _markdown_mlm(r: dict[str, Any]) -> str:
    t1 = r["teacher_metrics"].get("teacher_top1", float("nan"))
    lines = [f"Teacher {Path(r['teacher']).name}: top-1 {t1:.4f}, {r['teacher_params'] / 1e6:.2f} M parameters, "
             f"encoder {r['teacher_prefill_ms']:.1f} ms ({_timed_on(r)}); {r['test_items']} test sentences.", "",
             "| target | method | plan | params (M) | encoder ms | speed-up measured | top-1 (x teacher) | top-5 "
             "| agreement | KL | hidden cos |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        m = row["metrics"]
        lines.append(f"| {row['label']} | {row['method']} | {row['plan']} | {row['params'] / 1e6:.2f} | "
                     f"{row['prefill_ms']:.1f} | {row['speedup']:.2f}x | "
                     f"{m.get('student_top1', math.nan):.4f} ({m.get('student_top1', math.nan) / t1:.3f}) | "
                     f"{m.get('student_top5', math.nan):.4f} | {m.get('agreement_top1', math.nan):.4f} | "
                     f"{m.get('kl_teacher_student', math.nan):.4f} | {m.get('hidden_cosine', math.nan):.4f} |")
    lines += ["", "Paired tests, planned vs each other method at the same target (McNemar, exact two-sided; "
              "'only planned' / 'only other' = sentences where just that model is right / agrees with the teacher):",
              "", "| target | planned vs | top-1: only planned / only other, z, p | agreement: only planned / only "
              "other, z, p |", "|---|---|---:|---:|"]
    for x in r["tests"]:
        a, b = x["top1"], x["agreement"]
        lines.append(f"| {x['label']} | {x['against']} ({x['plan']}) | {a['only_a']} / {a['only_b']}, "
                     f"z = {a['z']:+.2f}, p = {a['p']:.3g} | {b['only_a']} / {b['only_b']}, z = {b['z']:+.2f}, "
                     f"p = {b['p']:.3g} |")
    return "\n".join(lines)


def _markdown_causal(r: dict[str, Any]) -> str:
    ppl = r["teacher_metrics"].get("teacher_perplexity", float("nan"))
    lines = [f"Teacher {Path(r['teacher']).name}: perplexity {ppl:.3f}, {r['teacher_params'] / 1e6:.2f} M parameters, "
             f"KV cache {r['teacher_kv_bytes']:,} bytes per token, prefill {r['teacher_prefill_ms']:.1f} ms, decode "
             f"{r['teacher_decode_ms']:.2f} ms per token ({_timed_on(r)}); {r['test_items']} predicted test tokens.",
             "",
             "| target | method | params (M) | KV (x teacher) | prefill speed-up | decode speed-up | perplexity "
             "(x teacher) | agreement | KL |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    llama = next((row["llama_cpp"] for row in r["rows"] if "llama_cpp" in row), None)
    if llama is not None:  # --runtime llama.cpp: its speed-ups first, PyTorch's after
        lines[0] += (f" llama.cpp: {llama['gguf_type']} GGUF files, {llama['threads']} thread(s), median of "
                     f"{llama['reps']} round-robin runs against the teacher's file, {llama['seq']}-token prefill.")
        lines[2] = lines[2].replace("| prefill speed-up | decode speed-up |", "| llama.cpp prefill / decode speed-up "
                                    "| PyTorch prefill / decode speed-up |")
    for row in r["rows"]:
        m = row["metrics"]
        sp = m.get("student_perplexity", math.nan)
        speeds = f"{row['speedup']:.2f}x | {row['decode_speedup']:.2f}x"
        if llama is not None:
            lc = row.get("llama_cpp", {})
            speeds = (f"{lc.get('prefill_speedup', math.nan):.2f}x / {lc.get('decode_speedup', math.nan):.2f}x | "
                      f"{row['speedup']:.2f}x / {row['decode_speedup']:.2f}x")
        lines.append(f"| {row['label']} | {row['method']} | {row['params'] / 1e6:.2f} | "
                     f"{row['kv_bytes'] / r['teacher_kv_bytes']:.3f} | {speeds} | {sp:.3f} ({sp / ppl:.3f}) | "
                     f"{m.get('agreement_top1', math.nan):.4f} | {m.get('kl_teacher_student', math.nan):.4f} |")
    lines += ["", "Plans:", ""] + [f"- {row['label']} {row['method']}: {row['plan']}" for row in r["rows"]
                                   if "untrained" not in row["method"]]
    lines += ["", "Paired tests over the test tokens, planned vs each other method at the same target (agreement with "
              "the teacher's top-1: McNemar, exact two-sided; NLL per token: paired t-test and sign test, two-sided; "
              "a negative mean difference: planned is better):", ""] + _tests_table(r["tests"])
    return "\n".join(lines)


def _tests_table(tests: list[dict[str, Any]]) -> list[str]:
    """A decoder's paired tests, planned vs each other method, markdown (chat's: also its first reply tokens)."""
    first = f"first {PREFIX_TOKENS} tokens equal: only planned / only other, p | " if any(FIRST in x for x in tests) \
        else ""
    lines = [f"| target | planned vs | {first}agreement: only planned / only other, p | NLL: mean diff, t, p | "
             "NLL sign: planned lower / higher, p |", "|---|---|" + "---:|" * (4 if first else 3)]
    for x in tests:
        a, t, sg = x["agreement"], x["nll_t"], x["nll_sign"]
        f = f"{x[FIRST]['only_a']} / {x[FIRST]['only_b']}, p = {x[FIRST]['p']:.3g} | " if first else ""
        lines.append(f"| {x['label']} | {x['planned']} vs {x['against']} | {f}{a['only_a']} / {a['only_b']}, "
                     f"p = {a['p']:.3g} | {t['mean_diff']:+.4f}, {t['t']:+.1f}, p = {t['p']:.3g} | "
                     f"{sg['a_lower']} / {sg['a_higher']}, p = {sg['p']:.3g} |")
    return lines


def _markdown_chat(r: dict[str, Any]) -> str:
    """Every model's chat replies against the teacher's, a table and the paired tests per target."""
    c = r["chat"]
    lines = [f"## Chat ({c['prompts']} prompts of {c['prompts_file']}, greedy, at most {c['max_new_tokens']} new "
             f"tokens, replies end at {', '.join(c['end_of_turn']['tokens'])}; the teacher's replies: "
             f"{c['teacher_reply_tokens']:.1f} tokens on average, {c['teacher_unfinished']} cut at the limit, its "
             f"perplexity on them {c['teacher_perplexity']:.3f})"]
    for name in r["targets"]:
        rows = [row for row in r["rows"] if row["target"] == name]
        if not rows:
            continue
        lines += ["", f"### Chat at {rows[0]['label']}", "",
                  f"| method | whole reply equal | common prefix (tokens) | first {PREFIX_TOKENS} tokens equal | "
                  "chrF | perplexity on the teacher's replies (x teacher) | agreement | KL |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            m = c["metrics"][row["plan"]]
            f = m["teacher_forced"]
            lines.append(f"| {row['method']} | {m['exact_match']:.3f} | {m['mean_common_prefix_tokens']:.2f} | "
                         f"{m[FIRST]:.3f} | {m['chrf']:.2f} | {f['student_perplexity']:.3f} "
                         f"({f['student_perplexity'] / f['teacher_perplexity']:.3f}) | {f['agreement_top1']:.4f} | "
                         f"{f['kl_teacher_student']:.4f} |")
        tests = [x for x in c["tests"] if x["target"] == name]
        if tests:
            lines += ["", f"Paired tests (first {PREFIX_TOKENS} reply tokens per prompt: McNemar, exact two-sided; "
                      f"the {c['reply_tokens']} teacher reply tokens, teacher-forced: as above):", ""]
            lines += _tests_table(tests)
    return "\n".join(lines)


STYLE = {"planned": ("o", "tab:red"), "uniform": ("s", "tab:blue"), "ShortGPT": ("^", "tab:green"),
         "SLEB": ("D", "tab:purple"), "untrained: kept top heads": ("v", "tab:gray"),
         "untrained: dropped layers": ("x", "black")}


LLAMA_KEYS = {"speedup": "prefill_speedup", "decode_speedup": "decode_speedup"}  # a row's speed-ups in llama.cpp


def plot(r: dict[str, Any], path: Path) -> Path:
    """Quality against measured speed-up (prefill; a decoder also decode; llama.cpp's where the rows have it), one
    marker per method, hollow untrained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    causal = r["causal"]
    panels = ([("speedup", "student_perplexity", "perplexity"), ("speedup", "agreement_top1", "agreement"),
               ("decode_speedup", "student_perplexity", "perplexity"), ("decode_speedup", "agreement_top1",
                                                                       "agreement")]
              if causal else [("speedup", "student_top1", "masked-token top-1"),
                              ("speedup", "agreement_top1", "agreement with the teacher's top-1")])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (xk, yk, label) in zip(axes[0], panels):
        for row in r["rows"]:
            base = row["method"].removesuffix(", untrained")
            marker, color = STYLE.get(base, ("o", "tab:orange"))
            hollow = "untrained" in row["method"] and base in ("planned", "uniform", "ShortGPT", "SLEB")
            if yk in row["metrics"]:
                look = ({"c": color} if marker == "x" else
                        {"facecolors": "none" if hollow else color, "edgecolors": color})
                x = row["llama_cpp"][LLAMA_KEYS[xk]] if "llama_cpp" in row else row[xk]
                ax.scatter([x], [row["metrics"][yk]], marker=marker, s=45, label=row["method"], **look)
        ref = r["teacher_metrics"].get("teacher_perplexity" if yk == "student_perplexity" else "teacher_top1") \
            if yk != "agreement_top1" else 1.0
        if ref is not None:
            ax.scatter([1.0], [ref], marker="*", s=120, color="gold", edgecolor="k", label="teacher")
        if yk == "student_perplexity":
            ax.set_yscale("log")
        where = "llama.cpp" if any("llama_cpp" in row for row in r["rows"]) else r["device"]
        ax.set_xlabel(("decode" if xk == "decode_speedup" else "prefill" if causal else "encoder")
                      + f" speed-up, measured ({where})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    axes[0][0].legend(uniq.values(), uniq.keys(), fontsize=7)
    fig.suptitle(f"Planned students vs uniform and layer-removal baselines — {Path(r['teacher']).name}, "
                 f"{r['test_items']} test {'tokens' if causal else 'sentences'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
