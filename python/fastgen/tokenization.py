"""What every front end does with a tokenizer beyond encode and decode, written once: a chat
conversation rendered into prompt token ids, a token's own bytes as logprobs show them, and the
text that tokens add after a prompt.

- Chat: the conversation goes through the tokenizer's chat template with the generation prompt
  (the assistant's turn opened), then the text is tokenized *without* adding special tokens: the
  template already wrote them (BOS, ...), and adding them again would double them. Errors are the
  tokenizer's own (transformers' ValueError without a template, jinja's for a template that
  refuses the messages); each caller maps them to its own (an HTTP 400, a config error).
- Token bytes: a byte-level BPE token (GPT-2's alphabet) or a SentencePiece byte-fallback token
  may hold part of a UTF-8 character, which decoding the token alone would lose.
- Continuation text: the generated tokens decoded after a few tokens of the prompt and the
  prompt's share cut off, so a SentencePiece tokenizer keeps the space that starts the first
  generated word (the detokenizer's offsets scheme, done once over a whole generation).

Tokenizers are duck-typed: anything with transformers' tokenizer methods.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

Conversation = list[dict[str, str]]  # {"role": ..., "content": ...} messages, in order

# Tokens of prompt decoded before the generated ones (vLLM's
# INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET; engine/detokenizer.py starts its windows the same).
CONTEXT_TOKENS = 5


# Chat.

@dataclass(frozen=True)
class ChatPrompt:
    text: str             # the template's output, special tokens written out
    token_ids: list[int]  # text tokenized without adding special tokens again


def render_chat_prompt(tokenizer, conversation: Conversation, tools: list[dict] | None = None,
                       add_generation_prompt: bool = True,
                       continue_final_message: bool = False) -> ChatPrompt:
    """The conversation through the chat template, as text and as token ids. tools: OpenAI's
    function definitions, for templates that render them (transformers' `tools=`);
    add_generation_prompt: open the assistant's turn; continue_final_message: leave the last
    message open instead (a prefilled answer). Raises what the tokenizer raises (see the
    header)."""
    text = tokenizer.apply_chat_template(conversation, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message)
    return ChatPrompt(text, tokenizer.encode(text, add_special_tokens=False))


def render_chat(tokenizer, conversation: Conversation, tools: list[dict] | None = None,
                **options) -> list[int]:
    """The prompt token ids of a conversation: render_chat_prompt's, for callers that need no
    text."""
    return render_chat_prompt(tokenizer, conversation, tools, **options).token_ids


# Continuation text.

def continuation_text(decode: Callable[[list[int]], str], prompt_ids: list[int],
                      generated: list[int]) -> str:
    """The text `generated` adds after `prompt_ids`: decode(context + generated) less
    decode(context), context being the prompt's last CONTEXT_TOKENS tokens. decode: token ids ->
    text, e.g. engine.detokenizer.text_decoder(tokenizer) (special tokens skipped)."""
    context = prompt_ids[-CONTEXT_TOKENS:]
    before = decode(context)
    return decode(context + generated)[len(before):]


# Token bytes.

class TokenText:
    """A token id as logprobs show it: its own bytes (a byte-level BPE token may hold part of
    a UTF-8 character; decoding it alone would lose them) and those bytes as text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        described = repr(decoder)
        self._byte_level = "ByteLevel" in described
        self._sentencepiece = "\u2581" in described or "Metaspace" in described

    def bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(c in BYTE_OF_CHAR for c in piece):
            return bytes(BYTE_OF_CHAR[c] for c in piece)
        if self._sentencepiece:
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                return bytes([int(match[1], 16)])
            return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id]).encode()

    def string(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def strings(self, token_ids: list[int]) -> list[str]:
        return [self.string(t) for t in token_ids]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}  # its inverse
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback tokens
