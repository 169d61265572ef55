"""The edge where flags become the library's typed settings: one function per configuration dataclass, and the
command line's part of a run record. Nothing below this layer sees an argparse namespace."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from models import LayerSpec
from ..data.text import DataConfig
from ..errors import SettingError
from ..evaluation.harness import HarnessConfig
from ..evaluation.chat import ChatConfig
from ..evaluation.metrics import EvalConfig
from ..planning.students import MapConfig, PlanFinetune
from ..session import SessionConfig
from ..storage.export import ExportConfig
from ..training.loop import TrainConfig
from ..training.sharding import check_settings
from ..training.tasks import FinetuneLoss, MergeLoss
from ..training.units import UnitShape
from .recipes import given


def data_config(args: argparse.Namespace) -> DataConfig:
    """--dataset / --data-dir / --split-ratio / --split-by, --seq-len, --batch-size, --num-workers, --seed,
    --percentage-data, and a training script's --train-text / --data-weight."""
    return DataConfig(dataset=args.dataset, data_dir=args.data_dir, split_ratio=tuple(args.split_ratio),
                      seed=args.seed, seq_len=args.seq_len, batch_size=args.batch_size, num_workers=args.num_workers,
                      fraction=args.percentage_data, split_by=vars(args).get("split_by"),
                      train_texts=tuple(vars(args).get("train_text") or ()),
                      data_weight=vars(args).get("data_weight", 1.0))


def session_config(args: argparse.Namespace) -> SessionConfig:
    """--teacher, --device, --teacher-device-map and the data flags."""
    return SessionConfig(teacher=args.teacher, data=data_config(args), device=args.device,
                         teacher_device_map=vars(args).get("teacher_device_map"))


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training loop's flags (``add_training_args``, the seed's optimiser flags and, where the script has them,
    ``add_sharding_args``)."""
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                       schedule=args.schedule, clip=args.clip, seed=args.seed, save_every=args.save_checkpoint_every,
                       save_every_steps=args.save_every_steps, resume=args.resume, compile=args.compile,
                       max_steps_per_epoch=args.max_steps_per_epoch, force=args.force,
                       force_config=args.force_config, optimizer=args.optimizer,
                       betas=(args.adam_beta1, args.adam_beta2), warmup_steps=args.warmup_steps,
                       log_every=args.log_freq, print_every=args.log_freq if given(args, "log_freq") else 0,
                       fsdp=vars(args).get("fsdp", False), dtype=vars(args).get("dtype") or "fp32",
                       activation_checkpointing=vars(args).get("activation_checkpointing", False),
                       keep_start=vars(args).get("keep_start", False),
                       ffn_refit_tokens=vars(args).get("ffn_refit_tokens", 0))
    gpu = args.device != "cpu" and torch.cuda.is_available()  # where select_device will put the run
    check_settings(cfg, torch.device("cuda" if gpu else "cpu"))  # at start-up, before the teacher loads
    return cfg


def unit_shape(args: argparse.Namespace) -> UnitShape:
    """--block-heads, --block-d-k, --attention and the kinds' own flags (``add_shape_args``; each sets the spec field
    it names), and --ffn-dim where the script has it."""
    fields = {f: vars(args).get(f) for f in LayerSpec.ATTENTION_FIELDS[3:]}
    return UnitShape(num_heads=args.block_heads, head_dim=args.block_d_k, attention=args.attention,
                     ffn_dim=vars(args).get("ffn_dim"), **fields)


def cache_dir(args: argparse.Namespace, used: bool) -> str | None:
    """The teacher cache folder when one is ``used``: --cache-dir, by default <--out>/cache (resolved in ``args``
    too, so the run record shows the folder used)."""
    if args.cache_dir is None:
        args.cache_dir = str(Path(args.out) / "cache")
    return args.cache_dir if used else None


def merge_loss(args: argparse.Namespace) -> MergeLoss:
    return MergeLoss(loss_on=args.loss_on, criterion=args.criterion, temperature=args.temperature,
                     mask_inputs=bool(args.mask_inputs))


def finetune_loss(args: argparse.Namespace) -> FinetuneLoss:
    return FinetuneLoss(kl_weight=args.kl_weight, mlm_weight=args.mlm_weight, hidden_weight=args.hidden_weight,
                        hidden_criterion=args.hidden_criterion, temperature=args.temperature,
                        relation_weight=args.relation_weight, relation_heads=args.relation_heads,
                        balance_ratio=args.balance_ratio, teacher_topk=args.teacher_topk)


def export_config(args: argparse.Namespace) -> ExportConfig:
    return ExportConfig(hf_dir=args.export_hf, hf_layout=args.hf_layout, onnx_file=args.export_onnx,
                        gguf_file=args.export_gguf, gguf_type=args.gguf_type)


def eval_config(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(split=args.split, judge=args.judge, max_batches=args.max_batches,
                      texts=tuple(vars(args).get("eval_text") or ()))


def lm_eval_config(args: argparse.Namespace) -> HarnessConfig | None:
    """--lm-eval and its options (``add_lm_eval_args``); None without --lm-eval."""
    if args.lm_eval is None:
        if args.lm_eval_include is not None or args.lm_eval_limit is not None:
            raise SettingError("--lm-eval-include and --lm-eval-limit need --lm-eval TASKS (the tasks to run)")
        return None
    return HarnessConfig(tasks=args.lm_eval, task_dir=args.lm_eval_include, limit=args.lm_eval_limit,
                         batch_size=args.lm_eval_batch_size)


def chat_config(args: argparse.Namespace) -> ChatConfig | None:
    """--chat-prompts (None without it), --chat-max-new-tokens, --chat-batch-size."""
    if args.chat_prompts is None:
        return None
    return ChatConfig(prompts=args.chat_prompts, max_new_tokens=args.chat_max_new_tokens,
                      batch_size=args.chat_batch_size)


def map_config(args: argparse.Namespace) -> MapConfig:
    """The map's flags (``add_map_args``); the teacher cache unless --no-cache."""
    return MapConfig(options=args.options, heads_set=args.heads_set, layers=args.layers, block_loss=args.block_loss,
                     relation_weight=args.relation_weight, max_train_sentences=args.max_train_sentences,
                     eval_sentences=args.eval_sentences, valid_batches=args.valid_batches,
                     latency_reps=args.latency_reps, latency_batch=args.latency_batch,
                     latency_threads=args.latency_threads, runtime=args.runtime,
                     gguf_type=getattr(args, "gguf_type", "f16"),  # plan_student.py's export flag, when it has one
                     cache_dir=cache_dir(args, used=not args.no_cache))


def plan_finetune(args: argparse.Namespace) -> PlanFinetune:
    """The planned student's fine-tune flags (``add_finetune_args``)."""
    return PlanFinetune(epochs=args.ft_epochs, lr=args.ft_lr, temperature=args.temperature,
                        relation_weight=args.ft_relation_weight, test_sentences=args.test_sentences,
                        max_steps=args.ft_max_steps, train_sentences=args.ft_train_sentences,
                        teacher_topk=args.teacher_topk, keep_start=args.ft_keep_start,
                        topk_dir=cache_dir(args, used=True) if args.teacher_topk is not None else None)


def record(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's part of each unit's run record: the arguments, the recipe, the flags given explicitly (the
    library adds the fully resolved settings)."""
    return {"args": vars(args), "recipe": getattr(args, "recipe", "default"), "explicit": getattr(args, "explicit", [])}
