"""Saved decoder students side by side on the same test tokens, each against a reference student by paired tests.

For variants of one recipe (a loss, a ratio, a seed): perplexity, agreement, KL and overconfidence (mean NLL minus
mean predictive entropy: a student flatter than an overconfident teacher can beat its perplexity while agreeing with
it less) per model, and for each student against --reference the paired t-test of per-token NLL (over tokens and
over window means), the sign test and McNemar's exact test on top-1 agreement with the teacher
(``TokenScores.paired``). The windows are those of the leading --test-fraction of the test split (window = stride =
--seq-len, no BOS), the same for every model; or of its first --test-sentences (a bench's windows); or, with
--skip-test-sentences N, of the sentences after the first N, to confirm a bench's comparison on test text it has not
looked at. Each --eval-text NAME=PATH (repeatable) gets the same table and paired tests on its own windows (its
documents in order, as eval_merged_12.py scores it; --eval-text-items N: its first N windows, as bench/plans.py
limits them): "texts" in paired.json, a section per text in paired.md. With
--chat-prompts (a teacher with a chat template), every model's greedy chat replies against the teacher's, generated
once (utils.evaluation.chat; replies in <out>/chat/NAME), each student against --reference by McNemar on the prompts
whose first 8 reply tokens equal the teacher's and the tests above on the teacher's reply tokens: "chat".

    OMP_NUM_THREADS=1 python bench/paired_decoders.py --teacher bench/results/smollm2-135m-instruct \\
        --data-dir bench/results/wikitext2_split --seq-len 256 --test-fraction 0.25 --reference output \\
        --models output=runs/models/output rel=runs/models/rel_bal0.1 \\
        --eval-text code=bench/results/texts/code/eval --eval-text prose=bench/results/texts/prose/eval
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quick import add_quick  # noqa: E402
from utils import session as _session  # noqa: E402
from utils.cli.configs import chat_config, session_config  # noqa: E402
from utils.cli.groups import add_chat_args, add_eval_text_items_arg  # noqa: E402
from utils.cli.parser import add_eval_text_arg, common_parser  # noqa: E402
from utils.cli.run import run_main  # noqa: E402
from utils.cli.types import fraction, positive_int  # noqa: E402
from models.export import export_pretrained  # noqa: E402
from models.staging import write_staged  # noqa: E402
from utils.evaluation.chat import (FIRST, PREFIX_TOKENS, ChatConfig, compare_chat, paired_chat,  # noqa: E402
                                   read_prompts, teacher_chat)
from utils.evaluation.metrics import token_scores, transformers_nll  # noqa: E402
from utils.evaluation.stats import format_p as _p  # noqa: E402
from utils.evaluation.texts import read_texts, text_dataset  # noqa: E402
from utils.training.students import load_model  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="bench/results/paired_decoders")
    p.set_defaults(seq_len=256, batch_size=4, device="cpu", percentage_data=1.0)
    g = p.add_argument_group("students")
    g.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR",
                   help="saved models (python -m utils.assemble, finetune_merged.py) to compare")
    g.add_argument("--reference", required=True, help="the NAME every other model is tested against")
    g.add_argument("--test-fraction", type=fraction, default=0.25, help="leading fraction of the test split")
    g.add_argument("--test-sentences", type=positive_int("--test-sentences"), default=None,
                   help="the first N test sentences instead (bench/plans.py's --test-sentences: its windows)")
    g.add_argument("--skip-test-sentences", type=positive_int("--skip-test-sentences"), default=None, metavar="N",
                   help="leave out the first N test sentences (those a bench already scored) and compare on the "
                        "rest, or on the --test-sentences after them: a confirmation on text not yet looked at "
                        "(--test-fraction is then not used)")
    g.add_argument("--hf-check", action="store_true",
                   help="also export every model (HF format, remote code where needed) and compute its perplexity "
                        "with plain transformers on the same windows")
    add_quick(p, {"seq_len": 16, "batch_size": 8, "test_sentences": 24}, "windows of 16 over 24 test sentences")
    add_eval_text_arg(g)  # each named text: the same table and paired tests, on its own windows
    add_eval_text_items_arg(g)
    g.add_argument("--skip-eval-text-items", type=positive_int("--skip-eval-text-items"), default=None, metavar="N",
                   help="leave out each --eval-text's first N windows (those a bench scored with --eval-text-items N) "
                        "and compare on the rest, or on the --eval-text-items after them")
    add_chat_args(p)
    return p


def named_models(specs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """--models NAME=DIR ... as {name: folder} (an argument error for a spec without both)."""
    pairs = [s.partition("=") for s in specs]
    bad = [s for s, (_, eq, d) in zip(specs, pairs) if not eq or not d]
    if bad:
        parser.error(f"--models takes NAME=DIR, got {bad[0]!r}")
    return {name: d for name, _, d in pairs}


def load_students(s, named: dict[str, str]) -> dict:
    """Each saved model of ``named`` (name -> folder) loaded onto the session's device, checked against its teacher."""
    return {name: load_model(d, s.teacher_hash, teacher_config=s.teacher.config)[0].to(s.device)
            for name, d in named.items()}


def _hf_perplexity(model, tokenizer, windows: list[list[int]], folder: Path, *, ours: float) -> dict:
    """``model`` exported to ``folder`` and scored by plain transformers on ``windows``, beside our perplexity."""
    _, kind = export_pretrained(model.cpu(), folder, tokenizer)
    nll = transformers_nll(folder, windows, trust_remote_code=True)
    theirs = math.exp(math.fsum(nll) / len(nll))
    return {"export": kind, "ours": ours, "transformers": theirs, "relative_difference": abs(ours - theirs) / theirs,
            "tokens": len(nll)}


def markdown(res: dict) -> str:
    ref = res["reference"]
    skipped = res.get("skipped_test_sentences")
    after = f", after the first {skipped:,} test sentences" if skipped else ""
    lines = [f"{res['tokens']:,} predicted tokens ({res['windows']} windows of {res['seq_len']}{after}); reference: "
             f"{ref}", "", *_table(res)]
    for name, part in res.get("texts", {}).items():
        later = f" after its first {part['skipped_items']:,}" if part.get("skipped_items") else ""
        lines += ["", f"Text {name} ({part['path']}): {part['tokens']:,} predicted tokens ({part['windows']} windows "
                  f"of {res['seq_len']}{later}, its documents in order); reference: {ref}", "", *_table(part)]
    if "chat" in res:
        lines += ["", *_chat_table(res["chat"], ref)]
    if "transformers" in res:
        lines += ["", "Perplexity of the exported models by plain transformers on the same windows:", "",
                  "| model | export | ours | transformers | relative difference |", "|---|---|---:|---:|---:|"]
        lines += [f"| {n} | {h['export']} | {h['ours']:.4f} | {h['transformers']:.4f} | "
                  f"{h['relative_difference']:.1e} |"
                  for n, h in res["transformers"].items()]
    return "\n".join(lines)


def _table(res: dict) -> list[str]:
    """One row per model of one text (the test windows or a named text): its scores and its paired tests."""
    lines = ["| model | perplexity | agreement | KL(t‖s) | NLL − entropy | NLL − ref | t tokens (p) | "
             "t windows (p) | sign: lower / higher (p) | agreement only model / only ref (p) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in res["rows"].items():
        cells = [name, f"{row['perplexity']:.3f}", f"{row['agreement']:.4f}", f"{row['kl']:.4f}",
                 f"{row['overconfidence']:+.4f}"]
        t = res["tests"].get(name)
        if t is None:
            cells += ["", "", "", "", ""]
        else:
            tt, tw, sg, mc = t["nll_t_tokens"], t["nll_t_windows"], t["nll_sign"], t["agreement_mcnemar"]
            cells += [f"{tt['mean_diff']:+.4f}", f"{tt['t']:+.2f} ({_p(tt['p'])})", f"{tw['t']:+.2f} ({_p(tw['p'])})",
                      f"{sg['a_lower']:,} / {sg['a_higher']:,} ({_p(sg['p'])})",
                      f"{mc['only_a']:,} / {mc['only_b']:,} ({_p(mc['p'])})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _chat_table(c: dict, ref: str) -> list[str]:
    """Every model's chat replies against the teacher's, and each against the reference by paired tests."""
    lines = [f"Chat: {c['prompts']} prompts of {c['prompts_file']}, greedy, at most {c['max_new_tokens']} new tokens; "
             f"reference: {ref}", "",
             f"| model | whole reply equal | common prefix | first {PREFIX_TOKENS} equal | chrF | perplexity on the "
             f"teacher's replies | agreement | KL(t‖s) | first {PREFIX_TOKENS}: only model / only ref (p) | "
             "agreement: only model / only ref (p) | NLL − ref, t (p) | sign: lower / higher (p) |",
             "|---|" + "---:|" * 11]
    for name, m in c["rows"].items():
        f = m["teacher_forced"]
        cells = [name, f"{m['exact_match']:.3f}", f"{m['mean_common_prefix_tokens']:.2f}", f"{m[FIRST]:.3f}",
                 f"{m['chrf']:.2f}", f"{f['student_perplexity']:.3f}", f"{f['agreement_top1']:.4f}",
                 f"{f['kl_teacher_student']:.4f}"]
        t = c["tests"].get(name)
        if t is None:
            cells += ["", "", "", ""]
        else:
            fm, ag, tt, sg = t[FIRST], t["agreement"], t["nll_t"], t["nll_sign"]
            cells += [f"{fm['only_a']} / {fm['only_b']} ({_p(fm['p'])})",
                      f"{ag['only_a']:,} / {ag['only_b']:,} ({_p(ag['p'])})",
                      f"{tt['mean_diff']:+.4f}, {tt['t']:+.2f} ({_p(tt['p'])})",
                      f"{sg['a_lower']:,} / {sg['a_higher']:,} ({_p(sg['p'])})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def compare_chat_replies(s, students: dict, reference: str, *, config: ChatConfig, out: Path) -> dict:
    """Every student's greedy chat replies against the teacher's (generated once; each model's in ``out/NAME``) and
    each against ``reference`` by paired tests (``paired_chat``)."""
    replies = teacher_chat(s.teacher, s.tokenizer, teacher_name=s.teacher_name, config=config)
    done = {n: compare_chat(s.teacher, m, replies=replies, config=config, out=out / n) for n, m in students.items()}
    return {"prompts_file": replies.source, "prompts": len(replies.prompts), "max_new_tokens": config.max_new_tokens,
            "rows": {n: r.metrics for n, r in done.items()},
            "tests": {n: paired_chat(r.per_item(), done[reference].per_item()) for n, r in done.items()
                      if n != reference}}


def compare(s, students: dict, loader, reference: str) -> tuple[dict, object]:
    """Every student on one loader's tokens: per model its scores, and each against ``reference`` by paired tests;
    with the token scores (``TokenScores``)."""
    sc = token_scores(s.teacher, students, loader, device=s.device)
    rows = {"teacher": {"perplexity": sc.perplexity(), "agreement": 1.0, "kl": 0.0,
                        "entropy": sc.mean(sc.teacher_entropy), "overconfidence": sc.overconfidence()}}
    rows.update({n: {"perplexity": sc.perplexity(n), "agreement": sc.mean([float(x) for x in sc.agree[n]]),
                     "kl": sc.mean(sc.kl[n]), "entropy": sc.mean(sc.entropy[n]),
                     "overconfidence": sc.overconfidence(n)} for n in students})
    return {"tokens": len(sc.teacher_nll), "windows": len(set(sc.window)), "rows": rows,
            "tests": {n: sc.paired(n, reference) for n in students if n != reference}}, sc


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    named = named_models(args.models, parser)
    if args.reference not in named:
        parser.error(f"--reference {args.reference!r} is not one of the --models names {sorted(named)}")
    docs = read_texts(args.eval_text)  # before the teacher loads
    chat = chat_config(args)
    if chat is not None:
        read_prompts(chat.prompts)  # likewise
    s = _session.start(session_config(args))
    students = load_students(s, named)
    by_sentences = bool(args.test_sentences or args.skip_test_sentences)  # else the leading --test-fraction
    if by_sentences:
        test = s.first_sentences("test", args.test_sentences, skip=args.skip_test_sentences or 0)
    else:
        test = dataclasses.replace(s, data=dataclasses.replace(s.data, fraction=args.test_fraction)).sentences("test")
    loader, _ = s.loader(test, shuffle=False)
    test_scores, sc = compare(s, students, loader, args.reference)
    res = {"teacher": args.teacher, "models": named, "reference": args.reference, "seq_len": args.seq_len,
           "test_fraction": None if by_sentences else args.test_fraction,
           "test_sentences": args.test_sentences, "skipped_test_sentences": args.skip_test_sentences or 0,
           **test_scores}
    if args.eval_text:
        skip = args.skip_eval_text_items or 0
        res["texts"] = {t.name: {"path": t.path, "documents": len(docs[t.name]), "items_limit": args.eval_text_items,
                                 "skipped_items": skip,
                                 **compare(s, students, s.loader(text_dataset(docs[t.name], s).first(
                                     args.eval_text_items, skip=skip), shuffle=False)[0], args.reference)[0]}
                        for t in args.eval_text}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if chat is not None:
        res["chat"] = compare_chat_replies(s, students, args.reference, config=chat, out=out / "chat")
    if args.hf_check:
        res["transformers"] = {n: _hf_perplexity(m, s.tokenizer, test.ids, out / "hf" / n, ours=sc.perplexity(n))
                               for n, m in students.items()}
    write_staged({out / "paired.md": markdown(res) + "\n", out / "paired.json": json.dumps(res, indent=2)})
    print(markdown(res))
    return out


if __name__ == "__main__":
    parser = build_parser()
    sys.exit(run_main(lambda a: main(a, parser), parser))
