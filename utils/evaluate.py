"""Teacher vs student on the one-mask-per-sentence protocol: the metrics, the report, and the files.

Every model sees the same masked sentences (positions fixed by the dataset's seed). Counts are summed, then divided
once, so results are exact under data parallelism too (counts are all-reduced before dividing).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from models.bert import BertForMaskedLM
from models.hf import TeacherError, load_teacher
from . import runtime

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

TOPK = (1, 5, 10)


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per sentence (all ranks' rows under DDP)
    notes: list[str] = field(default_factory=list)


def _judge_id_map(tokenizer, judge_tokenizer) -> None:
    if judge_tokenizer is not None and judge_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise TeacherError("the judge's tokenizer has a different vocabulary from the teacher's: predictions cannot be "
                         "compared token by token; choose a judge with the same vocabulary (e.g. bert-large-uncased "
                         "for bert-base-uncased)")


@torch.no_grad()
def compare_models(teacher: BertForMaskedLM, student: BertForMaskedLM, loader, tokenizer, device: torch.device,
                   judge: BertForMaskedLM | None = None, judge_tokenizer=None, keep_rows: bool = True,
                   max_batches: int | None = None) -> EvalResult:
    """Masked-token accuracy (top-1/5/10), agreement, KL(teacher||student), hidden-state cosine, latency, params."""
    _judge_id_map(tokenizer, judge_tokenizer)
    mlm = teacher.has_mlm_head and student.has_mlm_head
    notes = []
    if not mlm:
        notes.append("no masked-LM head on " + ("the teacher" if not teacher.has_mlm_head else "the student")
                     + ": masked-token metrics (accuracy, agreement, KL, judge) skipped; fidelity metrics reported")
    if judge is not None and not judge.has_mlm_head:
        raise TeacherError("the judge model has no masked-LM head; choose a BertForMaskedLM checkpoint")
    teacher.eval(), student.eval()
    if judge is not None:
        judge.eval()
    names = ["sentences", "tokens", "cos_sum", "mse_sum", "kl_sum", "agree", "t_time", "s_time", "batches"]
    names += [f"{m}_top{k}" for m in ("teacher", "student") for k in TOPK]
    names += [f"{m}_in_judge_top{k}" for m in ("teacher", "student") for k in TOPK] + ["judge_top1"]
    acc = dict.fromkeys(names, 0.0)
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for bi, batch in enumerate(loader):
        if max_batches is not None and bi >= max_batches:
            break
        ids = batch["masked_input_ids"].to(device)
        att = batch["attention_mask"].to(device)
        pos = batch["mask_pos"].to(device)
        target = batch["target"].to(device)
        rows_idx = torch.arange(len(ids), device=device)

        def run(model):  # the encoder, then the vocabulary projection at the masked position only
            h = model(ids, att, with_logits=False).last_hidden_state
            return h, (model.mlm_logits(h[rows_idx, pos]) if mlm else None)

        if bi == 0:  # warm-up, untimed: the first call of a model pays for allocation and kernel selection
            run(teacher), run(student)
        sync(); t0 = time.perf_counter()
        th, tl = run(teacher)
        sync(); t1 = time.perf_counter()
        sh, sl = run(student)
        sync(); t2 = time.perf_counter()
        acc["t_time"] += t1 - t0
        acc["s_time"] += t2 - t1
        acc["batches"] += 1
        valid = att.bool()
        th, sh = th.float(), sh.float()
        acc["cos_sum"] += F.cosine_similarity(th, sh, dim=-1)[valid].sum().item()
        acc["mse_sum"] += (th - sh).pow(2).mean(-1)[valid].sum().item()
        acc["tokens"] += valid.sum().item()
        acc["sentences"] += len(ids)
        if not mlm:
            continue
        tl, sl = tl.float(), sl.float()
        t_top = tl.topk(max(TOPK), -1).indices
        s_top = sl.topk(max(TOPK), -1).indices
        for k in TOPK:
            acc[f"teacher_top{k}"] += (t_top[:, :k] == target[:, None]).any(-1).sum().item()
            acc[f"student_top{k}"] += (s_top[:, :k] == target[:, None]).any(-1).sum().item()
        acc["agree"] += (t_top[:, 0] == s_top[:, 0]).sum().item()
        acc["kl_sum"] += F.kl_div(sl.log_softmax(-1), tl.log_softmax(-1), log_target=True, reduction="sum").item()
        j_top = None
        if judge is not None:
            j_h = judge(ids, att, with_logits=False).last_hidden_state[rows_idx, pos]
            j_top = judge.mlm_logits(j_h).float().topk(max(TOPK), -1).indices
            acc["judge_top1"] += (j_top[:, 0] == target).sum().item()
            for k in TOPK:
                acc[f"teacher_in_judge_top{k}"] += (j_top[:, :k] == t_top[:, :1]).any(-1).sum().item()
                acc[f"student_in_judge_top{k}"] += (j_top[:, :k] == s_top[:, :1]).any(-1).sum().item()
        if keep_rows:
            for b in range(len(ids)):
                n = int(att[b].sum())
                row = {
                    "index": int(batch["index"][b]),
                    "sentence": tokenizer.decode(batch["input_ids"][b, 1:n - 1].tolist()),
                    "masked": tokenizer.decode(batch["masked_input_ids"][b, 1:n - 1].tolist()),
                    "true": tokenizer.convert_ids_to_tokens(int(target[b])),
                    "teacher": tokenizer.convert_ids_to_tokens(int(t_top[b, 0])),
                    "student": tokenizer.convert_ids_to_tokens(int(s_top[b, 0])),
                }
                if j_top is not None:
                    row["judge_top10"] = tokenizer.convert_ids_to_tokens(j_top[b].tolist())
                rows.append(row)
    keys = list(acc)
    summed = runtime.all_reduce_sum(torch.tensor([acc[k] for k in keys], dtype=torch.float64, device=device))
    acc = dict(zip(keys, summed.tolist()))
    if keep_rows and runtime.is_distributed():  # every rank's sentences, in the order of a single process
        rows = sorted((r for part in runtime.all_gather_objects(rows) for r in part), key=lambda r: r["index"])
    n, tok = max(acc["sentences"], 1), max(acc["tokens"], 1)
    m: dict[str, Any] = {
        "sentences": int(acc["sentences"]),
        "hidden_cosine": acc["cos_sum"] / tok,
        "hidden_mse": acc["mse_sum"] / tok,
        "teacher_params": teacher.num_parameters(),
        "student_params": student.num_parameters(),
        "teacher_latency_ms_per_batch": 1000 * acc["t_time"] / max(acc["batches"], 1),
        "student_latency_ms_per_batch": 1000 * acc["s_time"] / max(acc["batches"], 1),
    }
    m["param_ratio"] = m["student_params"] / m["teacher_params"]
    m["speedup"] = acc["t_time"] / acc["s_time"] if acc["s_time"] > 0 else math.nan
    if mlm:
        for who in ("teacher", "student"):
            for k in TOPK:
                m[f"{who}_top{k}"] = acc[f"{who}_top{k}"] / n
        m["agreement_top1"] = acc["agree"] / n
        m["kl_teacher_student"] = acc["kl_sum"] / n
        if judge is not None:
            m["judge_top1"] = acc["judge_top1"] / n
            for who in ("teacher", "student"):
                for k in TOPK:
                    m[f"{who}_in_judge_top{k}"] = acc[f"{who}_in_judge_top{k}"] / n
    return EvalResult(metrics=m, rows=rows, notes=notes)


def format_table(m: dict[str, Any]) -> str:
    """Teacher and student side by side, markdown (pastes into a paper draft or an issue)."""
    lines = ["| metric | teacher | student |", "|---|---:|---:|"]

    def f(v):
        return f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    for k in TOPK:
        if f"teacher_top{k}" in m:
            lines.append(f"| top-{k} accuracy | {f(m[f'teacher_top{k}'])} | {f(m[f'student_top{k}'])} |")
    for k in TOPK:
        if f"teacher_in_judge_top{k}" in m:
            lines.append(f"| top-1 in judge top-{k} | {f(m[f'teacher_in_judge_top{k}'])} | "
                         f"{f(m[f'student_in_judge_top{k}'])} |")
    lines.append(f"| parameters | {f(m['teacher_params'])} | {f(m['student_params'])} |")
    lines.append(f"| latency ms / batch | {m['teacher_latency_ms_per_batch']:.2f} | "
                 f"{m['student_latency_ms_per_batch']:.2f} |")
    single = [("agreement (student top-1 = teacher top-1)", "agreement_top1"),
              ("KL(teacher ‖ student) at the mask", "kl_teacher_student"),  # '|' would split the table cell
              ("final hidden-state cosine", "hidden_cosine"), ("final hidden-state MSE", "hidden_mse"),
              ("judge top-1 accuracy", "judge_top1"), ("parameter ratio", "param_ratio"), ("speed-up", "speedup"),
              ("sentences", "sentences")]
    for label, key in single:
        if key in m:
            lines.append(f"| {label} | {f(m[key])} | |")
    return "\n".join(lines)


def write_report(result: EvalResult, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """results.json + predictions file (sentence, true word, teacher, student, judge top-10) + printed table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": result.metrics, "notes": result.notes, **(extra or {})}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    if result.rows:
        cols = ["index", "true", "teacher", "student"] + (["judge_top10"] if "judge_top10" in result.rows[0] else [])
        with open(out / "predictions.tsv", "w", encoding="utf-8") as f:
            f.write("\t".join(cols + ["masked sentence"]) + "\n")
            for r in result.rows:
                vals = [" ".join(r[c]) if isinstance(r[c], list) else str(r[c]) for c in cols]
                f.write("\t".join(vals + [r["masked"]]) + "\n")
    for note in result.notes:
        print(f"note: {note}")
    print(format_table(result.metrics))
    return out


def evaluate_student(s: Session, student: BertForMaskedLM, out_dir: Path, extra: dict[str, Any],
                     judge_name: str | None = None, split: str = "test", max_batches: int | None = None) -> Path:
    """Compare ``student`` with the session's teacher on ``split`` and write the report (rank 0) to ``out_dir``.

    The one evaluation of a student shared by eval_merged_12.py, eval_merge_layer.py and finetune_merged.py.
    """
    args = s.args
    judge = judge_tok = None
    if judge_name:
        judge, judge_tok = load_teacher(judge_name, s.device)
    ds = s.sentences(split)
    loader, _ = s.loader(ds, shuffle=False)
    res = compare_models(s.teacher, student.to(s.device).eval(), loader, s.tokenizer, s.device, judge, judge_tok,
                         max_batches=max_batches)
    if runtime.is_main_process():
        print(student.config.describe())
        write_report(res, out_dir, {"teacher": args.teacher, "judge": judge_name, "split": split,
                                    "percentage_data": getattr(args, "percentage_data", 1.0), "seq_len": args.seq_len,
                                    "mask_seed": args.seed, "device": str(s.device), **extra})
    return out_dir
