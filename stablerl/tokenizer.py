"""Tokenizers: the built-in char-level one and any `tokenizer.json` in a checkpoint directory.

The default model is built by stablerl itself (no hub download), so its tokenizer is too: one token
per printable ASCII character plus newline, with <pad>/<bos>/<eos> specials. It is a real
`tokenizers.Tokenizer` saved as `tokenizer.json`, so `transformers` and every other HF-compatible
tool load it the same way as the tokenizer of a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # printable ASCII + newline


def char_tokenizer() -> Tokenizer:
    """pad=0, bos=1, eos=2, then one id per character of CHARS (98 tokens in all)."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # Split into single characters: WordLevel then maps each to its id; "isolated" keeps spaces.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return tok


class TextTokenizer:
    """Thin wrapper giving the trainer and engine one interface over any `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer, bos_id: int | None, eos_id: int, pad_id: int):
        self.tok = tok
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids as the model sees them: BOS (when the tokenizer has one) then the text."""
        ids = self.encode(text)
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tok.save(str(directory / "tokenizer.json"))
        special = {"bos_token": self._name(self.bos_id), "eos_token": self._name(self.eos_id),
                   "pad_token": self._name(self.pad_id)}
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {**special, "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False},
            indent=2))
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))

    def _name(self, i: int | None) -> str | None:
        return None if i is None else self.tok.id_to_token(i)

    @classmethod
    def char(cls) -> TextTokenizer:
        return cls(char_tokenizer(), bos_id=1, eos_id=2, pad_id=0)

    @classmethod
    def load(cls, directory: str | Path, eos_id: int | None = None, bos_id: int | None = None) -> TextTokenizer:
        """Load `tokenizer.json`; special ids come from tokenizer_config.json, else from the model config."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json in the checkpoint directory")
        tok = Tokenizer.from_file(str(path))
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

        def tid(key: str, fallback: int | None) -> int | None:
            name = cfg.get(key)
            if isinstance(name, dict):  # older HF format: {"content": "<eos>", ...}
                name = name.get("content")
            got = tok.token_to_id(name) if isinstance(name, str) else None
            return got if got is not None else fallback

        eos = tid("eos_token", eos_id)
        if eos is None:
            raise ValueError(f"{directory}: cannot tell the EOS token (no eos_token in tokenizer_config.json "
                             "and no eos_token_id in config.json)")
        return cls(tok, bos_id=tid("bos_token", bos_id), eos_id=eos, pad_id=tid("pad_token", eos))
