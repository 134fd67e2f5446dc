"""fastgen-eval end to end: verl-format GSM8K and MATH files with `responses` lists, scored and
checked against numbers worked out by hand; a user reward; the one-line errors."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastgen.entrypoints.eval import main
from fastgen.evaluation import EvalConfig, EvalError, evaluate

QUESTION_SUFFIX = " Let's think step by step and output the final answer after \"####\"."


def verl_row(data_source: str, index: int, ground_truth: str, responses: list[str]) -> dict:
    """A row as verl's preprocessing writes it, plus the responses fastgen-generate adds."""
    question = f"question {index}"
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": question + QUESTION_SUFFIX}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": "test", "index": index, "answer": ground_truth,
                       "question": question},
        "responses": responses,
    }


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture
def gsm8k_file(tmp_path):
    return write_parquet(tmp_path / "gsm8k.parquet", [
        # strict: right, wrong, no "####" (flexible: right), right          -> c = 2 (flexible 3)
        verl_row("openai/gsm8k", 0, "72", ["48 + 24 = 72 clips.\n#### 72", "#### 70",
                                           "The answer is 72", "So #### 72"]),
        verl_row("openai/gsm8k", 1, "1000", ["#### 1,000"] * 4),            # c = 4
        verl_row("openai/gsm8k", 2, "5", ["#### 4", "#### 4", "#### 5", "no idea"]),  # c = 1
    ])


@pytest.fixture
def math_file(tmp_path):
    return write_parquet(tmp_path / "math.parquet", [
        verl_row("lighteval/MATH", 0, r"\frac{1}{2}",
                 [r"So $\boxed{\dfrac12}$.", r"$\boxed{0.5}$"]),
        verl_row("lighteval/MATH", 1, "10", [r"\boxed{10\text{ cm}}", r"\boxed{11}"]),
        verl_row("HuggingFaceH4/MATH-500", 2, "(3,4)", [r"\boxed{\left(3, 4\right)}", "no box"]),
    ])


def test_gsm8k_by_hand(gsm8k_file):
    [source] = evaluate(EvalConfig(gsm8k_file)).sources
    assert (source.data_source, source.rows, source.samples) == ("openai/gsm8k", 3, "4")
    # per row 2/4, 4/4, 1/4
    assert source.mean_score == pytest.approx((0.5 + 1 + 0.25) / 3)
    assert list(source.pass_at_k) == [1, 2, 4]
    assert source.pass_at_k[1] == pytest.approx((0.5 + 1 + 0.25) / 3)
    # pass@2 = 1 - C(n-c, 2) / C(4, 2): rows 1 - 1/6, 1, 1 - 3/6
    assert source.pass_at_k[2] == pytest.approx((5 / 6 + 1 + 1 / 2) / 3)
    assert source.pass_at_k[4] == 1.0
    # votes: 72 (right), 1000 (right), 4 beats 5 (wrong)
    assert source.majority == pytest.approx(2 / 3)


def test_gsm8k_options(gsm8k_file):
    [flexible] = evaluate(EvalConfig(gsm8k_file, gsm8k_method="flexible")).sources
    assert flexible.mean_score == pytest.approx((0.75 + 1 + 0.25) / 3)
    [formatted] = evaluate(EvalConfig(gsm8k_file, format_score=0.1)).sources
    # wrong but formatted answers earn 0.1: rows (1 + .1 + 0 + 1) / 4, 1, (.1 + .1 + 1 + 0) / 4
    assert formatted.mean_score == pytest.approx((2.1 / 4 + 1 + 1.2 / 4) / 3)
    assert formatted.pass_at_k[1] == pytest.approx((0.5 + 1 + 0.25) / 3)  # still only right ones


def test_math_by_hand(math_file):
    math, math500 = evaluate(EvalConfig(math_file)).sources
    assert (math.data_source, math.rows, math.samples) == ("lighteval/MATH", 2, "2")
    assert math.mean_score == pytest.approx((1 + 0.5) / 2)
    assert math.pass_at_k == pytest.approx({1: 0.75, 2: 1.0})
    assert math.majority == 1.0  # row 1's tie (10 vs 11) goes to the first: right
    assert (math500.data_source, math500.rows) == ("HuggingFaceH4/MATH-500", 1)
    assert math500.mean_score == 0.5
    assert math500.pass_at_k == pytest.approx({1: 0.5, 2: 1.0})
    assert math500.majority == 1.0  # the unboxed response does not vote


def test_rows_without_responses_are_skipped(tmp_path):
    rows = [verl_row("openai/gsm8k", 0, "3", ["#### 3", "#### 4"]),
            verl_row("openai/gsm8k", 1, "5", []),  # a prompt fastgen-generate rejected
            verl_row("lighteval/MATH", 2, "1", [r"\boxed{1}", r"\boxed{1}"])]
    gsm8k, math = evaluate(EvalConfig(write_parquet(tmp_path / "gen.parquet", rows))).sources
    assert (gsm8k.rows, gsm8k.skipped, gsm8k.mean_score) == (1, 1, 0.5)
    assert (math.rows, math.skipped, math.mean_score) == (1, 0, 1.0)


def test_custom_reward_and_renamed_columns(tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text(
        "def score_last_word(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    assert extra_info['split'] == 'test'\n"
        "    pred = solution_str.split()[-1]\n"
        "    return {'score': 1.0 if pred == ground_truth else -1.0, 'acc': pred == ground_truth,\n"
        "            'pred': pred}\n")
    rows = [verl_row("my/task", i, gt, responses) for i, (gt, responses) in enumerate([
        ("a", ["x a", "y b", "z b"]),   # scores 1, -1, -1; b wins the vote: wrong
        ("c", ["c", "c"]),              # n differs: pass@k stops at 2
    ])]
    for row in rows:
        row["outputs"], row["source"], row["rm"] = (row.pop("responses"), row.pop("data_source"),
                                                    row.pop("reward_model"))
    path = write_parquet(tmp_path / "custom.parquet", rows)
    config = {"data_path": path, "response_key": "outputs", "data_source_key": "source",
              "reward_model_key": "rm"}
    with pytest.raises(EvalError, match="no built-in reward for data_source 'my/task'"):
        evaluate(EvalConfig(**config))
    [source] = evaluate(EvalConfig(**config, custom_reward_path=str(reward),
                                   custom_reward_name="score_last_word")).sources
    assert source.samples == "2-3"
    assert source.mean_score == pytest.approx((-1 / 3 + 1) / 2)
    assert source.pass_at_k == pytest.approx({1: (1 / 3 + 1) / 2, 2: (2 / 3 + 1) / 2})
    assert source.majority == 0.5


def test_custom_reward_without_answers_has_no_majority(tmp_path, gsm8k_file):
    reward = tmp_path / "reward.py"
    reward.write_text("def compute_score(data_source, solution_str, ground_truth):\n"
                      "    return 0.5 if ground_truth in solution_str else 0.0\n")
    [source] = evaluate(EvalConfig(gsm8k_file, custom_reward_path=str(reward))).sources
    assert source.majority is None
    assert source.pass_at_k[1] == 0.0  # 0.5 is below the default threshold of 1
    [source] = evaluate(EvalConfig(gsm8k_file, custom_reward_path=str(reward),
                                   correct_threshold=0.5)).sources
    # the ground truth as text in 3/4, 0/4 ("1000" is not in "1,000") and 1/4 of the responses
    assert source.pass_at_k[1] == pytest.approx((0.75 + 0 + 0.25) / 3)


def test_cli_table_and_json(gsm8k_file, math_file, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert main([f"data.path={gsm8k_file}", "data.response_key=responses", "ray_init.num_cpus=4",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["data", "source", "rows", "skipped", "n", "score", "pass@1",
                                "pass@2", "pass@4", "maj@n"]
    assert table[1].split() == ["openai/gsm8k", "3", "0", "4", "0.5833", "0.5833", "0.7778",
                                "1.0000", "0.6667"]
    report = json.loads(out.read_text())
    assert report["metrics"]["test_score/openai/gsm8k"] == pytest.approx(7 / 12)
    assert report["metrics"]["maj@4/openai/gsm8k"] == pytest.approx(2 / 3)
    assert report["sources"][0]["pass_at_k"]["2"] == pytest.approx(7 / 9)

    assert main([math_file, "--json", "-"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["test_score/lighteval/MATH"] == 0.75
    assert metrics["pass@2/HuggingFaceH4/MATH-500"] == 1.0


def test_cli_as_module(gsm8k_file):
    done = subprocess.run([sys.executable, "-m", "fastgen.entrypoints.eval", "--gsm8k-method",
                           "flexible", "--data-path", gsm8k_file], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[4] == "0.6667"


def expect_error(capsys, argv, status, message):
    assert main(argv) == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("fastgen-eval: error: ") and message in err, err


def test_usage_errors(capsys, gsm8k_file):
    expect_error(capsys, [], 2, "no input file")
    expect_error(capsys, [f"data.path={gsm8k_file}", "data.prompt_length=3"], 2,
                 "unknown key 'data.prompt_length'")
    expect_error(capsys, [gsm8k_file, "--data-path", "other.parquet"], 2, "two input files")
    expect_error(capsys, [gsm8k_file, "--gsm8k-method", "loose"], 2, "invalid choice")
    expect_error(capsys, [gsm8k_file, "data.foo=null"], 2, "unknown key 'data.foo'")


def test_verl_keys_null_and_ignored(gsm8k_file, capsys):
    assert main([f"data.path={gsm8k_file}", "custom_reward_function.path=null",
                 "data.use_shm=False", "ray_init.num_cpus=8",
                 "+data.response_key=responses"]) == 0
    assert "0.5833" in capsys.readouterr().out


def test_input_errors(capsys, tmp_path, gsm8k_file):
    expect_error(capsys, [str(tmp_path / "missing.parquet")], 1, "no such file")
    text = tmp_path / "not.parquet"
    text.write_text("hello")
    expect_error(capsys, [str(text)], 1, "cannot read")
    expect_error(capsys, [gsm8k_file, "data.response_key=answers"], 1,
                 "has no column 'answers' (data.response_key)")
    expect_error(capsys, [gsm8k_file, "custom_reward_function.path=" + str(tmp_path / "r.py")], 1,
                 "custom reward file not found")
    unknown = write_parquet(tmp_path / "unknown.parquet",
                            [verl_row("openai/humaneval", 0, "1", ["1"])])
    expect_error(capsys, [unknown], 1, "no built-in reward for data_source 'openai/humaneval'")
    empty = write_parquet(tmp_path / "empty.parquet", [verl_row("openai/gsm8k", 0, "1", [])])
    expect_error(capsys, [empty], 1, "no row of data_source 'openai/gsm8k' has responses")
    numbers = write_parquet(tmp_path / "numbers.parquet", [verl_row("openai/gsm8k", 0, "1", [1])])
    expect_error(capsys, [numbers], 1, "row 0: column 'responses' must hold lists of strings")
    no_truth = verl_row("openai/gsm8k", 0, "1", ["#### 1"])
    no_truth["reward_model"] = {"style": "rule"}
    expect_error(capsys, [write_parquet(tmp_path / "nogt.parquet", [no_truth])], 1,
                 "row 0: column 'reward_model' has no 'ground_truth'")
    broken = tmp_path / "broken.py"
    broken.write_text("def compute_score(data_source, solution_str, ground_truth):\n"
                      "    return 1 / 0\n")
    expect_error(capsys, [gsm8k_file, f"custom_reward_function.path={broken}"], 1,
                 "row 0: custom reward broken.py:compute_score raised ZeroDivisionError")
