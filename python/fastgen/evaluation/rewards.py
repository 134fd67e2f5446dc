"""Rule rewards for generated answers, chosen by a row's `data_source`, and user rewards loaded
from a Python file, both giving a `Judgement` per response.

GSM8K scores as verl's `gsm8k.py`: in the last 300 characters, "strict" takes the number after
the last `#### `, "flexible" the last number anywhere; commas and `$` go; an equal string earns
`score`, a found but wrong answer `format_score`, no answer 0. MATH scores as verl's `math.py`
(the Hendrycks MATH rule): the last `\\boxed{...}` (or `\\fbox{...}`) against the ground truth,
both normalised by `normalize_math_answer`; on top of that, two plain numbers that are equal as
fractions (`0.5`, `\\frac{1}{2}`, `1/2`) match.

A user reward has verl's `custom_reward_function` shape:
`fn(data_source, solution_str, ground_truth, extra_info=None) -> float | dict` where a dict holds
"score" and, optionally, "acc" (is it correct) and "pred" (the answer majority vote counts).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol


class RewardError(ValueError):
    """A reward that cannot be chosen, loaded or used; the message is one line for the user."""


@dataclass(frozen=True)
class Judgement:
    """One response scored: `answer` is what majority vote counts (None: no answer found);
    `correct` is None when the reward does not say, and the caller decides from `score`."""

    score: float
    answer: str | None
    correct: bool | None


class Reward(Protocol):
    def supports(self, data_source: str) -> bool: ...

    def judge(self, data_source: str, solution: str, ground_truth: Any,
              extra_info: Any = None) -> Judgement: ...

    def extracts_answers(self) -> bool:
        """Whether `Judgement.answer` means anything (a user reward may never give one)."""
        ...


# ---------------------------------------------------------------------------------------------
# GSM8K

GSM8K_CLIP_CHARS = 300  # verl matches only the tail: the answer is at the end, and regexes are slow
_STRICT_ANSWER = re.compile(r"#### (-?[0-9.,]+)")
_ANY_NUMBER = re.compile(r"-?[0-9.,]+")


def _clean_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").strip()


def extract_gsm8k_answer(solution: str, method: str = "strict") -> str | None:
    """The final answer of a GSM8K-style solution, commas and `$` removed; None if there is none.

    strict: the number after the last `#### ` (the format the prompt asks for);
    flexible: the last number in the text, whatever surrounds it."""
    if method not in ("strict", "flexible"):
        raise RewardError(f"GSM8K extraction method must be 'strict' or 'flexible', got {method!r}")
    tail = solution[-GSM8K_CLIP_CHARS:]
    pattern = _STRICT_ANSWER if method == "strict" else _ANY_NUMBER
    for match in reversed(pattern.findall(tail)):
        if match not in ("", "."):
            return _clean_number(match)
    return None


def gsm8k_reward(solution: str, ground_truth: Any, method: str = "strict",
                 format_score: float = 0.0, score: float = 1.0) -> Judgement:
    """`score` for the right number, `format_score` for a wrong one, 0 for none (as verl)."""
    answer = extract_gsm8k_answer(solution, method)
    if answer is None:
        return Judgement(0.0, None, False)
    correct = answer == _clean_number(str(ground_truth))
    return Judgement(score if correct else format_score, answer, correct)


# ---------------------------------------------------------------------------------------------
# MATH: \boxed{} extraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _braced(text: str, i: int) -> tuple[str, int] | None:
    """The inside of the {...} group opening at text[i] (nested braces kept) and the index after
    it; None when its braces never close."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j], j + 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` or `\\fbox{...}` (braces nested to any depth), or
    of `\\boxed 5` (up to the next `$` or line end); None if there is none or its braces never
    close."""
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start:]
    rest = rest[len(next(c for c in _BOX_COMMANDS if rest.startswith(c))):]
    if rest.startswith("{"):
        group = _braced(rest, 0)
        return None if group is None else group[0]  # None: cut off mid-answer
    if rest.startswith(" "):
        return re.split(r"[$\n]", rest.strip(), maxsplit=1)[0].strip()
    return None


# ---------------------------------------------------------------------------------------------
# MATH: answer normalisation

_TRAILING_UNIT = re.compile(r"^(.+?)\s*\\(?:text|textbf|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?$")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_SHORT_LHS = re.compile(r"^[A-Za-z](?:_?[A-Za-z0-9])?$")  # "x", "k", "a_1": a name
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL = re.compile(r"^-?\d*\.?\d+$")
_FRAC_NUMBER = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_INT_SLASH_INT = re.compile(r"^(-?)(\d+)/(\d+)$")


def _read_argument(text: str, i: int) -> tuple[str, int] | None:
    """One TeX argument at text[i]: a {...} group (its inside), a command (`\\pi`) or a single
    character, with the index after it."""
    if i >= len(text):
        return None
    if command := re.match(r"\\[A-Za-z]+", text[i:]):
        return command.group(), i + command.end()
    if text[i] != "{":
        return text[i], i + 1
    return _braced(text, i)


def _brace_arguments(text: str, command: str, count: int) -> str:
    """Writes every argument of `command` in braces: `\\frac12` -> `\\frac{1}{2}`, as TeX reads it
    (an unbraced argument is one character). Input with spaces removed."""
    out, i = [], 0
    while (found := text.find(command, i)) >= 0:
        out.append(text[i:found + len(command)])
        i = found + len(command)
        if i < len(text) and text[i].isalpha():  # a longer command name, e.g. \sqrtx is not \sqrt
            continue
        if text.startswith("[", i) and (close := text.find("]", i)) > 0:  # \sqrt[3]{x}
            out.append(text[i:close + 1])
            i = close + 1
        for _ in range(count):
            argument = _read_argument(text, i)
            if argument is None:
                break
            out.append("{" + argument[0] + "}")
            i = argument[1]
    out.append(text[i:])
    return "".join(out)


def normalize_math_answer(answer: str) -> str:
    """A canonical string for a MATH answer, in the spirit of the Hendrycks MATH normaliser: no
    `\\left`/`\\right`, spacing commands, `$`, degrees, percent signs or trailing units
    (`\\text{ cm}`); `dfrac`/`tfrac` -> `frac`, `\\frac12` -> `\\frac{1}{2}`, `\\sqrt2` ->
    `\\sqrt{2}`, integer `a/b` -> `\\frac{a}{b}`; `x = 5` -> `5`; `1,000` and `1{,}000` ->
    `1000`; `2.50` -> `2.5`, `3.0` -> `3`, `.5` -> `0.5`; no spaces."""
    s = answer.replace("\n", "").strip()
    s = s.replace("\\!", "").replace("\\\\", "\\")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\^\{?\\circ\}?", "", s).replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[,;: ]", " ", s)  # thin / medium / thick / control spaces
    if (unit := _TRAILING_UNIT.match(s)) and unit.group(1).strip():
        s = unit.group(1)
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = s.replace("\\%", "").replace("%", "").strip().rstrip(".").strip()
    if s.count("=") == 1 and _SHORT_LHS.match(s.split("=")[0].strip()):
        s = s.split("=")[1]
    s = s.replace(" ", "")
    s = _brace_arguments(s, "\\sqrt", 1)
    s = _brace_arguments(s, "\\frac", 2)
    if slash := _INT_SLASH_INT.match(s):
        s = f"{slash.group(1)}\\frac{{{slash.group(2)}}}{{{slash.group(3)}}}"
    s = s.replace("{,}", ",")  # MATH writes 10{,}000
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if _DECIMAL.match(s) and "." in s:
        s = s.rstrip("0").rstrip(".")
        s = "0" + s if s.startswith(".") else s.replace("-.", "-0.")
    return s


def _as_number(normalized: str) -> Fraction | None:
    """The exact value of a normalised plain number (`-2`, `0.25`, `\\frac{1}{4}`), else None."""
    if _DECIMAL.match(normalized):
        return Fraction(normalized)
    if (frac := _FRAC_NUMBER.match(normalized)) and int(frac.group(3)) != 0:
        value = Fraction(int(frac.group(2)), int(frac.group(3)))
        return -value if frac.group(1) else value
    return None


def math_answer_key(answer: str) -> str:
    """What two equivalent answers share: the exact value of a number, else the normalised text."""
    normalized = normalize_math_answer(answer)
    number = _as_number(normalized)
    return str(number) if number is not None else normalized


def math_answers_equal(answer: str, ground_truth: str) -> bool:
    return math_answer_key(answer) == math_answer_key(ground_truth)


def math_reward(solution: str, ground_truth: Any) -> Judgement:
    """1 when the last boxed answer equals the ground truth after normalisation, else 0. A ground
    truth that is a whole solution is reduced to its boxed answer."""
    boxed = last_boxed(solution)
    if boxed is None:
        return Judgement(0.0, None, False)
    truth = str(ground_truth)
    truth = last_boxed(truth) or truth
    correct = math_answers_equal(boxed, truth)
    return Judgement(float(correct), math_answer_key(boxed), correct)


# ---------------------------------------------------------------------------------------------
# Choosing a reward

BUILTIN_REWARDS: Mapping[str, str] = MappingProxyType({
    name.lower(): rule for rule, names in {
        "gsm8k": ("openai/gsm8k", "gsm8k"),
        "math": ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500",
                 "hendrycks/competition_math", "EleutherAI/hendrycks_math", "math", "math500"),
    }.items() for name in names
})


def builtin_rule(data_source: str) -> str | None:
    """"gsm8k" or "math" for a data source with a built-in reward (case-insensitive), else None."""
    return BUILTIN_REWARDS.get(str(data_source).lower())


@dataclass(frozen=True)
class RuleRewards:
    """The built-in rewards, chosen per row by `BUILTIN_REWARDS[data_source]`."""

    gsm8k_method: str = "strict"
    format_score: float = 0.0

    def __post_init__(self):
        extract_gsm8k_answer("", self.gsm8k_method)  # a bad method fails before any scoring

    def supports(self, data_source: str) -> bool:
        return builtin_rule(data_source) is not None

    def judge(self, data_source: str, solution: str, ground_truth: Any,
              extra_info: Any = None) -> Judgement:
        rule = builtin_rule(data_source)
        if rule == "gsm8k":
            return gsm8k_reward(solution, ground_truth, self.gsm8k_method, self.format_score)
        if rule == "math":
            return math_reward(solution, ground_truth)
        raise RewardError(f"no built-in reward for data_source {data_source!r} "
                          f"(built-in: {', '.join(sorted(BUILTIN_REWARDS))})")

    def extracts_answers(self) -> bool:
        return True


class CustomReward:
    """A user's reward function; it scores every row, whatever its data source (as verl)."""

    def __init__(self, fn: Callable[..., Any], label: str):
        self.fn, self.label = fn, label
        parameters = inspect.signature(fn).parameters.values()
        self.takes_extra_info = any(p.name == "extra_info" or p.kind is p.VAR_KEYWORD
                                    for p in parameters)
        self.gave_answer = False

    def supports(self, data_source: str) -> bool:
        return True

    def judge(self, data_source: str, solution: str, ground_truth: Any,
              extra_info: Any = None) -> Judgement:
        kwargs = {"extra_info": extra_info} if self.takes_extra_info else {}
        try:
            result = self.fn(data_source, solution, ground_truth, **kwargs)
        except Exception as e:
            raise RewardError(f"{self.label} raised {type(e).__name__}: {e}") from e
        if isinstance(result, Mapping):
            if "score" not in result:
                raise RewardError(f"{self.label} returned a dict without 'score': {sorted(result)}")
            answer = result.get("pred")
            self.gave_answer |= answer is not None
            correct = result.get("acc")
            return Judgement(float(result["score"]), None if answer is None else str(answer),
                             None if correct is None else bool(correct))
        if isinstance(result, (bool, int, float)):
            return Judgement(float(result), None, None)
        raise RewardError(f"{self.label} returned {type(result).__name__}; "
                          "expected a number or a dict with 'score'")

    def extracts_answers(self) -> bool:
        return self.gave_answer


def load_custom_reward(path: str | Path, name: str = "compute_score") -> CustomReward:
    """The function `name` from the Python file at `path` (verl's custom_reward_function)."""
    path = Path(path)
    if not path.is_file():
        raise RewardError(f"custom reward file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"fastgen_custom_reward_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RewardError(f"cannot import custom reward file {path} (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise RewardError(f"importing custom reward file {path} raised "
                          f"{type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"custom reward file {path} has no function {name!r}")
    return CustomReward(fn, label=f"custom reward {path.name}:{name}")
