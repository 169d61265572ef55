"""Where a planned student will run (``runtime``), and so which of the map's options it may use.

- ``pytorch``: here (or a transformers folder of our remote code): every unit.
- ``llama.cpp``: a GGUF file (``models.gguf_export``): the units it writes to run as trained.
- ``vllm``: the Nemotron-NAS layout (``models.nemotron_nas``): the units the layout expresses, less the linear
  replacements vLLM does not run; FFN widths on the layout's grid (int(2 * ffn_mult * hidden / 3) rounded up to a
  multiple of 256), so a map built for vLLM snaps its narrower-FFN options to that grid.

The rules are the exporters' own (each module's ``layer_problem``, the one its export refuses by), so a plan for a
runtime exports without refusal. An old map is re-planned for a runtime by dropping the entries it cannot run
(``runtime_map``): nothing is mapped again, and an option off the grid is dropped, not snapped (its costs were
measured at its own width). A map built for llama.cpp has its savings timed there (``time_map_in_llama_cpp``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from models import gguf_export, nemotron_nas
from models.config import LayerSpec
from models.export import ExportError
from ..errors import SettingError
from ..evaluation.llama_cpp import SPEEDS, LlamaCppTimer
from .sensitivity import Built, Option, compose_units, option_from_dict, random_unit

log = logging.getLogger(__name__)

RUNTIMES = ("pytorch", "llama.cpp", "vllm")


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise SettingError(f"`runtime` must be one of {', '.join(RUNTIMES)}, got '{runtime}'")


def unit_problem(runtime: str, i: int, spec: LayerSpec, *, cfg) -> str | None:
    """Why ``runtime`` cannot run layer ``i`` of shape ``spec`` in a model of ``cfg`` (the exporter's words), or
    None when it can."""
    check_runtime(runtime)
    if runtime == "llama.cpp":
        return gguf_export.layer_problem(i, spec, cfg)
    if runtime == "vllm":
        return nemotron_nas.layer_problem(i, spec, cfg, engine="vllm")
    return None


def check_runtime_teacher(runtime: str, teacher, tokenizer) -> None:
    """What of the teacher itself keeps every student of it from ``runtime`` (its family, biases, activation,
    tokenizer, its own layers off vLLM's FFN grid): SettingError (one line), before any work."""
    check_runtime(runtime)
    try:
        if runtime == "llama.cpp":
            gguf_export.check_gguf_available("f16")
            gguf_export.check_gguf_teacher(teacher, tokenizer)
        elif runtime == "vllm":
            nemotron_nas.check_nemotron_nas_model(teacher.config)
    except ExportError as e:
        raise SettingError(f"`runtime` {runtime} cannot run a student of this teacher: {e}") from None
    cfg = teacher.config
    problem = next((p for i, s in enumerate(cfg.layers) if (p := unit_problem(runtime, i, s, cfg=cfg))), None)
    if problem:
        raise SettingError(f"`runtime` {runtime} cannot run this teacher's own layers: {problem}")


def snapped(opt: Option, cfg, runtime: str) -> Option | None:
    """``opt`` with its FFN width on the grid ``runtime`` needs (vLLM: the layout's nearest), or None when snapping
    leaves nothing to save (a narrower FFN snapped to the teacher's width)."""
    if runtime != "vllm" or opt.kind == "block" or opt.ffn in (0, cfg.intermediate_size):
        return opt
    width = nemotron_nas.layout_width(opt.ffn)
    if width >= cfg.intermediate_size:
        return None
    return dataclasses.replace(opt, name=opt.name.replace(f"ffn {opt.ffn}", f"ffn {width}"), ffn=width)


def runtime_options(cfg, options: list[Option], runtime: str) -> list[Option]:
    """The options a map for ``runtime`` keeps: snapped to its grid (``snapped``; two that meet are one), and only
    those it runs at every layer they apply to. SettingError when none is left."""
    n, kept, dropped = len(cfg.layers), {}, {}
    for opt in options:
        new = snapped(opt, cfg, runtime)
        if new is None:
            dropped[opt.name] = f"on vLLM's FFN grid it is the teacher's width {cfg.intermediate_size}"
            continue
        problem = next((p for i in range(n) if new.applies(i, n)
                        and (p := unit_problem(runtime, i, new.spec(i, cfg), cfg=cfg))), None)
        if problem:
            dropped[opt.name] = problem
        else:
            kept.setdefault(new.name, new)
    for name, why in dropped.items():
        log.info("runtime %s: option '%s' left out (%s)", runtime, name, why)
    if not kept:
        raise SettingError(f"`runtime` {runtime} runs none of the options to map ({_first(dropped)}); map other "
                           "options (`options`)")
    return list(kept.values())


def runtime_map(smap: dict[str, Any], cfg, runtime: str) -> dict[str, Any]:
    """``smap`` with only the entries (and options) ``runtime`` runs, the rest named in its ``runtime_notes`` (the
    planner puts them into plan.log). The map given stays as it is."""
    check_runtime(runtime)
    if runtime == "pytorch" or "runtime_notes" in smap and smap.get("runtime") == runtime:  # filtered already
        return smap
    options = {o["name"]: option_from_dict(o) for o in smap["options"]}
    keep, dropped = [], {}
    for e in smap["entries"]:
        opt = options[e["option"]]
        problem = unit_problem(runtime, e["layer"], opt.spec(e["layer"], cfg), cfg=cfg)
        if problem:
            dropped.setdefault(opt.name, problem)
        else:
            keep.append(e)
    names = {e["option"] for e in keep}
    notes = [f"runtime {runtime}: {len(keep)} of the map's {len(smap['entries'])} entries are units it runs"]
    notes += [f"  left out: {name} ({why})" for name, why in dropped.items()]
    return {**smap, "entries": keep, "options": [o for o in smap["options"] if o["name"] in names],
            "runtime": runtime, "runtime_notes": notes}


def _first(dropped: dict[str, str]) -> str:
    name, why = next(iter(dropped.items()))
    return f"{name}: {why}" + (f"; and {len(dropped) - 1} more" if len(dropped) > 1 else "")


# ---- a map's options timed in llama.cpp ----
def uniform_units(teacher, opt: Option, layers: list[int]) -> dict[int, Built]:
    """Untrained units of ``opt`` at every layer of ``layers`` it applies to (merges on pairs that do not overlap);
    where they would replace every layer by one without a KV cache, the last stays the teacher's (llama.cpp runs no
    model without one)."""
    n, taken, out = len(teacher.layers), set(), {}
    for i in layers:
        if opt.applies(i, n) and not taken & set(opt.covers(i)):
            out[i] = random_unit(teacher, opt, i)
            taken |= set(opt.covers(i))
    if len(taken) == n and out and out[max(out)].spec.kv_heads == 0:
        del out[max(out)]
    return out


def _per_layer_ms(teacher, timer: LlamaCppTimer) -> tuple[dict[str, float], dict[str, float]]:
    """(the teacher's ms, ms of one of its layers) per speed in llama.cpp: the teacher against itself with every
    layer but the first dropped, the difference spread over the dropped layers."""
    n = len(teacher.layers)
    drop = Option("drop", "drop", 0, 0, 0, "none")
    ms = timer.ms(compose_units(teacher, {i: random_unit(teacher, drop, i) for i in range(1, n)}))
    return ({s: ms[f"teacher_{s}_ms"] for s in SPEEDS},
            {s: (ms[f"teacher_{s}_ms"] - ms[f"student_{s}_ms"]) / (n - 1) for s in SPEEDS})


def time_map_in_llama_cpp(smap: dict[str, Any], teacher, options: list[Option], *, layers: list[int],
                          timer: LlamaCppTimer) -> dict[str, Any]:
    """``smap`` with its timings and its entries' savings measured in llama.cpp (its PyTorch timings kept as
    ``pytorch_timing``). Each option is timed once, in every mapped layer at once against the teacher (``timer``:
    GGUF files, round-robin): its saving per unit is the difference over the units, the same at every layer (the
    teacher's layers share one shape; one layer's saving alone drowns in the noise of a whole model's timing). A
    layer's own time is the teacher's less a one-layer model's, spread over the others; the rest (embeddings,
    output) is ``embeddings_ms``."""
    if len(teacher.layers) < 2:
        raise SettingError("`runtime` llama.cpp times a map's options in llama.cpp only for a teacher of two layers "
                           "or more")
    total, layer = _per_layer_ms(teacher, timer)
    saved = {}
    for opt in options:
        units = uniform_units(teacher, opt, layers)
        if units:
            ms = timer.ms(compose_units(teacher, units))
            saved[opt.name] = {s: (ms[f"teacher_{s}_ms"] - ms[f"student_{s}_ms"]) / len(units) for s in SPEEDS}
            log.info("llama.cpp: option %s saves %.3f ms prefill, %.4f ms decode per unit", opt.name,
                     saved[opt.name]["prefill"], saved[opt.name]["decode"])
    timing = _llama_cpp_timing(total, layer, n=len(teacher.layers), timer=timer)
    entries = []
    for e in smap["entries"]:
        gain, key = saved[e["option"]], f"{e['layer']}/{e['option']}"
        timing["unit_ms"][key] = layer["prefill"] * len(e["covers"]) - gain["prefill"]
        timing["decode_unit_ms"][key] = layer["decode"] * len(e["covers"]) - gain["decode"]
        entries.append({**e, "unit_ms": timing["unit_ms"][key], "latency_saved_ms": gain["prefill"],
                        "decode_unit_ms": timing["decode_unit_ms"][key], "decode_saved_ms": gain["decode"]})
    return {**smap, "timing": timing, "entries": entries, "pytorch_timing": smap["timing"]}


def _llama_cpp_timing(total: dict[str, float], layer: dict[str, float], *, n: int, timer: LlamaCppTimer
                      ) -> dict[str, Any]:
    """A map's ``timing`` (``sensitivity.time_units``' keys) from llama.cpp's: the teacher's ms, a layer's, the
    settings; its units' ms are filled in by the caller."""
    t = timer.timing
    return {"encoder_ms": total["prefill"], "embeddings_ms": total["prefill"] - n * layer["prefill"],
            "layer_ms": [layer["prefill"]] * n, "decode_ms": total["decode"], "decode_layer_ms": [layer["decode"]] * n,
            "unit_ms": {}, "decode_unit_ms": {}, "batch": 1, "seq": t.seq, "reps": t.reps, "threads": t.threads,
            "decode_past": t.seq, "in": "llama.cpp", "gguf_type": t.gguf_type}
