"""The heal from a top-k teacher cache against the heal beside the live teacher (issue 36 item 2): one decoder
student (the teacher without --drop-layers) healed by the same KD budget with the full-vocabulary KL and with the
teacher's top K next tokens read from the cache, for each K of --ks; per heal the cache's bytes per token on disk and
its build time (one teacher pass over the training windows), the heal's training time, and on the test split the
student's perplexity, top-1 agreement with the teacher and KL(teacher || student) per token (and that KL over the
full-KD heal's).

Each heal's row is written to <out>/rows.json as soon as it is done, and a rerun with the same --out reads the rows
there back instead of healing again (a stopped bench goes on where it stopped). The final evaluation of each heal
leaves out the prefill / decode speed timing unless --speed is given: it is the same for every heal and, on a
shared CPU, costs about as much as a short heal.

    OMP_NUM_THREADS=1 python bench/topk_heal.py --teacher /work/models/smollm2 --data-dir /work/data/wt2_articles \\
        --drop-layers 12,13,14,17,25,26 --seq-len 256 --batch-size 4 --percentage-data 0.1 --steps 20 --ks 16,64,256
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quick import add_quick  # noqa: E402
from models.staging import write_staged  # noqa: E402
from utils import api, session as _session  # noqa: E402
from utils.cli.configs import session_config  # noqa: E402
from utils.cli.parser import common_parser  # noqa: E402
from utils.cli.run import run_main  # noqa: E402
from utils.cli.types import fraction, layer_list, name_list, positive_float, positive_int  # noqa: E402

QUICK = {"seq_len": 16, "batch_size": 8, "steps": 2, "ks": "4,8", "drop_layers": [3], "percentage_data": 1.0}


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="bench/results/topk_heal")
    p.set_defaults(seq_len=256, batch_size=4, device="cpu")
    g = p.add_argument_group("heals")
    g.add_argument("--drop-layers", type=layer_list, default=[12, 13, 14, 17, 25, 26], metavar="I,J,...",
                   help="the student: the teacher without these layers (default: SmolLM2's ShortGPT-6)")
    g.add_argument("--ks", default="16,64,256", help="the K of each top-k heal (comma-separated)")
    g.add_argument("--steps", type=positive_int("--steps"), default=20, help="KD steps of the one epoch of each heal")
    g.add_argument("--lr", type=positive_float, default=1e-4, help="finetune_merged.py's default")
    g.add_argument("--speed", action="store_true", help="also time prefill and decode in each heal's evaluation")
    g.add_argument("--percentage-data", type=fraction, default=0.1,
                   help="the leading fraction of each split (the cache holds every training window of it)")
    add_quick(p, QUICK, "2 steps of windows of 16 at K = 4 and 8 (a tiny --teacher)")
    return p


class EpochTimes(logging.Handler):
    """The training seconds of each epoch, from the loop's 'epoch i/n  train loss ...  12.3s' line."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "utils.training.loop" and str(record.msg).startswith("epoch %d/%d"):
            self.seconds.append(float(record.args[3]))


def heal(s, args, k: int | None) -> dict:
    """One heal (k None: the live teacher's full-vocabulary KL) and its test metrics and times."""
    row: dict = {"k": k or "full"}
    cache_dir = Path(args.out) / "cache"
    if k is not None:
        start = time.perf_counter()
        cache = s.topk_cache(s.sentences("train"), str(cache_dir), k=k, temperature=1.0)
        row.update(cache_build_s=time.perf_counter() - start, bytes_per_token=cache.bytes_per_token(),
                   cache_tokens=int(cache.offsets[-1]))
    times = EpochTimes()
    logging.getLogger("utils.training.loop").addHandler(times)
    start = time.perf_counter()
    try:
        done = api.finetune(s, checkpoints=[], drop_layers=args.drop_layers, out=args.out, cache_dir=cache_dir,
                            run_name=f"heal_{row['k']}", objective=api.FinetuneLoss(teacher_topk=k),
                            train=api.TrainConfig(epochs=1, lr=args.lr, max_steps_per_epoch=args.steps))
    finally:
        logging.getLogger("utils.training.loop").removeHandler(times)
    m = done.evaluation.metrics
    row.update(heal_train_s=sum(times.seconds), finetune_total_s=time.perf_counter() - start,
               perplexity=m["student_perplexity"], teacher_perplexity=m["teacher_perplexity"],
               agreement=m["agreement_top1"], kl=m["kl_teacher_student"])
    return row


def table(rows: list[dict]) -> str:
    full = next(r for r in rows if r["k"] == "full")
    lines = ["| K | bytes/token | cache build s | heal train s | perplexity | agreement | KL | KL / full-KD KL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r.get('bytes_per_token', '-')} | {r.get('cache_build_s', 0):.1f} | "
                     f"{r['heal_train_s']:.1f} | {r['perplexity']:.3f} | {r['agreement']:.4f} | {r['kl']:.4f} | "
                     f"{r['kl'] / full['kl']:.3f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> Path:
    ks = [int(k) for k in name_list(args.ks)]
    s = _session.start(session_config(args))
    if not args.speed:  # the evaluation's speed timing: the same for every heal, not what is compared here
        api.decoder_costs = lambda *a, **kw: {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "rows.json"
    done = {str(r["k"]): r for r in json.loads(done_file.read_text())} if done_file.is_file() else {}
    rows = []
    for k in [None] + ks:
        row = done.get(str(k or "full")) or heal(s, args, k)
        rows.append(row)
        write_staged({done_file: json.dumps(rows + [r for key, r in done.items() if key not in
                                                    {str(x["k"]) for x in rows}], indent=2)})
    result = {"quick": args.quick, "teacher": args.teacher, "drop_layers": args.drop_layers, "steps": args.steps,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "percentage_data": args.percentage_data,
              "train_windows": len(s.sentences("train")), "rows": rows, "argv": sys.argv}
    write_staged({out / "topk_heal.md": table(rows) + "\n", out / "topk_heal.json": json.dumps(result, indent=2)})
    print(table(rows))
    return out / "topk_heal.json"


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
