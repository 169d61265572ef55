"""The flag groups several scripts share beyond the common ones: a unit's shape, exports, the sensitivity map, the
fine-tune of a planned student."""
from __future__ import annotations

import argparse

from ..planning.planner import RETIME_ROUNDS, SPEED_MARGIN
from ..planning.runtimes import RUNTIMES
from ..planning.sensitivity import DECODER_OPTION_KINDS, OPTION_KINDS
from models import kinds
from models.gguf_export import GGUF_TYPES
from models.nemotron_nas import HF_LAYOUTS
from .types import (EvalTexts, eval_text, int_list, layer_list, name_list, non_negative_float, non_negative_int,
                    option_kinds, positive_float, positive_int)


def add_shape_args(group: argparse._ActionsContainer, ffn: bool = False) -> None:
    """The flags that give a unit's attention shape (and feed-forward size with ``ffn``): a ``UnitShape``.
    ``--attention`` and each kind's own flag come from the kinds' records (``models.kinds``)."""
    group.add_argument("--block-heads", type=positive_int("--block-heads"), default=None,
                       help="heads of the new unit (default: the teacher's)")
    group.add_argument("--block-d-k", "--head-dim", type=positive_int("--block-d-k"), default=None,
                       help="per-head dimension d_k of the new unit (default: the teacher's)")
    group.add_argument("--attention", choices=list(kinds.KINDS), default=None,
                       help="the kind of attention of the new unit (default: the teacher's, or the kind whose own "
                            "flag is given): " + "; ".join(f"{k.name}: {k.summary}" for k in kinds.KINDS.values()))
    for kind in kinds.KINDS.values():
        if kind.flag is not None:
            group.add_argument(kind.flag.name, dest=kind.flag.field, type=positive_int(kind.flag.name), default=None,
                               help=f"{kind.flag.help} (selects --attention {kind.name})")
    if ffn:
        group.add_argument("--ffn-dim", type=non_negative_int("--ffn-dim"), default=None,
                           help="feed-forward width of the new unit (default: the teacher's; 0: none)")


def add_sharding_args(p: argparse.ArgumentParser) -> None:
    """--fsdp, --dtype, --activation-checkpointing: the whole-model training of a heal at 8B / 70B (the scripts that
    train a whole model; block and pair jobs train one small unit each and have none of these)."""
    g = p.add_argument_group("sharded training (whole models; under torchrun)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the student, its gradients and AdamW state, and the frozen teacher over the processes "
                        "of torchrun with FSDP2 (fully_shard per layer and on the root; gloo on CPU, NCCL on GPUs) "
                        "instead of DistributedDataParallel; resume points are sharded (torch.distributed.checkpoint) "
                        "and resume on any number of processes; last / best stay one consolidated model")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="with --fsdp on GPUs: bf16 forward and backward, gradients reduced and master weights and "
                        "AdamW state kept in fp32 (refused on CPU, where --fsdp trains in fp32)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each student layer's input in the forward pass and recompute the rest in the "
                        "backward (less activation memory, about a third more compute; with or without --fsdp)")


def add_eval_text_arg(g: argparse._ActionsContainer) -> None:
    """--eval-text NAME=PATH (repeatable): named texts scored like the test split, each on its own."""
    g.add_argument("--eval-text", type=eval_text, action=EvalTexts, default=[], metavar="NAME=PATH",
                   help="also score this text like the test split (repeatable; a file, a folder of .txt/.md/.rst/.py "
                        "files or a JSONL of {\"text\": ...}; a decoder reads its documents in order as token "
                        "windows, a masked LM its sentences); per NAME in the table, results.json and tensorboard")


def add_eval_text_items_arg(g: argparse._ActionsContainer) -> None:
    """--eval-text-items N: a bench's budget on each --eval-text (``TokenWindows.first``,
    ``TokenizedSentences.first``)."""
    g.add_argument("--eval-text-items", type=positive_int("--eval-text-items"), default=None, metavar="N",
                   help="score each --eval-text on its first N items in text order: a decoder's token windows, a "
                        "masked LM's sentences (budget; default all)")


def add_export_args(p: argparse._ActionsContainer) -> None:
    """--export-hf / --export-onnx / --export-gguf: an ``ExportConfig``."""
    p.add_argument("--export-hf", default=None, metavar="DIR",
                   help="also write the model as a Hugging Face folder: plain BertForMaskedLM when every layer keeps "
                        "the teacher's attention shape, else CompactBERT (load with trust_remote_code=True)")
    p.add_argument("--hf-layout", choices=list(HF_LAYOUTS), default="auto",
                   help="layout of --export-hf: auto (the plain class when every layer keeps the teacher's shape, "
                        "else our remote code), or nemotron-nas (a decoder as DeciLMForCausalLM with per-layer "
                        "block_configs: what vLLM, TensorRT-LLM and llama.cpp's converter read)")
    p.add_argument("--export-onnx", default=None, metavar="FILE",
                   help="also write ONNX graphs: the LM graph to FILE and the encoder (hidden states) to "
                        "<FILE stem>_encoder<FILE suffix> beside it, each checked against the PyTorch model with ONNX "
                        "Runtime and logged when written; an existing file at either name must be an ONNX model "
                        "(it is replaced), anything else is refused at start-up")
    p.add_argument("--export-gguf", default=None, metavar="FILE",
                   help="also write a decoder as a GGUF file for llama.cpp: the plain llama / qwen2 architecture when "
                        "every layer keeps the teacher's shape, else deci (per-layer heads, KV heads, FFN widths); "
                        "a unit llama.cpp cannot run as trained is refused before anything is written")
    add_gguf_type_arg(p, default="f16", what="the type of --export-gguf")


def add_gguf_type_arg(p: argparse._ActionsContainer, *, default: str, what: str) -> None:
    """--gguf-type: how a GGUF file stores its matrices (``what`` says which files)."""
    p.add_argument("--gguf-type", choices=list(GGUF_TYPES), default=default,
                   help=f"{what}: how the GGUF stores its matrices (vectors stay f32; q8_0 rows that do not split "
                        "into blocks of 32 stay f16)")


def add_map_args(p: argparse.ArgumentParser) -> None:
    """Flags of the map (also the planner's when it builds the map itself)."""
    g = p.add_argument_group("map")
    g.add_argument("--options", type=option_kinds, default=None,
                   help=f"which kinds of option to map; a masked LM's: {','.join(OPTION_KINDS)} (combined: fewer heads "
                        "and a narrower FFN in one layer or merged pair, for budgets beyond one option per layer); a "
                        f"decoder's: {','.join(DECODER_OPTION_KINDS)} (kv: one key/value head; heads: fewer query "
                        "heads; linear: attention as one linear map; ffn: 3/4, 1/2, 1/4 of the FFN; no_attention: "
                        "attention removed, with the whole or half the FFN; drop: the layer removed; merge: with the "
                        "next layer) (default: all of the teacher's task)")
    g.add_argument("--heads-set", type=int_list, default=None,
                   help="head counts to map, e.g. 8,6,4,2 (default: 2/3, 1/2, 1/3, 1/6 of the teacher's)")
    g.add_argument("--layers", type=layer_list, default=None, help="layers to map (default: all); 0-based")
    g.add_argument("--block-loss", choices=["output", "relations", "output+relations"], default="output",
                   help="loss of the attention-block units (see retrain_single_block.py --loss-on)")
    g.add_argument("--relation-weight", type=positive_float, default=1.0, help="with --block-loss ...relations")
    g.add_argument("--max-train-sentences", type=positive_int("--max-train-sentences"), default=None,
                   help="train on the first N sentences of the training split (budget)")
    g.add_argument("--eval-sentences", type=positive_int("--eval-sentences"), default=None,
                   help="measure on the first N sentences of the validation split (budget; default all)")
    g.add_argument("--valid-batches", type=positive_int("--valid-batches"), default=4,
                   help="batches of the per-epoch validation loss (best-checkpoint choice)")
    g.add_argument("--latency-reps", type=positive_int("--latency-reps"), default=20,
                   help="timed round-robin repeats per module (median)")
    g.add_argument("--latency-batch", type=positive_int("--latency-batch"), default=32)
    g.add_argument("--latency-threads", "--timing-threads", type=positive_int("--latency-threads"), default=None,
                   help="CPU threads of every timing: the map's, a plan's re-timing, the students' (default: the "
                        "job's; e.g. 1 to state single-thread speed-ups while training on more)")
    g.add_argument("--runtime", choices=list(RUNTIMES), default="pytorch",
                   help="where the student will run: pytorch (every unit), llama.cpp (what --export-gguf writes; a "
                        "plan's re-timing and the student's timing run in llama.cpp itself, on --gguf-type GGUFs, "
                        "--latency-threads threads, default 1) or vllm (what --hf-layout nemotron-nas writes, no "
                        "linear attention; FFN widths on its 256 grid); only the options it runs are mapped and "
                        "planned, and an existing --map is re-planned from the entries it runs")
    g.add_argument("--no-cache", action="store_true", help="recompute teacher features every batch")
    g.add_argument("--cache-dir", default=None, help="teacher feature cache (default: <--out>/cache; shared, safe)")
    g.add_argument("--max-steps-per-epoch", type=positive_int("--max-steps-per-epoch"), default=None,
                   help="cap on training steps per epoch (budget)")


def add_retime_args(g: argparse._ActionsContainer) -> None:
    """Flags of a speed plan's re-timing before training (``planner.aim``)."""
    g.add_argument("--retime-rounds", type=non_negative_int("--retime-rounds"), default=RETIME_ROUNDS,
                   help="timings of a speed plan before training (0: the map's plan as it is)")
    g.add_argument("--speed-margin", type=non_negative_float("--speed-margin"), default=SPEED_MARGIN,
                   help="a speed plan must measure this far above the target, twice (the default is about the spread "
                        "of one timing on a loaded CPU)")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    """The end-to-end fine-tune and test-budget flags (also bench/plans.py's)."""
    g = p.add_argument_group("fine-tune (end to end, KD)")
    g.add_argument("--ft-epochs", type=int, default=1, help="0: no fine-tune")
    g.add_argument("--ft-lr", type=positive_float, default=2e-4)
    g.add_argument("--retrain-units", action="store_true",
                   help="train the student's units again (default: load those the map trained with this same "
                        "teacher and training setup, from the map's units/ folder)")
    g.add_argument("--ft-max-steps", type=positive_int("--ft-max-steps"), default=None,
                   help="at most this many optimizer steps per fine-tune epoch (budget; default: the units' "
                        "--max-steps-per-epoch, else the whole training split)")
    g.add_argument("--ft-train-sentences", type=positive_int("--ft-train-sentences"), default=None,
                   help="fine-tune on the first N training sentences (default: the units' --max-train-sentences); more "
                        "than the units' give the fine-tune fresh text where it would repeat the same few epoch after "
                        "epoch")
    g.add_argument("--ft-keep-start", action="store_true",
                   help="validate the composed student before the fine-tune and keep it unless the fine-tune beats it "
                        "on validation (--keep-start for the heal)")
    g.add_argument("--temperature", type=positive_float, default=None,
                   help="KD temperature of the fine-tune (default: 2 for a masked LM, 1 for a decoder)")
    g.add_argument("--ft-relation-weight", type=float, default=0.0, help="relation distillation in the fine-tune")
    add_topk_arg(g)
    g.add_argument("--test-sentences", type=positive_int("--test-sentences"), default=None,
                   help="evaluate on the first N test sentences (budget; default all)")
    add_eval_text_arg(g)


def add_topk_arg(g: argparse._ActionsContainer) -> None:
    """--teacher-topk K: the heal's KL from the teacher's top-k next tokens, cached once per training window."""
    g.add_argument("--teacher-topk", type=positive_int("--teacher-topk"), default=None, metavar="K",
                   help="a decoder's heal reads the teacher's K most probable next tokens (and the rest's mass) from a "
                        "cache in --cache-dir, written once per training window, instead of running the teacher at "
                        "every step; the KL is then on those K tokens and one bucket for the rest (default: off)")


def add_lm_eval_args(p: argparse.ArgumentParser) -> None:
    """--lm-eval TASKS and its options: a ``HarnessConfig`` (lm-evaluation-harness on teacher and student)."""
    g = p.add_argument_group("lm-evaluation-harness (decoders; pip install lm-eval)")
    g.add_argument("--lm-eval", type=name_list, default=None, metavar="TASKS",
                   help="also run these lm-eval tasks on teacher and student, side by side (e.g. piqa,hellaswag,"
                        "arc_easy,arc_challenge,winogrande: data from the Hugging Face Hub), or tasks of YAML files in "
                        "--lm-eval-include")
    g.add_argument("--lm-eval-include", default=None, metavar="DIR",
                   help="a folder of lm-eval YAML task files (local data: dataset_path: json, dataset_kwargs: "
                        "{data_files: ...})")
    g.add_argument("--lm-eval-limit", type=positive_int("--lm-eval-limit"), default=None, metavar="N",
                   help="at most N documents per task (None: all)")
    g.add_argument("--lm-eval-batch-size", type=positive_int("--lm-eval-batch-size"), default=1, metavar="B",
                   help="lm-eval's batch size")


def add_chat_args(p: argparse.ArgumentParser) -> None:
    """Chat fidelity flags (a ``ChatConfig``; no --chat-prompts: no chat comparison)."""
    g = p.add_argument_group("chat (a decoder teacher with a chat template)")
    g.add_argument("--chat-prompts", default=None, metavar="FILE",
                   help="also compare teacher and student replies to the user messages of FILE (JSONL, "
                        '{"prompt": ...} per line; "default": the shipped set of about 100 instructions, chat_eval; '
                        "code_eval: 60 coding requests, for a code teacher), greedy, "
                        "through the teacher's chat template: exact match, common prefix, chrF, and the student's "
                        "perplexity, agreement and KL on the teacher's replies (chat.md, chat_replies.jsonl)")
    g.add_argument("--chat-max-new-tokens", type=positive_int("--chat-max-new-tokens"), default=64,
                   help="longest reply (tokens)")
    g.add_argument("--chat-batch-size", type=positive_int("--chat-batch-size"), default=8,
                   help="prompts generated together (left-padded, KV cache)")
