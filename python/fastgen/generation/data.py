"""The job's input: a parquet file whose prompt column holds, per row, a chat conversation (a
list of {role, content} messages, as verl's preprocessing writes it) or plain text. The file is
checked here, from its schema and values, before any model is loaded; prompts become token ids
through the model's chat template, and prompts over rollout.prompt_length are cut or rejected
(see config.Truncation) and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fastgen.generation.config import ConfigError, Truncation
from fastgen.tokenization import Conversation, render_chat


class DataError(ValueError):
    """The input file cannot be used; the message names the file and, where one is at fault,
    the column and the row."""


@dataclass
class Prompts:
    """The prompt column of the whole input file, checked."""

    table: pa.Table                          # the input, every column, in input order
    prompts: list[str | Conversation]        # per row: plain text or a conversation

    def __len__(self) -> int:
        return len(self.prompts)


def read_prompts(path: Path, prompt_key: str) -> Prompts:
    """Reads and checks the input file; DataError on a missing or unreadable file, a missing
    prompt column, an empty file, or a prompt that is neither text nor a chat list."""
    if not path.is_file():
        raise DataError(f"input file {path} does not exist" if not path.exists()
                        else f"input path {path} is not a file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {path} as parquet: {_first_line(e)}") from None
    if prompt_key not in table.column_names:
        raise DataError(f"{path} has no column {prompt_key!r} (columns: "
                        f"{', '.join(table.column_names) or 'none'}); set data.prompt_key")
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows")
    column = table.column(prompt_key)
    kind = _prompt_kind(column.type)
    if kind is None:
        raise DataError(f"{path}: column {prompt_key!r} holds {column.type}; expected text or a "
                        f"chat list of {{role, content}} messages")
    values = column.to_pylist()
    prompts = [_check_prompt(value, kind, row, path, prompt_key) for row, value in
               enumerate(values)]
    return Prompts(table, prompts)


def _prompt_kind(arrow_type: pa.DataType) -> str | None:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "text"
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        item = arrow_type.value_type
        if pa.types.is_struct(item) and {"role", "content"} <= {f.name for f in item}:
            return "chat"
    return None


def _check_prompt(value, kind: str, row: int, path: Path, key: str) -> str | Conversation:
    where = f"{path}: row {row} of column {key!r}"
    if value is None:
        raise DataError(f"{where} is null")
    if kind == "text":
        return value
    if not value:
        raise DataError(f"{where} is an empty conversation")
    messages = []
    for message in value:
        if message is None or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where} has a message without a string role and content")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def encode_prompt(tokenizer, prompt: str | Conversation, chat_template: bool) -> list[int]:
    """Token ids of one prompt. A conversation, and plain text when chat_template (as one user
    message), go through the chat template with the generation prompt and are tokenized without
    adding special tokens again; other plain text is tokenized as is, with BOS."""
    if isinstance(prompt, str) and not chat_template:
        return tokenizer.encode(prompt)
    conversation = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the model's tokenizer has no chat template; chat prompts need one "
                          "(plain-text prompts can go without: data.chat_template=false)")
    return render_chat(tokenizer, conversation)


def truncate(token_ids: list[int], limit: int, mode: str) -> tuple[list[int] | None, bool]:
    """(ids to generate from, or None for a rejected prompt; whether it was over the limit).
    Truncation.ERROR is the caller's to raise: here it behaves as REJECT."""
    if len(token_ids) <= limit:
        return token_ids, False
    if mode == Truncation.LEFT:
        return token_ids[-limit:], True
    if mode == Truncation.RIGHT:
        return token_ids[:limit], True
    return None, True
