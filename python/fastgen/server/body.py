"""A request's JSON body, read the same way by every route: whatever its Content-Type, parsed by
the standard library, then checked for text no tokenizer can take.

JSON lets a string hold a lone UTF-16 surrogate (`"\\ud800"`), which Python's json module keeps as
is; such a string cannot be encoded to UTF-8, so the tokenizer would fail on it deep inside a
route (a 500). Every string of the body, keys included, is checked here instead, and the first
bad one is a 400 naming where it is (`messages[0].content`).
"""

from __future__ import annotations

import json

from fastgen.server.errors import APIError


def read_json(raw: bytes) -> object:
    """The parsed body; APIError(400) for invalid JSON or a string that is not valid Unicode."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as error:  # bad JSON or encoding, absurd nesting
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    where = _bad_text(data, "")
    if where is not None:
        raise APIError(400, f"{where or 'the request body'}: the string holds an unpaired "
                            f"UTF-16 surrogate escape (such as \\ud800), which is not valid "
                            f"Unicode text", where or None)
    return data


def read_json_object(raw: bytes) -> dict:
    data = read_json(raw)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def _bad_text(value: object, where: str) -> str | None:
    """Where the first string that cannot be UTF-8 encoded is ("" for the value itself), else
    None. Iterative: a body may nest deep."""
    pending = [(value, where)]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            if not _is_unicode(item):
                return path
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                name = key if _is_unicode(key) else key.encode("utf-8", "backslashreplace").decode()
                child_path = f"{path}.{name}" if path else name
                if name is not key:  # the field's name itself
                    return child_path
                pending.append((child, child_path))
        elif isinstance(item, list):
            pending.extend((child, f"{path}[{i}]") for i, child in reversed(list(enumerate(item))))
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
