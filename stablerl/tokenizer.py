"""Tokenizers: the built-in char-level one and any `tokenizer.json` in a checkpoint directory.

Prompts are encoded as `transformers.AutoTokenizer` encodes them: `tokenizer.json`'s post-processor decides whether a
BOS comes first (Llama-3's adds one, Qwen3's none). `with_chat_template` renders the checkpoint's chat template as
`apply_chat_template(messages, add_generation_prompt=True)` does, then encodes the text without special tokens (the
template writes the BOS itself when the model wants one). Every EOS id the checkpoint names (tokenizer_config.json,
config.json, generation_config.json) stops generation. Parity with transformers: tests/test_tokenizer.py.

The default model is built by stablerl itself (no hub download), so its tokenizer is too: one token per printable
ASCII character plus newline, with <pad>/<bos>/<eos> specials. It is a real `tokenizers.Tokenizer` saved as
`tokenizer.json`, so `transformers` and every other HF-compatible tool load it the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from stablerl.errors import UserError, one_line, read_json

if TYPE_CHECKING:
    from stablerl.config import TaskConfig

SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # printable ASCII + newline
# transformers' named special tokens: a chat template sees each one the tokenizer has as a variable (`bos_token`, ...)
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def char_tokenizer() -> Tokenizer:
    """pad=0, bos=1, eos=2, then one id per character of CHARS (98 tokens in all); prompts get BOS first."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # Split into single characters: WordLevel then maps each to its id; "isolated" keeps spaces.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    # BOS through the post-processor (as Llama-3's tokenizer.json does it), so transformers encodes as stablerl does
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos>:1 $B:1",
                                                       special_tokens=[("<bos>", 1)])
    return tok


@dataclass(frozen=True, eq=False)
class TextTokenizer:
    """One interface over any `tokenizers.Tokenizer` for the trainer and the engine (copies: dataclasses.replace)."""

    tok: Tokenizer = field(repr=False)
    bos_id: int | None  # information only: the post-processor or the chat template decide whether prompts get it
    eos_ids: tuple[int, ...]  # a row stops at any of these; the first ends SFT responses
    pad_id: int
    special_tokens: dict[str, str] = field(default_factory=dict)  # transformers' special_tokens_map (template vars)
    chat_template: str | None = None  # the checkpoint's (jinja source); used only through `with_chat_template`
    template_file: Path | None = None  # where it is (or would be) written: named in errors; None = built-in
    # set by `with_chat_template`: encode_prompt renders it
    chat: jinja2.Template | None = field(default=None, repr=False)
    system: str | None = None  # system prompt of the rendered conversation

    @property
    def eos_id(self) -> int:
        return self.eos_ids[0]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids as the model sees them, as transformers makes them: `tokenizer(text)["input_ids"]`, or with a
        chat template `apply_chat_template([system?, user], add_generation_prompt=True)`."""
        if self.chat is None:
            return self.tok.encode(text, add_special_tokens=True).ids
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages.append({"role": "user", "content": text})
        try:  # the variables transformers' render_jinja_template passes (tools/documents as None, not undefined)
            rendered = self.chat.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                        **self.special_tokens)
        except jinja2.TemplateError as e:
            raise UserError(f"{self.template_file}: the chat template failed: {one_line(e)}") from None
        return self.encode(rendered)  # the template holds the special tokens (BOS included) the model wants

    def with_chat_template(self, system: str | None = None) -> TextTokenizer:
        """A copy whose `encode_prompt(text)` renders [system?, user: text] with the checkpoint's chat template."""
        if self.chat_template is None:
            where = "the built-in tokenizer" if self.template_file is None else str(self.template_file)
            raise UserError(f"{where}: no chat template (no chat_template key, no chat_template.jinja); use a "
                            "checkpoint that has one, or leave task.chat_template (--chat-template) off")
        return replace(self, chat=compile_template(self.chat_template, self.template_file), system=system)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json (+ chat template) + generation_config.json (every EOS id)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        special = {**self.special_tokens, "bos_token": self._name(self.bos_id),
                   "eos_token": self._name(self.eos_id), "pad_token": self._name(self.pad_id)}
        cfg = {**special, "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        # where transformers' generate (and our load) reads the EOS ids beyond tokenizer_config's one
        eos = list(self.eos_ids) if len(self.eos_ids) > 1 else self.eos_id
        (directory / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": self.bos_id, "eos_token_id": eos, "pad_token_id": self.pad_id}, indent=2))

    def _name(self, i: int | None) -> str | None:
        return None if i is None else self.tok.id_to_token(i)

    @classmethod
    def char(cls) -> TextTokenizer:
        return cls(char_tokenizer(), bos_id=1, eos_ids=(2,), pad_id=0,
                   special_tokens={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        """A checkpoint directory's tokenizer.json; special ids from tokenizer_config.json, config.json and
        generation_config.json; the chat template from chat_template.jinja, else tokenizer_config.json."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: missing; a checkpoint directory needs its tokenizer (in transformers: "
                            "tokenizer.save_pretrained(directory))")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON and unknown models alike
            raise UserError(f"{path}: cannot read it as a tokenizer ({one_line(e)}); re-save it with transformers' "
                            "tokenizer.save_pretrained(directory)") from None
        tok.no_truncation()  # a tokenizer.json may carry a max_length: prompts are never cut silently (nor padded)
        tok.no_padding()
        if tok.post_processor is None and tok.get_vocab(True) == char_tokenizer().get_vocab(True):
            # A checkpoint of the built-in tokenizer saved before it had a post-processor: stablerl then prepended
            # BOS by hand, so the model was trained with it. Attach the built-in processor: same ids as before.
            tok.post_processor = char_tokenizer().post_processor
        cfg_path = directory / "tokenizer_config.json"
        cfg = read_json(cfg_path, missing_ok=True)
        special = {k: name for k in SPECIAL_KEYS if (name := _token_name(cfg.get(k))) is not None}

        def tid(key: str) -> int | None:
            return tok.token_to_id(special[key]) if key in special else None

        eos = [i for i in [tid("eos_token")] if i is not None]
        for name in ("config.json", "generation_config.json"):
            eos += _ids(directory / name, "eos_token_id")
        if not eos:
            raise UserError(f"{cfg_path}: cannot tell the EOS token: set eos_token there (or eos_token_id in "
                            f"{directory / 'config.json'})")
        eos_ids = tuple(dict.fromkeys(eos))  # deduplicated, first-seen order
        jinja_path = directory / "chat_template.jinja"
        if jinja_path.is_file():  # transformers too prefers the separate file to tokenizer_config's key
            template, where = jinja_path.read_text(encoding="utf-8"), jinja_path
        else:
            template, where = _default_template(cfg.get("chat_template")), cfg_path
        pad = tid("pad_token")
        return cls(tok, bos_id=tid("bos_token"), eos_ids=eos_ids, pad_id=eos_ids[0] if pad is None else pad,
                   special_tokens=special, chat_template=template, template_file=where)


def prompt_tokenizer(tok: TextTokenizer, task: TaskConfig) -> TextTokenizer:
    """The tokenizer that encodes a task's dataset prompts: with the chat template when `task.chat_template`."""
    return tok.with_chat_template(task.system_prompt) if task.chat_template else tok


# ---- chat templates, rendered as transformers' render_jinja_template does ----------------------------------------


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' masks; here it renders as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: plain json.dumps, not jinja's HTML-escaping one (a `<` must stay a `<`)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str, where: Path | None) -> jinja2.Template:
    """The environment of transformers' chat templates: sandboxed (templates come from the hub), trim_blocks,
    lstrip_blocks, loop controls, its `tojson`, `raise_exception` and `strftime_now`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{where}: chat template line {e.lineno}: {one_line(e)}") from None


# ---- reading the checkpoint's files ---------------------------------------------------------------------------


def _ids(path: Path, key: str) -> list[int]:
    """`key` of a JSON file as a list of token ids (HF writes one id or a list)."""
    v = read_json(path, missing_ok=True).get(key)
    ids = v if isinstance(v, list) else [] if v is None else [v]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"{path}: {key} must be a token id or a list of token ids, got {v!r}")
    return ids


def _token_name(v) -> str | None:
    if isinstance(v, dict):  # older HF format: {"content": "<eos>", ...}
        v = v.get("content")
    return v if isinstance(v, str) else None


def _default_template(v) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {"name", "template"} whose "default" one is used."""
    if isinstance(v, list):
        v = next((t.get("template") for t in v if isinstance(t, dict) and t.get("name") == "default"), None)
    return v if isinstance(v, str) else None
