"""Structured outputs: each constrained sequence's grammar state, and per step the mask of the
tokens it may sample next, computed while the forward pass runs.

The grammar engine is llguidance (Microsoft's, in Rust; what OpenAI's structured outputs and
vLLM's `guidance` backend build on), chosen over xgrammar for three reasons that matter here:
it has no dependencies (one abi3 wheel, where xgrammar pulls in triton and a TVM runtime), it
compiles a grammar lazily, so a new JSON schema costs microseconds to milliseconds rather than a
precompilation pass over the vocabulary, and it takes every format vLLM's fields name (JSON
Schema, regex, choice, and GBNF grammars, which it converts to its Lark dialect) itself.

- `GrammarCompiler` turns a StructuredOutputs into a `Grammar`: validated against the
  tokenizer (ValueError with llguidance's message), cached by its text (LRU), holding one
  matcher that new sequences copy (llguidance's deep_copy: no recompilation per sequence).
- A constrained Sequence holds its own matcher (`Sequence.grammar`), which consumes each token
  the sequence samples (`advance`).
- `TokenMasks` is one step's masks for its constrained rows: started (`start_masks`) on a
  worker thread when the step's input is built, so llguidance fills them (it releases the GIL)
  while the model runs; the sampler waits for them only when it needs them, after the logits.
  Unconstrained rows are never touched: a batch without constrained rows pays nothing.

Masks are bitmasks, one bit per token: [R, ceil(V / 32)] int32, bit t % 32 of word t // 32 set
when token t may come next. A matcher in an error state (it was given a token it refused) allows
EOS alone, so a row is never left with nothing to sample.

Shape letters: R constrained rows of a step, V vocabulary (the model's logits), W = ceil(V / 32).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from fastgen.config import StructuredOutputs

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (by their text)
# How JSON is written: as json.dumps writes it, so a model's usual spelling fits. llguidance's
# default allows any whitespace between items, in which a small model can wander forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint: `matcher()` gives a fresh matcher at its start."""

    _template: object  # llguidance.LLMatcher, never advanced

    def matcher(self):
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer; thread-safe (the server validates on its
    event loop, the engine compiles on its own thread)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._tokenizer = None  # llguidance.LLTokenizer, built on first use (~1 s for 150k)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputs) -> Grammar:
        """The spec's grammar (cached by the spec's text); ValueError naming what is wrong."""
        key = _key(spec)
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
            grammar = self._compile(spec.kind, self._grammar_text(spec))
            self._cache[key] = grammar
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return grammar

    def _compile(self, kind: str, text: str) -> Grammar:
        import llguidance

        tokenizer = self._llg_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(text, tokenizer)
        if error:
            raise ValueError(f"invalid structured output ({kind}): {_first_lines(error)}")
        matcher = llguidance.LLMatcher(tokenizer, text)
        if matcher.is_error():
            raise ValueError(f"invalid structured output ({kind}): "
                             f"{_first_lines(matcher.get_error())}")
        return Grammar(matcher)

    def _grammar_text(self, spec: StructuredOutputs) -> str:
        """llguidance's grammar text for the spec; ValueError for one it cannot even parse."""
        import llguidance

        kind = spec.kind
        try:
            if kind in ("json", "json_object"):
                schema = ANY_JSON_OBJECT if kind == "json_object" else spec.json
                if isinstance(schema, str):
                    schema = json.loads(schema)
                if not isinstance(schema, (dict, bool)):
                    raise ValueError("a JSON schema must be an object")
                return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                     JSON_OPTIONS)
            if kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(spec.regex)
            if kind == "choice":
                return llguidance.grammar_from("choice", json.dumps(list(spec.choice)))
            return llguidance.grammar_from("grammar", spec.grammar)
        except (ValueError, TypeError, RecursionError) as error:
            raise ValueError(f"invalid structured output ({kind}): "
                             f"{_first_lines(str(error))}") from None

    def _llg_tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf
            from transformers import PreTrainedTokenizerFast

            if not isinstance(self._hf_tokenizer, PreTrainedTokenizerFast):
                raise ValueError("structured outputs need a fast (tokenizer.json) tokenizer; "
                                 "this model's is not one")
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size,
                eos_token=self._eos_token_ids or None)
        return self._tokenizer


def advance(matcher, token_id: int) -> bool:
    """Feeds a sampled token to a sequence's matcher; True when the output is complete and
    nothing may follow (the sequence stops). The mask makes a refused token impossible; were one
    sampled anyway, the matcher's error is logged and the sequence stops."""
    if not matcher.consume_token(token_id) and matcher.is_error():
        logger.warning("structured output: %s", _first_lines(matcher.get_error()))
        return True
    return matcher.is_stopped()


class TokenMasks:
    """One step's masks for its constrained rows: `rows` index the step's sampling rows;
    `bitmask()` waits for them ([R, W] int32, on the CPU)."""

    def __init__(self, rows: list[int], future: Future):
        self.rows = rows
        self._future = future

    def bitmask(self) -> torch.Tensor:
        return self._future.result()


class MaskFiller:
    """Fills masks on one worker thread, with llguidance's parallel executor."""

    def __init__(self, vocab_size: int):
        self.width = bitmask_width(vocab_size)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastgen-grammar")
        self._executor = None

    def start(self, rows: list[int], matchers: list) -> TokenMasks:
        """Starts filling the masks of `matchers` (one per row of `rows`)."""
        return TokenMasks(rows, self._pool.submit(self._fill, matchers))

    def _fill(self, matchers: list) -> torch.Tensor:
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        bitmask = torch.empty(len(matchers), self.width, dtype=torch.int32)  # [R, W]
        self._executor.unsafe_compute_mask_ptr(
            [(matcher, row) for row, matcher in enumerate(matchers)], bitmask.data_ptr(),
            self.width * 4, len(matchers))
        return bitmask

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _key(spec: StructuredOutputs) -> str:
    """The cache key of a spec: its kind and its text (a schema given as a dict or as JSON text
    the same key)."""
    value = getattr(spec, spec.kind) if spec.kind != "json_object" else True
    if spec.kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return f"json-text:{value}"  # invalid: _grammar_text names the problem
    return f"{spec.kind}:{json.dumps(value, sort_keys=True)}"


def _first_lines(message: str, limit: int = 3) -> str:
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return " ".join(lines[:limit]) or "rejected"
