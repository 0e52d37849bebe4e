"""Tokenizer parity with transformers: prompt ids as `AutoTokenizer(text)` makes them (BOS only where the
tokenizer.json post-processor adds one), chat templates as `apply_chat_template(add_generation_prompt=True)`, every
EOS id stops generation, and one-line errors for broken checkpoints. Everything is built locally: tiny byte-level BPE
tokenizers laid out like Qwen3's and Llama-3's, trained here in milliseconds."""

import dataclasses
import json
import random
from datetime import datetime

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from stablerl.cli import main
from stablerl.config import ConfigError, TaskConfig, load_config
from stablerl.engine import Engine
from stablerl.errors import UserError
from stablerl.hf import get_model, save_model
from stablerl.model import ModelConfig, build_model
from stablerl.tokenizer import TextTokenizer, char_tokenizer, prompt_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["Q: 4373+3744+1674", "  two leading spaces\n\nand   gaps\n", "naïve café 東京 😀 ünïcödé", "cafe\u0301 (NFC)",
         "12345678901234567890", "tab\there, it's done!", "a<|im_end|>b"]
USER = "What is 12+7?\nThink step by step."
SYSTEM = "Be brief & write <b>bold</b> — ok"
# the pre-tokenizer regexes of Qwen2/3 (digits one by one) and Llama-3 (up to three digits)
_WORDS = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"""
_REST = r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_RE, LLAMA_RE = _WORDS + r"\p{N}" + _REST, _WORDS + r"\p{N}{1,3}" + _REST

# ChatML as Qwen writes it; it leans on trim_blocks / lstrip_blocks (indented block tags, newlines after them)
CHATML = """{% for message in messages %}
  {% if message['role'] == 'system' and not loop.first %}
    {{ raise_exception('the system message must come first') }}
  {% endif %}
  {% if message['content'] == '' %}
    {{ raise_exception('empty ' + message['role'] + ' message') }}
  {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
# Llama-3 style: starts with bos_token (the tokenizer adds one too: no double BOS), uses loop controls, tojson
# (transformers' own: no HTML escaping of SYSTEM's `&` and `<`) and strftime_now
LLAMA3 = """{{ bos_token }}{% for message in messages %}
{% if message['role'] == 'ipython' %}{% continue %}{% endif %}
{% if message['role'] == 'system' %}
{% set content = 'Year: ' + strftime_now('%Y') + '\\n' + message['content'] | tojson %}
{% else %}
{% set content = message['content'] | trim %}
{% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ content }}<|eot_id|>{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


def _bpe(pre_re: str, specials: list[str], nfc: bool) -> Tokenizer:
    """A byte-level BPE (Qwen2/3 and Llama-3 layout) trained on 400 generated lines; specials get the last ids."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog sum of digits answer café naïve 東京 数学 über it's".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {rng.randint(0, 99999)}\n"
             for _ in range(400)]
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pre_re), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(specials)
    return tok


def _write(d, tok: Tokenizer, tokenizer_config: dict, config: dict | None = None, generation: dict | None = None):
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in (("config.json", config), ("generation_config.json", generation)):
        if content is not None:
            (d / name).write_text(json.dumps(content))
    return d


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Qwen3 layout: no BOS in the post-processor, bos_token null, but config.json names <|endoftext|> as BOS."""
    tok = _bpe(QWEN_RE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], nfc=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
           "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHATML, "clean_up_tokenization_spaces": False,
           "split_special_tokens": False, "model_max_length": 131072}
    return _write(tmp_path_factory.mktemp("qwen3"), tok, cfg,
                  {"model_type": "qwen3", "bos_token_id": eot, "eos_token_id": [im_end, eot]})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Llama-3 layout: the post-processor prepends <|begin_of_text|>; EOS ids in three files."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                "<|eot_id|>"]
    tok = _bpe(LLAMA_RE, specials, nfc=False)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 "
                                      "$B:1", special_tokens=[("<|begin_of_text|>", bos)])])
    end, eom, eot = (tok.token_to_id(s) for s in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "tokenizer_class": "PreTrainedTokenizerFast",
           "chat_template": [{"name": "default", "template": LLAMA3}, {"name": "tool_use", "template": "unused"}],
           "clean_up_tokenization_spaces": True, "model_max_length": 131072}
    return _write(tmp_path_factory.mktemp("llama3"), tok, cfg,
                  {"model_type": "llama", "bos_token_id": bos, "eos_token_id": [end, eot]},
                  {"bos_token_id": bos, "eos_token_id": [end, eom, eot]})


def hf_ids(d, text: str) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(d)(text)["input_ids"]


def hf_chat_ids(d, text: str, system: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}]
    out = transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(messages, add_generation_prompt=True,
                                                                           tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict | transformers.BatchEncoding) else out)  # v5: BatchEncoding


def test_qwen3_prompts_match_transformers_and_get_no_bos(qwen):
    tok = TextTokenizer.load(qwen)
    hf = transformers.AutoTokenizer.from_pretrained(qwen)
    eot, im_end = tok.tok.token_to_id("<|endoftext|>"), tok.tok.token_to_id("<|im_end|>")
    assert type(hf).__name__ == "Qwen2Tokenizer"  # transformers rebuilds it from its class: still the same ids
    assert tok.bos_id is None and tok.eos_ids == (im_end, eot) and tok.eos_id == im_end and tok.pad_id == eot
    for text in TEXTS:
        ids = tok.encode_prompt(text)
        assert ids == hf(text)["input_ids"] and ids == tok.encode(text), text  # no BOS: config.json's is not used
        assert eot not in ids
    assert tok.encode_prompt("a<|im_end|>b")[1] == im_end  # special tokens in the text are matched, as in HF
    assert tok.encode_prompt("") == []


def test_qwen3_chat_template_matches_apply_chat_template(qwen):
    base = TextTokenizer.load(qwen)
    im_start, tail = base.tok.token_to_id("<|im_start|>"), base.encode("<|im_start|>assistant\n")
    for system in (None, SYSTEM):
        chat = base.with_chat_template(system)
        for text in (USER, TEXTS[2]):
            ids = chat.encode_prompt(text)
            assert ids == hf_chat_ids(qwen, text, system)
            assert ids[0] == im_start and ids[-len(tail):] == tail
    assert base.with_chat_template().encode_prompt("hi") == base.encode(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")  # the text, pinned
    assert base.encode_prompt(USER) == base.encode(USER)  # the copy left the original alone
    # prompt_tokenizer: the task config decides
    assert prompt_tokenizer(base, TaskConfig()) is base
    assert prompt_tokenizer(base, TaskConfig(chat_template=True, system_prompt=SYSTEM)).encode_prompt(USER) == \
        hf_chat_ids(qwen, USER, SYSTEM)


def test_llama3_bos_once_and_every_eos_file(llama):
    tok = TextTokenizer.load(llama)
    bos = tok.tok.token_to_id("<|begin_of_text|>")
    end, eom, eot = (tok.tok.token_to_id(s) for s in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
    # tokenizer_config's eos_token first, then config.json's, then generation_config.json's, deduplicated
    assert tok.bos_id == bos and tok.eos_ids == (eot, end, eom) and tok.pad_id == eot
    for text in TEXTS:
        ids = tok.encode_prompt(text)
        assert ids == hf_ids(llama, text) and ids[0] == bos and ids.count(bos) == 1 and ids[1:] == tok.encode(text)
    assert tok.encode_prompt("") == [bos]
    for system in (None, SYSTEM):
        ids = tok.with_chat_template(system).encode_prompt(USER)
        assert ids == hf_chat_ids(llama, USER, system) and ids[0] == bos and ids.count(bos) == 1  # template's BOS only
    # the text, pinned: transformers' tojson (no HTML escaping of & and <), strftime_now, trim, `continue`
    ids = tok.with_chat_template(SYSTEM).encode_prompt("  hi  ")
    year = datetime.now().strftime("%Y")
    assert tok.tok.decode(ids, skip_special_tokens=False) == (
        f'<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYear: {year}\n"{SYSTEM}"<|eot_id|>'
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_builtin_tokenizer_matches_transformers_and_old_checkpoints(tmp_path):
    tok = TextTokenizer.char()
    tok.save(tmp_path / "new")
    for text in ("Q: 4373+3744+1674", "12+7=\n", " a  b ", ""):
        ids = tok.encode_prompt(text)
        assert ids == [1] + [tok.tok.token_to_id(c) for c in text]  # BOS then one id per character
        assert ids == hf_ids(tmp_path / "new", text) == TextTokenizer.load(tmp_path / "new").encode_prompt(text)
    assert ids == [1] and tok.encode_prompt("12+7=") == [1, 21, 22, 15, 27, 33]  # ids as before the post-processor
    saved = json.loads((tmp_path / "new" / "generation_config.json").read_text())
    assert saved == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    # a checkpoint saved before the post-processor existed: same vocab, none attached; stablerl prepended BOS by
    # hand then, so loading it must keep doing so
    old = tmp_path / "old"
    old.mkdir()
    data = json.loads(char_tokenizer().to_str())
    data["post_processor"] = None
    (old / "tokenizer.json").write_text(json.dumps(data))
    (old / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                           "pad_token": "<pad>"}))
    assert Tokenizer.from_file(str(old / "tokenizer.json")).post_processor is None
    loaded = TextTokenizer.load(old)
    assert loaded.encode_prompt("12+7=") == [1, 21, 22, 15, 27, 33] and loaded.eos_ids == (2,)


def test_save_load_roundtrip_keeps_eos_ids_and_template(qwen, tmp_path):
    """A checkpoint of a Qwen3-style model: config.json keeps the EOS list, and what stablerl writes back loads
    the same in stablerl and in transformers (as PreTrainedTokenizerFast)."""
    tok = TextTokenizer.load(qwen)
    im_end, eot = tok.eos_ids
    cfg = ModelConfig(model_type="qwen3", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
    assert ModelConfig.from_hf(cfg.to_hf()).eos_token_id == [im_end, eot]
    save_model(build_model(cfg, seed=0), tmp_path / "ckpt", tok)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["eos_token_id"] == [im_end, eot]
    model, again = get_model(tmp_path / "ckpt")
    assert model.config.eos_token_id == [im_end, eot]
    assert (again.bos_id, again.eos_ids, again.pad_id) == (None, (im_end, eot), eot)
    assert again.chat_template == CHATML
    for text in TEXTS:
        assert again.encode_prompt(text) == tok.encode_prompt(text) == hf_ids(tmp_path / "ckpt", text)
    assert again.with_chat_template(SYSTEM).encode_prompt(USER) == hf_chat_ids(qwen, USER, SYSTEM) == \
        hf_chat_ids(tmp_path / "ckpt", USER, SYSTEM)
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "ckpt")
    assert gen.eos_token_id == [im_end, eot]  # transformers' generate stops at both too


def test_generation_stops_at_the_second_eos_id():
    model, tok = get_model("tiny-moe")
    eng = Engine(model.eval(), tok, numerics="fp32")
    prompt = ["The quick brown fox jumps"]
    free = eng.generate(prompt, temperature=0.0, max_new_tokens=8, ignore_eos=True)
    ids = free.tokens[0].tolist()
    assert ids[2] not in ids[:2] and 2 not in ids[:3]  # the 3rd token is the first hit of the second EOS id
    two = dataclasses.replace(tok, eos_ids=(2, ids[2]))
    ro = Engine(model.eval(), two, numerics="fp32").generate(prompt, temperature=0.0, max_new_tokens=8)
    assert ro.lengths.tolist() == [3] and ro.finish_reason == ["stop"] and ro.tokens[0].tolist() == ids[:3]


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_clear_one_line_errors(qwen, tmp_path):
    _one_line_error(lambda: TextTokenizer.load(tmp_path), f"^{tmp_path / 'tokenizer.json'}: missing; ")
    TextTokenizer.char().save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<eos>",\n "pad_token": }')
    _one_line_error(lambda: TextTokenizer.load(tmp_path),
                    f"^{tmp_path / 'tokenizer_config.json'}:2: invalid JSON \\(Expecting value at column 15\\)")
    (tmp_path / "tokenizer_config.json").write_text('{"pad_token": "<pad>"}')
    (tmp_path / "generation_config.json").unlink()
    _one_line_error(lambda: TextTokenizer.load(tmp_path), "tokenizer_config.json: cannot tell the EOS token")
    (tmp_path / "config.json").write_text('{"eos_token_id": "<eos>"}')
    _one_line_error(lambda: TextTokenizer.load(tmp_path), "config.json: eos_token_id must be a token id")
    (tmp_path / "config.json").write_text('{"eos_token_id": [2]}')
    assert TextTokenizer.load(tmp_path).eos_ids == (2,)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    _one_line_error(lambda: TextTokenizer.load(tmp_path), f"^{tmp_path / 'tokenizer.json'}: cannot read it as a "
                    "tokenizer")
    # a chat template asked of a tokenizer without one
    TextTokenizer.char().save(tmp_path)
    _one_line_error(lambda: TextTokenizer.load(tmp_path).with_chat_template(),
                    f"^{tmp_path / 'tokenizer_config.json'}: no chat template")
    _one_line_error(lambda: prompt_tokenizer(TextTokenizer.char(), TaskConfig(chat_template=True)),
                    "^the built-in tokenizer: no chat template")
    with pytest.raises(ConfigError, match="task.system_prompt: set, but task.chat_template is false"):
        load_config(overrides=["task.system_prompt=Be brief."])
    # the template's raise_exception (transformers raises too), and a syntax error, name the file
    chat = TextTokenizer.load(qwen).with_chat_template()
    _one_line_error(lambda: chat.encode_prompt(""),
                    f"^{qwen / 'tokenizer_config.json'}: the chat template failed: empty user message$")
    with pytest.raises(Exception, match="empty user message"):
        hf_chat_ids(qwen, "", None)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}")
    _one_line_error(lambda: TextTokenizer.load(tmp_path).with_chat_template(),
                    f"^{tmp_path / 'chat_template.jinja'}: chat template line 1: Unexpected end of template")


def test_generate_cli_chat_template(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "12+7="}\n')
    assert main(["generate", "--prompts", str(prompts), "--chat-template"]) == 2
    assert "the built-in tokenizer: no chat template" in capsys.readouterr().err
    assert main(["generate", "--prompts", str(prompts), "--system-prompt", "hi"]) == 2
    assert "--system-prompt: needs --chat-template" in capsys.readouterr().err
