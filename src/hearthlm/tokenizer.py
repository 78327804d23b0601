"""Tokenizer: a checkpoint's tokenizer.json through the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, path: Path):
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: the model folder needs a tokenizer.json to encode text")
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise ValueError(f"{file}: cannot read tokenizer ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint folder (or a tokenizer.json file)."""
    return Tokenizer(Path(path))
