"""What every run starts from: the teacher with its tokenizer on its device, and the data it is distilled on
(``start``); and what is checked about a teacher before anything is loaded."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import ModelConfig, SwappableModel, load_teacher, weights_hash
from . import runtime
from .data.batches import (MixedWindows, TokenizedSentences, TokenWindows, make_loader, token_ids_hash,
                           tokenize_split)
from .data.text import SPLIT_BY, DataConfig, DataError, load_sentences, train_text_lines
from .errors import SettingError
from .storage.features import TeacherCache
from .storage.logits import TopKCache

log = logging.getLogger("simplifying_transformers")


@dataclass
class SessionConfig:
    """The teacher a run distils, where it runs, and the data it reads."""

    teacher: str = "bert-base-uncased"  # a Hugging Face hub id or a local folder (config.json + weights + tokenizer)
    data: DataConfig = field(default_factory=DataConfig)
    device: str = "auto"  # auto (cuda if available, else cpu), cpu or cuda
    # the teacher spread over several devices (models.hf.dispatch): auto, balanced, sequential, a module -> device
    # mapping, or a JSON file holding one; None: the whole teacher on ``device``
    teacher_device_map: str | dict[str, str | int] | None = None


@dataclass
class Session:
    """A loaded teacher (frozen, on ``device``), its tokenizer and the data settings: sentences and loaders."""

    teacher_name: str
    device: torch.device
    teacher: SwappableModel
    tokenizer: Any
    teacher_hash: str
    data: DataConfig

    def sentences(self, split: str) -> TokenizedSentences | TokenWindows:
        """The ``split`` (its leading ``data.fraction``) as the teacher's task reads it: sentences with a seeded
        evaluation mask each (masked LM), or token windows (causal LM; the training mixture's for train and valid
        when ``data.train_texts`` names one)."""
        d = self.data
        sents = load_sentences(d, split, d.fraction)
        ds = self._read(split, sents, sents)
        if isinstance(ds, TokenWindows):
            log.info("%s: %s", split, ds.describe())
        else:
            log.info("%s: %d sentences (%d truncated to `seq_len` %d, %d without a maskable token skipped)", split,
                     len(ds), ds.truncated, d.seq_len, ds.skipped)
        return ds

    def first_sentences(self, split: str, limit: int | None, skip: int = 0) -> TokenizedSentences | TokenWindows:
        """The first ``limit`` sentences (lines, read by documents) of a split (all with None) after its first
        ``skip``, as the teacher's task reads them (sentences with their evaluation masks, or the token windows of
        those sentences; with a training mixture, as many tokens of the mixture)."""
        whole = sents = load_sentences(self.data, split)
        if skip and skip >= len(sents):
            raise DataError(f"the {split} split has {len(sents)} sentences; cannot skip the first {skip}")
        sents = sents[skip:]
        if limit:
            sents = sents[:limit]
        ds = self._read(split, sents, whole)
        if isinstance(ds, MixedWindows):
            log.info("%s: %s", split, ds.describe())
        return ds

    def _read(self, split: str, sents: list[str], whole: list[str]) -> TokenizedSentences | TokenWindows:
        """``sents`` tokenised for the teacher's task; a decoder's train and valid text with ``data.train_texts``
        replaced by as many tokens of the mixture (so budgets in sentences keep their size), its data share drawn
        from ``whole``."""
        d = self.data
        ds = tokenize_split(sents, self.tokenizer, d.seq_len, task=self.teacher.TASK, mask_seed=d.seed)
        if d.train_texts and split != "test" and isinstance(ds, TokenWindows):
            ds = self.mixture(split, ds.tokens, whole)
        return ds

    def mixture(self, split: str, tokens: int, data_text: list[str]) -> MixedWindows:
        """``tokens`` of the training mixture's ``split`` (train or valid): the data split's own text ``data_text``
        (weight ``data.data_weight``, named "data") and each of ``data.train_texts`` (its documents cut into train and
        valid by the train : valid split ratio), shared by weight (``MixedWindows``)."""
        d = self.data
        sources = {}
        if d.data_weight > 0:
            sources["data"] = (TokenWindows(data_text, self.tokenizer, d.seq_len), d.data_weight)
        for t in d.train_texts:
            lines = train_text_lines(t, split, d.split_ratio)
            sources[t.name] = (TokenWindows(lines, self.tokenizer, d.seq_len), t.weight)
        return MixedWindows(sources, tokens, seed=d.seed)

    def loader(self, ds: TokenizedSentences, shuffle: bool, batch_size: int | None = None):
        d = self.data
        loader, sampler = make_loader(ds, self.tokenizer, batch_size or d.batch_size, shuffle=shuffle, seed=d.seed,
                                      num_workers=d.num_workers, pin_memory=self.device.type == "cuda",
                                      num_replicas=runtime.world_size(), rank=runtime.rank())
        if shuffle and len(sampler) == 0:  # training: DDP drops batches smaller than the number of processes
            raise DataError(f"the training split ({len(ds)} sentences) yields no batch for {runtime.world_size()} "
                            "processes; use more text or fewer processes")
        return loader, sampler

    def training_setup(self, ds: TokenizedSentences) -> dict[str, Any]:
        """What a resumed run must share with its resume point beyond the loop's own settings and the unit's metadata
        (which holds the teacher): the data (a hash of the tokenised training split) and the global batch size."""
        setup = {"data_hash": token_ids_hash(ds.ids), "global_batch_size": self.data.batch_size * runtime.world_size()}
        if self.data.train_texts:  # the hash changes with the mixture already; this names what it was
            setup["train_texts"] = [dataclasses.asdict(t) for t in self.data.train_texts]
            setup["data_weight"] = self.data.data_weight
        return setup

    def global_batch(self, ds: TokenizedSentences, sequences: int | None = None) -> dict:
        """The first batch of ``ds`` as one process with the global batch size (batch size x processes) sees it,
        or its first ``sequences`` windows / sentences as one batch, the same on every rank: for choices every rank
        must make alike (which heads to keep)."""
        loader, _ = make_loader(ds, self.tokenizer, sequences or self.data.batch_size * runtime.world_size(),
                                shuffle=False, seed=self.data.seed)
        return next(iter(loader))

    def refit_probe(self, ds: TokenizedSentences, tokens: int) -> dict | None:
        """The first windows / sentences of ``ds`` holding ``tokens`` tokens if full (seq_len each), as one batch:
        what a narrower feed-forward part's output projection is refit on; None for ``tokens`` 0."""
        if tokens < 0:
            raise ValueError(f"ffn_refit_tokens must be >= 0, got {tokens}")
        if not tokens:
            return None
        with torch.random.fork_rng(devices=[]):  # the global RNG the runs draw next stays as it was
            return self.global_batch(ds, -(-tokens // self.data.seq_len))

    def teacher_cache(self, ds: TokenizedSentences, names: list[str], cache_dir: str) -> TeacherCache:
        """The teacher features ``names`` of ``ds`` in the cache under ``cache_dir``, built once by rank 0 (others
        wait, then map the same files).

        On several machines without a shared cache folder, each machine's local rank 0 then builds its own copy before
        the other local ranks map it; with a shared folder they just find rank 0's files.
        """
        cache = TeacherCache(cache_dir, self.teacher, teacher_hash=self.teacher_hash, token_ids=ds.ids,
                             tokenizer_name=self.teacher_name, seq_len=self.data.seq_len)
        return self._ensure_ranked(cache, names, self.data.batch_size * 4)

    def topk_cache(self, ds: TokenizedSentences, cache_dir: str, *, k: int, temperature: float) -> TopKCache:
        """The teacher's top-``k`` next tokens at ``temperature`` for every window of ``ds`` (``storage.logits``),
        in the cache under ``cache_dir``, built once by rank 0 as ``teacher_cache`` builds (a batch at a time: the
        teacher's logits over the vocabulary are the large part)."""
        cache = TopKCache(cache_dir, self.teacher, k=k, temperature=temperature, teacher_hash=self.teacher_hash,
                          token_ids=ds.ids, tokenizer_name=self.teacher_name, seq_len=self.data.seq_len)
        return self._ensure_ranked(cache, cache.names, self.data.batch_size)

    def _ensure_ranked(self, cache: TeacherCache, names: list[str], batch: int):
        """``cache.ensure(names)`` on every rank: rank 0 first, then each machine's local rank 0, then the rest."""
        if runtime.is_main_process():
            cache.ensure(names, batch, self.device)
        runtime.barrier()
        if not runtime.is_main_process() and runtime.local_rank() == 0:
            cache.ensure(names, batch, self.device)
        runtime.barrier()
        if runtime.local_rank() != 0:
            cache.ensure(names, batch, self.device)
        return cache


def start(cfg: SessionConfig) -> Session:
    """Check the teacher, choose the device (joining the process group under torchrun), seed, load the teacher."""
    check_teacher(cfg.teacher, cfg.data.seq_len)
    device_map = read_device_map(cfg.teacher_device_map) if cfg.teacher_device_map is not None else None
    device = runtime.select_device(cfg.device)
    runtime.init_distributed(device)
    if device_map is not None and runtime.is_distributed():
        raise SettingError("`teacher_device_map` spreads the teacher over several devices in one process; it does not "
                           "combine with several processes (torchrun): run the cache job as one process")
    runtime.seed_everything(cfg.data.seed)
    teacher, tok = load_teacher(cfg.teacher, "cpu" if device_map is not None else device)
    data = resolve_data(cfg.data, teacher.TASK)
    if device_map is not None:
        teacher = _dispatch(teacher, device_map)
    log.info("teacher %s: %s, %d layers, hidden %d, %d heads of %d, %s LM head, %.1fM parameters", cfg.teacher,
             teacher.config.family, len(teacher.layers), teacher.config.hidden_size, teacher.config.num_attention_heads,
             teacher.config.head_dim, "with" if teacher.has_mlm_head else "WITHOUT", teacher.num_parameters() / 1e6)
    return Session(str(cfg.teacher), device, teacher, tok, weights_hash(teacher), data)


def resolve_data(data: DataConfig, task: str) -> DataConfig:
    """``data`` for a teacher of ``task``: ``split_by`` resolved (documents for a causal LM; sentences for a masked
    LM, whose teacher was trained on its sentence split) and the training mixture checked (SettingError naming the
    setting)."""
    split_by = data.split_by or ("documents" if task == "causal" else "sentences")
    if split_by not in SPLIT_BY:
        raise SettingError(f"`split_by` must be one of {', '.join(SPLIT_BY)}, got '{split_by}'")
    texts = tuple(data.train_texts)
    names = [t.name for t in texts]
    bad = [t.name for t in texts if not t.name or "=" in t.name or t.name == "data"]
    if bad:
        raise SettingError(f"`train_texts`: names must be non-empty, without '=', and not 'data' (the data split's "
                           f"own text), got {bad}")
    if len(set(names)) < len(names):
        raise SettingError(f"`train_texts`: each name once, got {sorted({n for n in names if names.count(n) > 1})} "
                           "more than once")
    weights = [t.weight for t in texts]
    if not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weights):
        raise SettingError(f"`train_texts`: weights must be finite numbers > 0, got {weights}")
    if not (math.isfinite(data.data_weight) and data.data_weight >= 0) or (not texts and data.data_weight == 0):
        raise SettingError(f"`data_weight` must be a finite number >= 0, and > 0 without `train_texts` (the "
                           f"training text would be empty), got {data.data_weight}")
    if texts and task != "causal":
        raise SettingError("`train_texts` is a decoder's training mixture; a masked-LM teacher is distilled on its "
                           "own sentence split (the one it was trained on): leave `train_texts` out")
    return dataclasses.replace(data, split_by=split_by, train_texts=texts)


def read_device_map(value: str | dict[str, str | int]) -> str | dict[str, str | int]:
    """A teacher device map as ``models.hf.dispatch`` takes it: auto / balanced / sequential as they are, a mapping
    checked, or the mapping read from a JSON file (SettingError naming what is wrong)."""
    if isinstance(value, str) and value in ("auto", "balanced", "sequential"):
        return value
    where = ""
    if isinstance(value, str):
        path = Path(value)
        if path.suffix != ".json" or not path.is_file():
            raise SettingError(f"`teacher_device_map` must be auto, balanced, sequential or a JSON file of module -> "
                               f"device, got '{value}'" + (" (no such file)" if path.suffix == ".json" else ""))
        try:
            value = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise SettingError(f"`teacher_device_map` '{path}' is not JSON: {' '.join(str(e).split())}") from None
        where = f" '{path}'"
    if not isinstance(value, dict) or not value:
        raise SettingError(f"`teacher_device_map`{where} must map module names to devices, e.g. "
                           '{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}')
    bad = {k: v for k, v in value.items() if not isinstance(v, (str, int)) or isinstance(v, bool)}
    if bad:
        raise SettingError(f"`teacher_device_map`{where}: devices are names (cuda:1, cpu) or GPU numbers, got {bad}")
    unusable = {m: (d, why) for m, d in value.items()
                if d not in ("disk", "meta") and (why := runtime.device_problem(d)) is not None}  # those two: dispatch
    if unusable:
        module, (device, why) = next(iter(unusable.items()))
        more = f" (and {len(unusable) - 1} more modules)" if len(unusable) > 1 else ""
        raise SettingError(f"`teacher_device_map`{where}: module '{module or '(the whole model)'}' is placed on "
                           f"{device!r}{more}: {why}")
    return value


def _dispatch(teacher: SwappableModel, device_map: str | dict[str, str | int]) -> SwappableModel:
    """The teacher spread over the devices of ``device_map`` (accelerate), each layer's device logged."""
    from models.hf import dispatch

    try:
        teacher = dispatch(teacher, device_map)
    except ValueError as e:  # accelerate's and ours: a module without a device, an unknown one, disk or meta
        raise SettingError(f"`teacher_device_map`: {' '.join(str(e).split())}") from None
    placed: dict[str, list[str]] = {}
    for name, dev in teacher.device_map.items():
        placed.setdefault(str(dev), []).append(name or "(all)")
    log.info("teacher spread over %d device(s): %s", len(placed), "; ".join(
        f"{d}: {m[0]}" + (f" .. {m[-1]} ({len(m)} modules)" if len(m) > 1 else "") for d, m in placed.items()))
    return teacher


def teacher_config(name_or_path: str):
    """The teacher's Hugging Face config alone (for checking settings and naming outputs before loading weights)."""
    from models.hf import read_hf_config

    return read_hf_config(name_or_path)


def model_config(name_or_path: str) -> ModelConfig:
    """The teacher's per-layer plan, read from its config alone (no weights)."""
    from models.hf import config_from_hf

    return config_from_hf(teacher_config(name_or_path), has_lm_head=False)


def check_teacher(name_or_path: str, seq_len: int, what: str = "teacher") -> None:
    """A teacher (or judge) folder complete, and ``seq_len`` within its position embeddings: before loading it."""
    from models.hf import check_teacher_files

    check_teacher_files(name_or_path, what)
    check_seq_len(seq_len, name_or_path, what)


def check_seq_len(seq_len: int, name_or_path: str, field: str) -> None:
    """``seq_len`` must fit the position embeddings of the model named by ``field`` (SettingError)."""
    positions = teacher_config(name_or_path).max_position_embeddings
    if seq_len > positions:
        raise SettingError(f"`seq_len` {seq_len} is longer than `{field}` '{name_or_path}' allows: its "
                           f"max_position_embeddings is {positions}; use `seq_len` {positions} or less")
