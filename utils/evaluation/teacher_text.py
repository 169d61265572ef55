"""Distillation text the teacher writes itself (issue 32, item 4): it answers a prompt set through its chat template,
sampled (temperature 1 by default, seeded), batched with the KV cache, into a folder of JSONL files of
{"text": <the whole templated conversation: prompt and reply>} lines, what ``utils.data.text.read_documents`` reads.

Cached and resumable: the replies are written in chunks of ``chunk_size`` prompts, each under a temporary name
(``chunk-00003.jsonl.tmp.<host>.<pid>.<random>``, which no reader takes for text) renamed when complete; a rerun skips
the chunks that are there. Each chunk samples from its own generator seeded by (``seed``, chunk number), so a rerun, or
a run after a kill, writes the same bytes as one uninterrupted run. ``teacher_text.json`` records the settings; a rerun
with other settings into the same folder is refused (``force`` starts the folder over).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from models.base import SwappableModel
from ..storage.chunks import ChunkFolder
from .chat import Chat, answer, read_prompts

log = logging.getLogger("simplifying_transformers")
MANIFEST = "teacher_text.json"
FORMAT = 1


@dataclass
class TeacherTextConfig:
    """What the teacher answers and how: the prompts (JSONL or "default", the shipped training set, disjoint from the
    chat evaluation's), replies per prompt, reply length, sampling temperature and seed, prompts per file and per
    generation batch (both part of what makes the output reproducible)."""

    prompts: str = "default"
    samples_per_prompt: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    seed: int = 0
    chunk_size: int = 64
    batch_size: int = 16


@dataclass
class TeacherText:
    """A written folder: how many records, chunks written now and chunks found from an earlier run."""

    folder: Path
    records: int
    written: int
    skipped: int


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of one chunk: distinct for every (seed, chunk) pair."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{chunk}".encode()).digest()[:8], "little") >> 1


def _settings(config: TeacherTextConfig, *, prompts_file: Path, prompts: Sequence[str], teacher: dict[str, Any],
              device: torch.device) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return {"format": FORMAT, **teacher, "prompts_file": str(prompts_file), "prompts_sha256": digest,
            "prompts": len(prompts), "device_type": device.type, **asdict(config)}


def _chunk_lines(chat: Chat, prompts: Sequence[str], replies: Sequence[Sequence[int]]) -> str:
    """One JSONL line per reply: the templated prompt and the reply as the teacher wrote it (its end token kept)."""
    return "".join(json.dumps({"text": chat.prompt_text(p) + chat.text(r, special=True),
                               "ended": bool(r) and r[-1] in chat.end_ids}, ensure_ascii=False) + "\n"
                   for p, r in zip(prompts, replies))


def write_teacher_text(teacher: SwappableModel, chat: Chat, *, config: TeacherTextConfig, out: str | Path,
                       teacher_record: dict[str, Any], force: bool = False) -> TeacherText:
    """The teacher's replies to ``config.prompts`` in ``out`` (see the module's docstring)."""
    from tqdm.auto import tqdm

    out = Path(out)
    prompts_file, prompts = read_prompts(config.prompts, default="train")
    device = next(teacher.parameters()).device
    store = ChunkFolder(out, _settings(config, prompts_file=prompts_file, prompts=prompts, teacher=teacher_record,
                                       device=device), manifest=MANIFEST, pattern="chunk-{:05d}.jsonl",
                        what="teacher text", force=force, ignore=("prompts_file",))
    items = [p for _ in range(config.samples_per_prompt) for p in prompts]
    chunks = [items[i:i + config.chunk_size] for i in range(0, len(items), config.chunk_size)]
    done = [store.done(k) for k in range(len(chunks))]
    bar = tqdm(total=len(items), initial=sum(len(c) for c, d in zip(chunks, done) if d), desc="teacher replies",
               unit="reply", dynamic_ncols=True)
    with bar:
        for k, chunk in enumerate(chunks):
            if done[k]:
                continue
            generator = torch.Generator(device=device).manual_seed(chunk_seed(config.seed, k))
            replies = answer(teacher, chat, [chat.prompt_ids(p) for p in chunk], max_new_tokens=config.max_new_tokens,
                             batch_size=config.batch_size, temperature=config.temperature, generator=generator,
                             progress=bar.update)
            store.write(k, _chunk_lines(chat, chunk, replies))
    log.info("teacher text in %s: %d replies in %d files (%d written now)", out, len(items), len(chunks),
             done.count(False))
    return TeacherText(out, len(items), done.count(False), done.count(True))
