"""Coordinator-side tokenization: loading a tokenizer, chat templates, and streaming detokenization.

Incremental detokenization keeps a small window over the output ids instead of re-decoding them all::

    output ids:  o0 o1 o2 ... o[prefix] ... o[read] ... o[n-1]
                               |<- prefix_text ->|
                               |<-------- new_text -------->|
    delta = new_text[len(prefix_text):], emitted only when it does not end in U+FFFD (a UTF-8
    character whose bytes are split across tokens); then prefix, read = read, n.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character spans at most 4 byte tokens; a replacement char still trailing after this many
# held tokens is real output (or bytes that never complete), so holding it further only grows the window.
_MAX_HELD_TOKENS = 16


def load_tokenizer(kind: str, path: str) -> Any:
    """A Hugging Face fast tokenizer for a model resolved by `resolve_model`: ("hf", dir) or ("gguf", file)."""
    if kind == "gguf":
        from distrt.models.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if kind == "hf":
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad directory
            raise ValueError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from e
    raise ValueError(f"unknown model kind {kind!r}: expected 'hf' or 'gguf'")


def apply_chat_template(
    tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """Prompt token ids for chat `messages`, rendered with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name} has no chat template: pass a plain prompt instead of chat messages")
    text = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
    )
    # the template already writes any bos token; adding special tokens again would double it
    return list(tokenizer.encode(text, add_special_tokens=False))


class IncrementalDetokenizer:
    """Turns one request's output ids, as they arrive, into text deltas.

    The concatenated deltas, plus any held-back tail, equal
    `tokenizer.decode(output_ids, skip_special_tokens=...)`: `output_text` is always that string.
    The decode window starts at the first output id, not in the prompt: a prompt-context window
    would keep the leading space that SentencePiece's decoder strips from the first output token,
    and the text would then differ from decoding the output ids. `prompt_token_ids` is kept for
    callers that want it (e.g. echo).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.output_token_ids: list[int] = []
        self._stable_text = ""
        self._held_text = ""  # decoded but not yet emitted: ends in a split UTF-8 character
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Append output ids; return the text that became stable with them (possibly "")."""
        delta_parts: list[str] = []
        for token_id in new_ids:
            self.output_token_ids.append(int(token_id))
            ids = self.output_token_ids
            prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
            new_text = self._decode(ids[self._prefix_offset :])
            held_tokens = len(ids) - self._read_offset
            if len(new_text) <= len(prefix_text):
                continue  # e.g. a skipped special token: nothing new yet
            if new_text.endswith(_REPLACEMENT_CHAR) and held_tokens < _MAX_HELD_TOKENS:
                self._held_text = new_text[len(prefix_text) :]
                continue
            delta = new_text[len(prefix_text) :]
            delta_parts.append(delta)
            self._stable_text += delta
            self._held_text = ""
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return "".join(delta_parts)

    @property
    def output_text(self) -> str:
        """All text so far, including a held-back incomplete character (shown as U+FFFD)."""
        return self._stable_text + self._held_text
