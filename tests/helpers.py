"""What the tests share: tiny teachers and corpora built on the fly, scripts run in-process or in subprocesses,
a toy task for the training loop, and loading an export in a clean process. No test file imports another."""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# what a run logs once it has read a split ("train: 48 sentences (...)", "test: 3 windows of 16 tokens ..."): absent
# from the output of a run refused at start-up
DATA_READ = re.compile(r"\d sentences|windows of \d+ tokens")

NOUNS = "cat dog bird lobster river city king queen ship song army garden".split()
ADJS = "small large red blue old young quiet famous".split()
VERBS = "sees follows likes builds finds carries".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}"
        if rng.random() < 0.5:
            s += f" near the {rng.choice(ADJS)} {rng.choice(NOUNS)}"
        out.append(s + " .")
    return out


def make_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + sorted(set(NOUNS + ADJS + VERBS + ["the", "near", ".", ","])) + ["##s", "##ed"]
    vf = folder / "vocab.txt"
    vf.write_text("\n".join(vocab) + "\n")
    # transformers 5 renamed vocab_file= to vocab=
    key = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tok = BertTokenizerFast(**{key: str(vf)})
    tok.save_pretrained(str(folder))
    return tok


def make_hf_teacher(folder: Path, layers: int = 2, hidden: int = 32, heads: int = 4, ffn: int = 64,
                    with_head: bool = True, seed: int = 0, vocab_size: int | None = None, **config_kwargs) -> Path:
    """``config_kwargs`` go to BertConfig as they are (e.g. hidden_dropout_prob=0.0)."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=ffn,
                     **{"max_position_embeddings": 64, **config_kwargs})
    model = (BertForMaskedLM if with_head else BertModel)(cfg)
    # random init leaves LayerNorms at identity and biases at 0; perturb so the parity tests exercise every weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(str(folder))
    return folder


CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "user", "assistant"]
# SmolLM2-Instruct's template (ChatML) without its default system turn
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_decoder_tokenizer(folder: Path, chat: bool = False):
    """A word-level tokenizer over the corpus words (what a decoder teacher folder needs besides its weights); with
    ``chat``, also ChatML's turn tokens, a chat template and <|im_end|> as its eos token (an instruct teacher's)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted(set(NOUNS + ADJS + VERBS + ["the", "near", ".", ","]))
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + words + (CHAT_TOKENS if chat else []))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if chat:
        backend.add_special_tokens([AddedToken(t, special=True) for t in CHAT_TOKENS[:2]])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  eos_token="<|im_end|>" if chat else "</s>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return tok


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_bpe_tokenizer(folder: Path):
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2, Llama 3 and Qwen2 have) trained on the corpus sentences,
    with chat special tokens and a chat template: what a GGUF export carries over to llama.cpp."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(make_sentences(400, seed=7), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", additional_special_tokens=specials[1:])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return tok


DECODERS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}


def make_decoder_teacher(folder: Path, model_type: str = "llama", layers: int = 4, hidden: int = 48, heads: int = 6,
                         kv_heads: int = 2, ffn: int = 64, seed: int = 0, chat: bool = False, tokenizer: str = "word",
                         **config_kwargs) -> Path:
    """A tiny random Llama-family teacher (``model_type`` llama, qwen2 or mistral) with a word-level tokenizer
    (``tokenizer`` "bpe": a byte-level BPE one); ``config_kwargs`` go to the transformers config as they are
    (rope_scaling, tie_word_embeddings, ...). ``chat``: an instruct teacher's tokenizer (``make_decoder_tokenizer``),
    <|im_end|> its eos in generation_config.json."""
    import transformers

    tok = make_bpe_tokenizer(folder) if tokenizer == "bpe" else make_decoder_tokenizer(folder, chat=chat)
    if chat:
        config_kwargs = {"eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"), **config_kwargs}
    torch.manual_seed(seed)
    cfg_name, model_name = DECODERS[model_type]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=len(tok) + 8, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=ffn, **{"max_position_embeddings": 128, **config_kwargs})
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():  # random init leaves norms at one and biases at zero: perturb so parity covers them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(str(folder))
    return folder


def write_corpus(folder: Path, n_train: int = 192, n_valid: int = 48, n_test: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("valid", n_valid, 2), ("test", n_test, 3)):
        (folder / f"{name}.txt").write_text("\n".join(make_sentences(n, seed)) + "\n")
    return folder


def write_lm_eval_tasks(folder: Path) -> Path:
    """lm-eval YAML tasks over local JSON files (nothing from the Hub): ``tiny_text`` (loglikelihood_rolling: word
    and byte perplexity, bits per byte), ``tiny_mc`` (multiple choice: acc, acc_norm), ``tiny_gen`` (generate_until:
    exact match), ``tiny_missing`` (its data file does not exist)."""
    folder.mkdir(parents=True, exist_ok=True)
    sentences = make_sentences(40, seed=11)
    data = {
        "text": [{"text": " ".join(sentences[i:i + 8])} for i in range(0, 40, 8)],
        "mc": [{"question": " ".join(s.split()[:3]), "choices": [" ".join(s.split()[3:]), " ".join(o.split()[3:])],
                "label": 0} for s, o in zip(sentences, reversed(sentences))][:12],
        "gen": [{"prompt": " ".join(s.split()[:3 + i % 3]), "answer": " ".join(s.split()[3 + i % 3:])}
                for i, s in enumerate(sentences[:6])],  # prompts of 3 to 5 words: a batch of them is padded
    }
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {file}\ntest_split: test\n"

    def metrics(*rows: tuple[str, str, str]) -> str:
        return "metric_list:\n" + "".join(f"  - metric: {m}\n    aggregation: {agg}\n    higher_is_better: {better}\n"
                                          for m, agg, better in rows)

    ppl = [(m, "weighted_perplexity", "false") for m in ("word_perplexity", "byte_perplexity")]
    tasks = {
        "tiny_text": ("text", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                      + metrics(*ppl, ("bits_per_byte", "bits_per_byte", "false"))),
        "tiny_mc": ("mc", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                    "doc_to_target: label\n" + metrics(("acc", "mean", "true"), ("acc_norm", "mean", "true"))),
        "tiny_gen": ("gen", 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                     'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n  do_sample: false\n'
                     + metrics(("exact_match", "mean", "true"))),
        "tiny_missing": ("missing", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                         'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n' + metrics(("acc", "mean", "true"))),
    }
    for task, (data_name, body) in tasks.items():
        head = f"task: {task}\n" + common.format(file=folder / f"{data_name}.jsonl")
        (folder / f"{task}.yaml").write_text(head + body)
    return folder


def installed_model(package_dir: str) -> Path | None:
    p = Path(sysconfig.get_paths()["purelib"]) / package_dir
    return p if (p / "config.json").is_file() else None


def run_in_process(module, argv: list[str]) -> int:
    """A script module's main through run_main in this process: the exit code ``python script.py argv`` gives."""
    from utils.cli.run import run_main

    parser = module.build_parser()
    main = module.main
    if main.__code__.co_argcount == 2:
        return run_main(lambda a: main(a, parser), parser, argv)
    return run_main(main, parser, argv)


# ---- scripts in subprocesses and in-process ----
def script_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra)
    return env


def script_cmd(script: str, *args) -> list[str]:
    head = [sys.executable, "-m", script] if not script.endswith(".py") else [sys.executable, str(ROOT / script)]
    return head + [str(a) for a in args]


def run_script(script: str, *args, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(script_cmd(script, *args), cwd=ROOT, env=script_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def run_parallel(jobs: list[tuple[str, list]], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Several short script runs at once (each mostly waits on imports)."""
    procs = [(subprocess.Popen(script_cmd(s, *a), cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True), s, a) for s, a in jobs]
    out = []
    for p, s, a in procs:
        so, se = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(script_cmd(s, *a), p.returncode, so, se))
    return out


def last_line(text: str) -> str:
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def restored_logging():
    """Scripts run in-process point the root logger at the (captured) stderr of the moment: undo that after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def in_process(module_name: str, argv: list[str], capsys) -> tuple[int, str]:
    """A script's main through run_main in this process: (exit code, stderr); argparse errors give their code."""
    import importlib

    with restored_logging():
        try:
            code = run_in_process(importlib.import_module(module_name), argv)
        except SystemExit as e:  # argparse errors
            code = e.code
    return code, capsys.readouterr().err


def common_args(teacher, corpus) -> list[str]:
    """Teacher, corpus, CPU and a small batch: the start of most in-process script command lines."""
    return ["--teacher", str(teacher), "--data-dir", str(corpus), "--device", "cpu", "--batch-size", "16"]


def data_args(teacher: Path, corpus: Path) -> list:
    return ["--teacher", teacher, "--data-dir", corpus, "--device", "cpu"]


def assert_clean_failure(r: subprocess.CompletedProcess, code: int = 1, *needles: str) -> str:
    """Non-zero exit with one 'error: ...' line naming the problem, no traceback, no claim of results."""
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "results written to" not in r.stdout
    err = last_line(r.stderr)
    assert err.startswith("error:") or (code == 2 and ": error:" in err), err
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-2000:])
    return err


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- a toy task for the training loop's failure paths ----
class Toy(nn.Module):
    """Linear regression; can poison the loss (NaN) or only the gradient (finite loss, NaN weights) at a call."""

    def __init__(self, nan_loss_at: int | None = None, nan_grad_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)
        self.nan_loss_at, self.nan_grad_at, self.calls = nan_loss_at, nan_grad_at, 0
        g = torch.Generator().manual_seed(1)
        self.valid = {"x": torch.randn(16, 4, generator=g), "y": torch.randn(16, generator=g)}

    def forward(self, batch):
        self.calls += 1
        loss = ((self.lin(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        if self.calls == self.nan_loss_at:
            loss = loss * float("nan")
        if self.calls == self.nan_grad_at:
            w = self.lin.weight  # sqrt at 0: the loss stays finite, its gradient is 0 * inf = NaN
            loss = loss + torch.sqrt(((w - w.detach()) ** 2).sum())
        return loss, {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"toy/loss": float(((self.lin(self.valid["x"]).squeeze(-1) - self.valid["y"]) ** 2).mean())}


STEPS = 4  # batches per toy epoch


def toy_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, generator=g)} for _ in range(STEPS)]


def toy_trainer(run_dir: Path, task: Toy | None = None, epochs: int = 3, name: str = "toy", resume: bool = False,
                force: bool = False, **meta) -> tuple["Trainer", Toy]:
    from utils.training.loop import TrainConfig, Trainer, Unit

    task = task or Toy()
    unit = Unit(name, task.lin, run_dir / name,
                {"kind": "block", "teacher_hash": "teacher-a", "num_heads": 1, "head_dim": 4, "hidden_size": 4,
                 "layer": 0, **meta})
    cfg = TrainConfig(epochs=epochs, lr=1e-2, warmup=0.0, seed=0, resume=resume, force=force)
    return Trainer(task, [unit], cfg, run_dir=run_dir, device=torch.device("cpu"), evaluate=task.evaluate), task


def all_finite(sd: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in sd.values())


def flip_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) - 100] ^= 0xFF  # a byte of tensor data: only the checksum can tell
    p.write_bytes(bytes(b))


# ---- exports loaded in a clean process ----
SENTENCE = "the small cat sees the [MASK] ."

LOADER = r'''
import importlib.util, json, sys
import torch
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("utils") is None, sys.path
from transformers import AutoModel, AutoModelForMaskedLM, pipeline
cases, sentence = json.loads(sys.argv[1]), sys.argv[2]
report = {}
for name, c in cases.items():
    x = torch.load(c["inputs"])
    remote = c["remote"]
    if c["mlm"]:
        m = AutoModelForMaskedLM.from_pretrained(c["dir"], trust_remote_code=remote).eval()
        with torch.no_grad():
            out = m(input_ids=x["ids"], attention_mask=x["mask"]).logits
        fill = pipeline("fill-mask", model=c["dir"], trust_remote_code=remote)(sentence, top_k=3)
        report[name] = {"class": type(m).__name__, "fill": [f["token"] for f in fill]}
    else:
        m = AutoModel.from_pretrained(c["dir"], trust_remote_code=remote).eval()
        with torch.no_grad():
            out = m(input_ids=x["ids"], attention_mask=x["mask"]).last_hidden_state
        report[name] = {"class": type(m).__name__}
    torch.save(out, c["out"])
print("REPORT " + json.dumps(report))
'''


DECODER_LOADER = r'''
import importlib.util, json, sys
import torch
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("utils") is None, sys.path
from transformers import AutoModelForCausalLM
cases = json.loads(sys.argv[1])
report = {}
for name, c in cases.items():
    x = torch.load(c["inputs"])
    m = AutoModelForCausalLM.from_pretrained(c["dir"], trust_remote_code=c["remote"]).eval()
    with torch.no_grad():
        logits = m(input_ids=x["ids"], attention_mask=x["mask"]).logits
        gen = m.generate(x["prompt"], max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.save({"logits": logits, "generated": gen}, c["out"])
    report[name] = {"class": type(m).__name__}
print("REPORT " + json.dumps(report))
'''


def load_decoders_elsewhere(cases: dict, tmp: Path) -> dict:
    """DECODER_LOADER in a fresh process (as ``load_elsewhere``): each case's folder loaded with
    AutoModelForCausalLM, its logits and 10 greedy tokens (transformers' generate and cache) saved to the case's
    ``out``; returns the report (the class loaded, per case)."""
    cwd = tmp / "elsewhere_decoders"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf_home"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", DECODER_LOADER, json.dumps(cases)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(l for l in run.stdout.splitlines() if l.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def perturb(model, seed: int = 0):
    """Random-init LayerNorms are identity and biases 0: move them so every weight is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def load_elsewhere(cases: dict, tmp: Path) -> subprocess.CompletedProcess:
    """LOADER in a fresh process, from a folder outside the repository and with PYTHONPATH cleared, so that only
    the exported files (and transformers) can be imported; it must succeed."""
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf_home"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases), SENTENCE], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def model_inputs(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return {"ids": ids, "mask": mask}


# ---- issue 21's cache and export cases (also run in subprocesses) ----
def tiny_cache(teacher_dir: Path, root: Path, sentences: int = 40):
    """A TeacherCache of the tiny teacher over a few tokenised sentences."""
    from models import load_teacher, weights_hash
    from utils.storage.features import TeacherCache

    teacher, tok = load_teacher(teacher_dir)
    ids = [tok(s)["input_ids"] for s in make_sentences(sentences, seed=5)]
    return TeacherCache(root, teacher, teacher_hash=weights_hash(teacher), token_ids=ids,
                        tokenizer_name=str(teacher_dir), seq_len=40)


def compact_student(teacher_dir: Path):
    """The tiny teacher with 2 of the 4 heads in layer 0: a CompactBERT export."""
    from models import load_teacher
    from models.compress import clone_model, compose, compress_attention

    teacher, tok = load_teacher(teacher_dir)
    blocks = {0: compress_attention(teacher.layers[0].attention, teacher.config, num_heads=2, head_dim=8)[0]}
    return clone_model(compose(teacher, blocks=blocks)).eval(), tok


# ---- issue 33: decoder students for llama.cpp and the Nemotron-NAS layout ----
def heterogeneous_units(ffn: int) -> dict:
    """Units of a 6-layer teacher of 6 query heads over 2 KV heads of 8 and SwiGLU ``ffn``: one of every kind a
    decoder student has (layer 5 is the teacher's)."""
    from models import LayerSpec

    return {
        0: LayerSpec(6, 8, ffn, [0], "block", attention="gqa", num_kv_heads=1),  # multi-query
        1: LayerSpec(0, 0, ffn, [1], "layer", attention="none"),  # attention-free
        2: LayerSpec(0, 0, ffn, [2], "block", attention="linear"),  # linear attention
        3: LayerSpec(6, 8, ffn // 2, [3], "pruned", attention="gqa", num_kv_heads=2),  # narrower FFN
        4: LayerSpec(0, 0, 0, [4], "dropped", attention="none"),  # dropped
    }


def decoder_student(teacher, units: dict, seed: int = 0):
    """The decoder ``teacher`` with ``units`` (layer index -> LayerSpec; kind "block": a new attention block, random
    when its head size is not the teacher's; else a whole layer) in place of its layers, every weight moved off its
    initial value."""
    from models.compress import clone_model, compose, init_attention, init_merged_layer

    cfg, t = teacher.config, teacher.layers
    init = {i: "random" if s.head_dim not in (0, cfg.head_dim) else "teacher" for i, s in units.items()}
    blocks = {i: init_attention(t[i].block, cfg, s, init=init[i])[0] for i, s in units.items() if s.kind == "block"}
    layers = {i: (init_merged_layer(cfg, s, t[i], mode="first")[0], s) for i, s in units.items() if s.kind != "block"}
    student = clone_model(compose(teacher, blocks=blocks, layers=layers)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student


LLAMA_CPP_CONVERT = """
import sys
root, folder, out, outtype = sys.argv[1:]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
import conversion.deci as deci
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # a tiny tokenizer is in no table of hashes
def no_sentencepiece(self):
    raise FileNotFoundError("a byte-level BPE tokenizer")
base.TextModel._set_vocab_sentencepiece = no_sentencepiece
deci.DeciModel.set_vocab = base.TextModel._set_vocab_gpt2  # its vocabulary step sent down the GPT-2 BPE path
sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", outtype]
import runpy
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def llama_cpp_convert(folder: Path, out: Path, outtype: str = "f32") -> Path:
    """``folder`` turned into a GGUF by llama.cpp's own convert_hf_to_gguf.py (the source tree LLAMA_CPP_DIR names;
    the test skips without it), in a subprocess."""
    import pytest

    root = os.environ.get("LLAMA_CPP_DIR")
    if not root or not Path(root, "convert_hf_to_gguf.py").is_file():
        pytest.skip("set LLAMA_CPP_DIR to a llama.cpp source tree to convert with its convert_hf_to_gguf.py")
    subprocess.run([sys.executable, "-c", LLAMA_CPP_CONVERT, root, str(folder), str(out), outtype], check=True,
                   capture_output=True, env=script_env(), timeout=240)
    return out


def llama_cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    """llama.cpp's next-token logits [len(ids), vocab] of ``ids`` (a llama_cpp.Llama with logits_all=True)."""
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[:len(ids)])


def llama_cpp_greedy(llm, ids: list[int], steps: int) -> list[int]:
    """``ids`` and ``steps`` greedy tokens after them, decoded by llama.cpp with its KV cache."""
    llm.reset()
    out = list(ids)
    llm.eval(out)
    for _ in range(steps):
        out.append(int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax()))
        llm.eval(out[-1:])
    return out


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """Perplexity of ``ids`` under next-token ``logits`` [len(ids), vocab]."""
    target = torch.tensor(ids[1:])
    return math.exp(float(torch.nn.functional.cross_entropy(logits[:-1].double(), target)))


def llama_cpp_model(path: Path):
    """llama_cpp.Llama on a GGUF file (every position's logits, one thread); the test skips without
    llama-cpp-python."""
    import pytest

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                        "llama-cpp-python==0.3.36)")
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_threads=1, n_ctx=128, n_batch=128,
                           vocab_only=False, verbose=False)


def check_runs_as_ours(llm, model, ids: list[int]) -> None:
    """llama.cpp (``llm``) runs ``model`` as we do on ``ids``: next-token logits within 1e-3 of ours relative to
    their scale, perplexity within 0.5%, and the 32 greedy tokens after the first 6 ids equal."""
    theirs = llama_cpp_logits(llm, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    assert float((theirs - ours).abs().max() / ours.abs().max()) <= 1e-3
    assert abs(perplexity(theirs, ids) / perplexity(ours, ids) - 1) <= 0.005
    prompt = ids[:6]
    assert llama_cpp_greedy(llm, prompt, 32) == model.generate(torch.tensor([prompt]), 32)[0].tolist()


def small_map(teacher: Path, corpus: Path, out: Path, options: tuple[str, ...] = ("kv", "drop")) -> None:
    """A sensitivity map of ``options`` units (default kv and drop) for a tiny ``teacher`` on the tiny corpus, made
    in seconds (one training step a unit, two timings)."""
    from utils import api

    api.sensitivity_map(api.SessionConfig(teacher=str(teacher), device="cpu",
                                          data=api.DataConfig(data_dir=str(corpus), seq_len=16, batch_size=8)),
                        config=api.MapConfig(options=options, max_train_sentences=32, eval_sentences=16,
                                             valid_batches=1, latency_reps=2, latency_batch=1),
                        train=api.TrainConfig(epochs=1, max_steps_per_epoch=1), out=out)


def small_bench_args(teacher: Path, corpus: Path, out: Path) -> list[str]:
    """``bench/plans.py`` arguments for a tiny decoder ``teacher`` and the ``small_map`` in ``out``/map: run "b" in
    ``out``, one training step a unit, no heal, no untrained students, two timings; add the targets."""
    return ["--teacher", str(teacher), "--data-dir", str(corpus), "--out", str(out), "--run-name", "b",
            "--map", str(out / "map"), "--seq-len", "16", "--batch-size", "8", "--device", "cpu", "--epochs", "1",
            "--max-steps-per-epoch", "1", "--latency-reps", "2", "--latency-batch", "1", "--max-train-sentences",
            "32", "--ft-epochs", "0", "--no-untrained"]
