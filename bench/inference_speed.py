"""Inference speed: a bert-base-shaped teacher vs its compressed variants, at batch 32 x seq 40 by default.

Variants (random teacher weights; the speed does not depend on them), built with the library's own initialisers:
  blocks 4x64   every attention block with 4 heads of 64      (``compress_attention``: kept heads)
  blocks 12x32  every attention block with 12 heads of 32     (``compress_attention``: SVD per head)
  merged 12->6  layer pairs (0,1), (2,3), ... merged into one  (``init_merged_layer``, a full-size layer each)
Every variant is a ``compose`` view sharing the teacher's embeddings and MLM head.

With ``--teacher DIR`` the teacher is a real checkpoint (e.g. the English MLM teacher) and ``--blocks`` picks the
block shapes; ``--onnx`` adds an ONNX Runtime row per model (``models.onnx_export``: the encoder and masked-LM graphs,
each checked against PyTorch, run by onnxruntime's CPU provider with as many threads as torch).

Per model: parameters, analytic FLOPs per token (2 per multiply-add; matmuls and attention only), and the median
latency of ``--repeats`` timed calls after ``--warmup`` untimed ones, under ``torch.inference_mode``. Repeats go
round-robin over the models so that load from other processes falls on all of them alike. Two cases:
  encoder   the last hidden state (what downstream use runs): the headline number and the target
  MLM       the encoder plus the masked-LM head's logits at every position (a 30522-way output per token)

    python bench/inference_speed.py                              # CPU, fp32
    python bench/inference_speed.py --device cuda --dtype bf16 --repeats 30
    python bench/inference_speed.py --teacher ../shared/models/minilm-mlm-wikitext2 --blocks 4x32 6x32 --onnx
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quick import add_quick  # noqa: E402
from bench.retrain_throughput import TINY_BERT, random_bert  # noqa: E402
from models import BertForMaskedLM, LayerSpec, ModelConfig, SwappableModel, load_teacher  # noqa: E402
from models.compress import compose, compress_attention, init_merged_layer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ORT = " [ONNX Runtime]"


def merged_name(teacher: SwappableModel) -> str:
    n = len(teacher.layers)
    return f"merged {n}->{n - n // 2}"


TARGET_SPEEDUP = 1.8  # the merged model's encoder throughput vs the teacher's, on CPU


def build_variants(teacher: BertForMaskedLM, block_shapes: tuple[tuple[int, int], ...] = ((4, 64), (12, 32))
                   ) -> dict[str, BertForMaskedLM]:
    cfg = teacher.config
    out = {"teacher": teacher}
    for heads, head_dim in block_shapes:
        blocks = {i: compress_attention(layer.attention, cfg, num_heads=heads, head_dim=head_dim)[0]
                  for i, layer in enumerate(teacher.layers)}
        out[f"blocks {heads}x{head_dim}"] = compose(teacher, blocks=blocks)
    merges = {}
    for i in range(0, len(teacher.layers) - 1, 2):
        spec = LayerSpec(cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size, [i, i + 1], "merged")
        merges[i] = (init_merged_layer(cfg, spec, teacher.layers[i], second=teacher.layers[i + 1], mode="first")[0],
                     spec)
    out[merged_name(teacher)] = compose(teacher, merges=merges)
    return {k: m.eval() for k, m in out.items()}


def encoder_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Matmul FLOPs per token of all encoder layers: q/k/v/output projections, scores and mixing, feed-forward."""
    D, total = cfg.hidden_size, 0
    for s in cfg.layers:
        inner = s.num_heads * s.head_dim
        total += 2 * D * inner * 4  # q, k, v (D -> inner) and output (inner -> D)
        total += 2 * 2 * seq_len * inner  # q.k over seq_len keys, and probs @ v
        total += 2 * 2 * D * s.intermediate_size  # feed-forward up and down
    return total


def head_flops_per_token(cfg: ModelConfig) -> int:
    """MLM head per token: transform (D -> D) and decoder (D -> vocab)."""
    return 2 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size * cfg.vocab_size


def encoder_parameters(model: SwappableModel) -> int:
    return sum(p.numel() for p in model.layers.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_round_robin(runners: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
                     ) -> dict[str, list[float]]:
    """Seconds per call for each runner; each round calls every runner once."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(warmup + repeats):
        for name, run in runners.items():
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def onnx_sessions(models: dict[str, BertForMaskedLM], folder: Path, threads: int, with_mlm: bool) -> dict:
    """{(name, case): onnxruntime session} for each model's encoder (and masked-LM) graph, parity-checked."""
    import onnxruntime as ort

    from models.onnx_export import export_onnx

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sessions = {}
    for i, (name, m) in enumerate(models.items()):
        print(f"exporting {name} to ONNX ...", flush=True)
        done = export_onnx(m.float(), folder / f"model{i}.onnx")
        graphs = {"encoder": done["encoder"][0]}
        if with_mlm:
            graphs["MLM"] = done["masked-LM"][0]
        for case, path in graphs.items():
            sessions[name, case] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sessions


# --quick: the tiny teacher of retrain_throughput.py (4 heads of 8) and its variants, a small batch, two repeats
QUICK = {"batch_size": 4, "seq_len": 8, "repeats": 2, "blocks": ["2x8", "4x4"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_quick(ap, QUICK, f"a random tiny teacher ({TINY_BERT['num_hidden_layers']} layers x "
                         f"{TINY_BERT['hidden_size']}), batch 4 x seq 8, 2 repeats (not a measurement)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per model and case (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per model and case first")
    ap.add_argument("--skip-mlm", action="store_true", help="time the encoder only")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", default=None, help="a real checkpoint (default: a random bert-base-shaped BERT)")
    ap.add_argument("--blocks", nargs="+", default=["4x64", "12x32"], metavar="HxD",
                    help="block-retrained variants: every attention block with H heads of D")
    ap.add_argument("--onnx", action="store_true", help="also time each model with ONNX Runtime (CPU, fp32)")
    ap.add_argument("--json", type=Path, default=None, help="default: bench/results/inference_speed_<device>.json")
    args = ap.parse_args(argv)
    for flag in ("batch_size", "seq_len", "repeats"):
        if getattr(args, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be positive")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    try:
        shapes = tuple(tuple(int(v) for v in b.lower().split("x")) for b in args.blocks)
        assert all(len(t) == 2 and min(t) > 0 for t in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--blocks takes HxD pairs such as 4x32, got {args.blocks}")
    if args.onnx and (args.device != "cpu" or args.dtype != "fp32"):
        ap.error("--onnx times ONNX Runtime's CPU provider in fp32: use --device cpu --dtype fp32")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    teacher = load_teacher(args.teacher, device)[0] if args.teacher else random_bert(device, tiny=args.quick)
    models = build_variants(teacher, shapes)
    merged = merged_name(teacher)
    for m in models.values():
        m.to(DTYPES[args.dtype])  # shared modules are cast once per view; all end up in the same dtype
    B, T = args.batch_size, args.seq_len
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1000, models["teacher"].config.vocab_size, (B, T), generator=gen).to(device)
    att = torch.ones(B, T, dtype=torch.long, device=device)
    cases = [("encoder", False)] + ([] if args.skip_mlm else [("MLM", True)])
    tmp = tempfile.TemporaryDirectory(prefix="onnx_bench_")
    sessions = onnx_sessions(models, Path(tmp.name), torch.get_num_threads(), not args.skip_mlm) if args.onnx else {}
    feed = {"input_ids": ids.cpu().numpy(), "token_type_ids": torch.zeros_like(ids).cpu().numpy(),
            "attention_mask": att.cpu().numpy()}
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or platform.machine())
    print(f"device {device} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.dtype}, batch {B} x seq {T}, median of {args.repeats} after {args.warmup} warm-up, round-robin",
          flush=True)

    timings = {}
    for case, with_logits in cases:
        print(f"timing {case} ...", flush=True)
        runners: dict[str, Callable[[], object]] = {}
        for name, m in models.items():
            runners[name] = lambda m=m, w=with_logits: m(ids, att, with_logits=w)
            if (name, case) in sessions:
                runners[name + ORT] = lambda s=sessions[name, case]: s.run(None, feed)
        timings[case] = time_round_robin(runners, args.warmup, args.repeats, device)
    tmp.cleanup()

    rows = {}
    for name in timings[cases[0][0]]:
        cfg = models[name.removesuffix(ORT)].config
        m = models[name.removesuffix(ORT)]
        enc, head = encoder_flops_per_token(cfg, T), head_flops_per_token(cfg)
        rows[name] = {"layers": len(cfg.layers), "parameters": m.num_parameters(),
                      "encoder_parameters": encoder_parameters(m), "encoder_flops_per_token": enc,
                      "head_flops_per_token": head, "plan": cfg.describe()}
        for case, _ in cases:
            lat = statistics.median(timings[case][name])
            rows[name][case] = {"latency_s": lat, "latency_runs_s": timings[case][name],
                                "sentences_per_s": B / lat, "tokens_per_s": B * T / lat}
    for name, r in rows.items():
        base = rows["teacher" + (ORT if name.endswith(ORT) else "")]  # speed-up within the same runtime
        for case, _ in cases:
            flops = r["encoder_flops_per_token"] + (r["head_flops_per_token"] if case == "MLM" else 0)
            base_flops = base["encoder_flops_per_token"] + (base["head_flops_per_token"] if case == "MLM" else 0)
            r[case]["speedup"] = base[case]["latency_s"] / r[case]["latency_s"]
            r[case]["speedup_vs_pytorch_teacher"] = rows["teacher"][case]["latency_s"] / r[case]["latency_s"]
            r[case]["flop_ratio"] = base_flops / flops

    print("\n| model | layers | params (M) | encoder params (M) | encoder MFLOP/token | MLM head MFLOP/token |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        if name.endswith(ORT):
            continue
        print(f"| {name} | {r['layers']} | {r['parameters'] / 1e6:.1f} | {r['encoder_parameters'] / 1e6:.1f} | "
              f"{r['encoder_flops_per_token'] / 1e6:.1f} | {r['head_flops_per_token'] / 1e6:.1f} |")
    for case, _ in cases:
        what = ("encoder only: last hidden state, what downstream use runs" if case == "encoder"
                else "encoder + MLM logits at every position")
        print(f"\n{case} ({what}), batch {B} x seq {T}, {args.dtype} on {device}")
        print("| model | latency ms | sentences/s | tokens/s | speedup | FLOP ratio | speedup / FLOP ratio | "
              "vs PyTorch teacher |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in rows.items():
            c = r[case]
            print(f"| {name} | {c['latency_s'] * 1e3:.1f} | {c['sentences_per_s']:.1f} | {c['tokens_per_s']:.0f} | "
                  f"{c['speedup']:.2f}x | {c['flop_ratio']:.2f}x | {c['speedup'] / c['flop_ratio']:.2f} | "
                  f"{c['speedup_vs_pytorch_teacher']:.2f}x |")
        if sessions:
            print("(speedup: vs the teacher in the same runtime; ONNX Runtime rows run the exported graphs)")
    merged_speedup = rows[merged]["encoder"]["speedup"]
    met = merged_speedup >= TARGET_SPEEDUP if device.type == "cpu" and not (args.teacher or args.quick) else None
    verdict = (f"{'met' if met else 'MISSED'}" if met is not None
               else "judged only for the bert-base-shaped teacher on CPU")
    print(f"\n{merged} encoder throughput vs teacher: {merged_speedup:.2f}x "
          f"(target >= {TARGET_SPEEDUP}x on CPU: {verdict})")

    result = {"benchmark": "inference_speed", "device": str(device), "device_name": device_name,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
              "batch_size": B, "seq_len": T, "repeats": args.repeats, "warmup": args.warmup, "models": rows,
              "teacher": args.teacher or f"random {'tiny' if args.quick else 'bert-base-shaped'}",
              "onnxruntime": _ort_version() if args.onnx else None,
              "merged_encoder_speedup": merged_speedup, "target": TARGET_SPEEDUP, "target_met": met}
    path = args.json or ROOT / "bench" / "results" / f"inference_speed_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"written {path}")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
