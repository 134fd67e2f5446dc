"""The built-in rule rewards on tricky answers, the data-source registry and user reward files."""

import pytest

from fastgen.evaluation.rewards import (Judgement, RewardError, RuleRewards,
                                        builtin_rule, extract_gsm8k_answer, gsm8k_reward,
                                        last_boxed, load_custom_reward, math_answers_equal,
                                        math_reward, normalize_math_answer)


@pytest.mark.parametrize("text, strict, flexible", [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", "72"),
    ("#### 1,000", "1000", "1000"),                       # thousands separators go
    ("#### -3", "-3", "-3"),
    ("first #### 5 then corrected #### 6", "6", "6"),     # the last one counts
    ("The answer is $1,234.", None, "1234."),             # flexible keeps verl's trailing '.'
    ("####72", None, "72"),                               # strict needs the space
    ("no digits here", None, None),
    ("#### 7 and then 9 more", "7", "9"),
    ("x" * 400 + "#### 3", "3", "3"),
    ("#### 3" + "x" * 400, None, None),                   # only the last 300 characters
    ("ends with a lone . ", None, None),
])
def test_gsm8k_extraction(text, strict, flexible):
    assert extract_gsm8k_answer(text, "strict") == strict
    assert extract_gsm8k_answer(text, "flexible") == flexible


def test_gsm8k_scores_as_verl():
    assert gsm8k_reward("#### 72", "72") == Judgement(1.0, "72", True)
    assert gsm8k_reward("#### 71", "72") == Judgement(0.0, "71", False)
    assert gsm8k_reward("#### 71", "72", format_score=0.1).score == 0.1  # formatted, wrong
    assert gsm8k_reward("71", "72", format_score=0.1).score == 0.0       # no answer at all
    assert gsm8k_reward("#### 72.0", "72").score == 0.0  # string equality, as verl
    assert gsm8k_reward("#### 1,000", 1000).score == 1.0  # a numeric ground truth
    assert gsm8k_reward("it is 72", "72", method="flexible").score == 1.0
    with pytest.raises(RewardError, match="strict"):
        extract_gsm8k_answer("#### 1", "loose")


@pytest.mark.parametrize("text, boxed", [
    (r"so $\boxed{5}$", "5"),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),  # nested braces
    (r"\boxed{1} first, finally \boxed{2}", "2"),             # the last one
    (r"\boxed{1} then \fbox{3}", "3"),
    (r"\fbox{a{b}c}", "a{b}c"),
    (r"the answer is $\boxed 7$.", "7"),
    (r"\boxed{}", ""),
    (r"\boxed{\frac{1}{2}", None),                            # cut off before the brace closes
    ("no box", None),
    (r"\boxedx", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("answer, normalized", [
    (r"\left( 3, 4 \right)", "(3,4)"),
    (r"\dfrac{3}{4}", r"\frac{3}{4}"),
    (r"\tfrac12", r"\frac{1}{2}"),
    (r"\frac1{72}", r"\frac{1}{72}"),
    (r"\frac{1}2", r"\frac{1}{2}"),
    (r"\frac\pi2", r"\frac{\pi}{2}"),
    (r"\frac{\sqrt3}{2}", r"\frac{\sqrt{3}}{2}"),
    (r"\sqrt[3]{x}", r"\sqrt[3]{x}"),
    ("3/4", r"\frac{3}{4}"),
    ("-3/4", r"-\frac{3}{4}"),
    (r"10\text{ cm}", "10"),
    (r"10 \text{cm}^2", "10"),
    (r"5\mbox{ inches}", "5"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", "30"),
    (r"\$18.90", "18.9"),
    (r"50\%", "50"),
    (r"x = 5", "5"),
    (r"k=\frac{1}{2}", r"\frac{1}{2}"),
    (r"y = 2x + 1", "2x+1"),
    (r"1\,000", "1000"),
    ("1,000,000", "1000000"),
    ("10{,}000", "10000"),
    ("(1,2)", "(1,2)"),
    ("3.0", "3"),
    ("2.50", "2.5"),
    (".5", "0.5"),
    ("-.5", "-0.5"),
    ("7.", "7"),
    (r"-\!3", "-3"),
    ("x \\in [1, 2]", r"x\in[1,2]"),
])
def test_normalize_math_answer(answer, normalized):
    assert normalize_math_answer(answer) == normalized


@pytest.mark.parametrize("a, b, equal", [
    ("0.5", r"\frac{1}{2}", True),
    ("1/2", r"\dfrac12", True),
    ("-0.25", r"-\frac{1}{4}", True),
    (r"\frac{-1}{4}", r"-\frac14", True),
    ("2", "2.000", True),
    ("2", "3", False),
    (r"\frac{1}{0}", r"\frac{1}{0}", True),  # same text, no number needed
    (r"\frac{2}{4}", r"\frac{1}{2}", True),
    (r"\sqrt{2}", r"\sqrt2", True),
    (r"\sqrt{2}", "2", False),
])
def test_math_answers_equal(a, b, equal):
    assert math_answers_equal(a, b) is equal


def test_math_reward():
    assert math_reward(r"So the answer is $\boxed{\dfrac{1}{2}}$.", r"\frac{1}{2}").score == 1.0
    assert math_reward(r"$\boxed{0.5}$", r"\frac12").score == 1.0
    assert math_reward(r"\boxed{3} hmm, no: \boxed{4}", "3").score == 0.0
    assert math_reward("The answer is 3.", "3") == Judgement(0.0, None, False)
    # a ground truth holding the whole reference solution
    solution = r"Since $2 \cdot 3 = 6$, the answer is $\boxed{6}$."
    assert math_reward(r"\boxed{6}", solution).score == 1.0


@pytest.mark.parametrize("source, rule", [
    ("openai/gsm8k", "gsm8k"), ("gsm8k", "gsm8k"), ("lighteval/MATH", "math"),
    ("DigitalLearningGmbH/MATH-lighteval", "math"), ("HuggingFaceH4/MATH-500", "math"),
    ("math", "math"), ("MATH", "math"), ("openai/humaneval", None),
])
def test_registry(source, rule):
    assert builtin_rule(source) == rule


def test_rule_rewards_dispatch_by_source():
    rewards = RuleRewards(gsm8k_method="flexible")
    assert rewards.judge("openai/gsm8k", "it is 72", "72").score == 1.0
    assert rewards.judge("lighteval/MATH", r"\boxed{72}", "72").score == 1.0
    assert rewards.judge("lighteval/MATH", "it is 72", "72").score == 0.0  # MATH needs a box
    assert not rewards.supports("unknown/source")
    with pytest.raises(RewardError, match="unknown/source"):
        rewards.judge("unknown/source", "1", "1")
    with pytest.raises(RewardError):
        RuleRewards(gsm8k_method="loose")


def test_custom_reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return float(solution_str.strip() == ground_truth)\n"
        "def with_answer(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    pred = solution_str.split()[-1]\n"
        "    return {'score': 2.0 if pred == ground_truth else -1.0, 'acc': pred == ground_truth,\n"
        "            'pred': pred, 'split': extra_info['split']}\n"
        "def three_args(data_source, solution_str, ground_truth):\n"
        "    return True\n"
        "def bad_type(data_source, solution_str, ground_truth):\n"
        "    return 'yes'\n"
        "def no_score(data_source, solution_str, ground_truth):\n"
        "    return {'acc': 1}\n"
        "def broken(data_source, solution_str, ground_truth):\n"
        "    raise KeyError('gt')\n")
    plain = load_custom_reward(path)
    assert plain.judge("anything", " 7 ", "7") == Judgement(1.0, None, None)
    assert not plain.extracts_answers()

    rich = load_custom_reward(path, "with_answer")
    assert rich.judge("x", "it is 7", "7", {"split": "test"}) == Judgement(2.0, "7", True)
    assert rich.judge("x", "it is 8", "7", {"split": "test"}) == Judgement(-1.0, "8", False)
    assert rich.extracts_answers()

    assert load_custom_reward(path, "three_args").judge("x", "a", "b", {"i": 1}).score == 1.0
    for name, message in [("bad_type", "returned str"), ("no_score", "without 'score'"),
                          ("broken", "raised KeyError")]:
        with pytest.raises(RewardError, match=message):
            load_custom_reward(path, name).judge("x", "a", "b")


def test_custom_reward_load_errors(tmp_path):
    with pytest.raises(RewardError, match="not found"):
        load_custom_reward(tmp_path / "missing.py")
    path = tmp_path / "r.py"
    path.write_text("def other(*args):\n    return 0\n")
    with pytest.raises(RewardError, match="no function 'compute_score'"):
        load_custom_reward(path)
    path.write_text("import not_a_module_anywhere\n")
    with pytest.raises(RewardError, match="ModuleNotFoundError"):
        load_custom_reward(path)
