"""A decoder export carries what its teacher generates with (issue 32.6): the eos / bos / pad token ids, the
generation_config.json and the chat template as the teacher had them, so that ``generate()`` stops at the teacher's
end-of-turn token; and a decoder's results.json counts windows as windows."""
from __future__ import annotations

import json

import pytest

from helpers import make_decoder_teacher
from models import LayerSpec, load_teacher
from models.compress import clone_model, compose, init_merged_layer
from models.export import export_pretrained

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHAT = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
GENERATION = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_new_tokens": 7, "do_sample": False}


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    """A tiny Llama teacher whose config.json has no eos id, with a generation_config.json and a chat template."""
    folder = make_decoder_teacher(tmp_path_factory.mktemp("chat_llama"), bos_token_id=None, eos_token_id=None)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION))
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": CHAT}))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


@pytest.mark.parametrize("kind", ["plain", "remote-code"])
def test_a_decoder_export_carries_the_teachers_generation_settings(chat_llama, tmp_path, kind):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    teacher, tok = load_teacher(chat_llama)
    model = clone_model(teacher)
    if kind == "remote-code":
        dropped = LayerSpec(0, 0, 0, [3], "dropped", attention="none")
        layer = init_merged_layer(teacher.config, dropped, teacher.layers[3], mode="first")[0]
        model = clone_model(compose(teacher, layers={3: (layer, dropped)}))
    out, what = export_pretrained(model.eval(), tmp_path / "hf", tok)
    assert ("Compact" in what) == (kind == "remote-code")
    gen = GenerationConfig.from_pretrained(out)  # before: no generation_config.json (remote code), eos null
    assert gen.eos_token_id == GenerationConfig.from_pretrained(chat_llama).eos_token_id == 2
    assert (gen.bos_token_id, gen.pad_token_id, gen.max_new_tokens) == (1, 0, 7)
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (2, 1)
    assert AutoConfig.from_pretrained(out, trust_remote_code=True).eos_token_id == 2
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT


def test_a_decoder_results_json_names_windows_as_windows(tiny_llama, tiny_corpus, tmp_path):
    from utils import api

    s = api.load_teacher(str(tiny_llama), data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16), device="cpu")
    api.evaluate(s, s.teacher, out=tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert metrics["windows"] > 0 and "sentences" not in metrics  # before: "sentences" counted the windows


def test_generate_on_the_exported_student_stops_at_the_teachers_end_of_turn_token(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    folder = make_decoder_teacher(tmp_path / "teacher", bos_token_id=None, eos_token_id=None)
    teacher, tok = load_teacher(folder)
    dropped = LayerSpec(0, 0, 0, [3], "dropped", attention="none")
    layer = init_merged_layer(teacher.config, dropped, teacher.layers[3], mode="first")[0]
    student = clone_model(compose(teacher, layers={3: (layer, dropped)})).eval()
    prompt = tok("the red cat sees the dog", return_tensors="pt").input_ids
    third = int(student.generate(prompt, 3)[0, -1])  # the student's third greedy token: the "end of turn" below
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": third}))
    out, _ = export_pretrained(student, tmp_path / "hf", tok)
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        generated = theirs.generate(prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] <= prompt.shape[1] + 3 and int(generated[0, -1]) == third  # before: 8 new tokens
