"""The job end to end on the tiny model, in this process: chat and plain-text prompts, n samples,
every input column back in input order, the detail columns, truncation counted, rows that do not
depend on the batch size; and bad input reported in one line before any model is loaded."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastgen.entrypoints.generate import main
from tests.entrypoints.llm_spy import llm_arguments
from tests.generation.conftest import gsm8k_table, job_args, write_parquet


def run_job(capsys, *args) -> tuple[int, str]:
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err


def test_chat_prompts_keep_every_column_in_order(tiny_model, tmp_path, capsys):
    table = gsm8k_table(10)
    data = write_parquet(table, tmp_path / "in.parquet")
    out = tmp_path / "out" / "gen.parquet"  # a folder that does not exist yet
    status, err = run_job(capsys, *job_args(tiny_model, data, out, **{"data.n_samples": 3}))
    assert status == 0, err
    result = pq.read_table(out)
    assert result.column_names == [*table.column_names, "responses"]
    assert result.drop_columns(["responses"]).equals(table)
    responses = result.column("responses").to_pylist()
    assert all(len(r) == 3 and all(isinstance(s, str) for s in r) for r in responses)
    assert "10 rows (0 resumed from parts), 30 samples" in err
    assert not (tmp_path / "out" / "gen.parquet.parts").exists()  # removed once assembled


def test_plain_text_prompts_with_details_and_truncation(tiny_model, tmp_path, capsys):
    prompts = ["short", "a much longer prompt " * 8, "Once upon a time", "The capital of"]
    data = write_parquet(pa.table({"id": [7, 8, 9, 10], "question": prompts}),
                         tmp_path / "text.parquet")
    out = tmp_path / "out.parquet"
    status, err = run_job(capsys, *job_args(tiny_model, data, out), "--prompt-key", "question",
                          "--save-details", "--no-chat-template", "rollout.prompt_length=12",
                          "rollout.response_length=5", "rollout.ignore_eos=true")
    assert status == 0, err
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == [7, 8, 9, 10]
    assert [r["prompt_truncated"] for r in rows] == [False, True, False, False]
    assert rows[1]["prompt_tokens"] > 12
    for r in rows:
        assert r["response_tokens"] == [5, 5]
        assert [len(ids) for ids in r["response_token_ids"]] == [5, 5]
        assert r["finish_reasons"] == ["length", "length"]
    assert "1 prompts over 12 tokens (cut, left)" in err


def test_rejected_prompts_keep_their_row_without_responses(tiny_model, tmp_path, capsys):
    data = write_parquet(pa.table({"prompt": ["hi", "a long prompt " * 20]}),
                         tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    status, err = run_job(capsys, *job_args(tiny_model, data, out), "rollout.prompt_length=32",
                          "data.truncation=reject")
    assert status == 0, err
    assert [len(r) for r in pq.read_table(out).column("responses").to_pylist()] == [2, 0]
    assert "1 prompts over 32 tokens (1 rejected)" in err
    status, err = run_job(capsys, *job_args(tiny_model, data, tmp_path / "o2.parquet"),
                          "rollout.prompt_length=32", "data.truncation=error")
    assert status == 1 and "row 1's prompt has" in err


def test_responses_do_not_depend_on_the_batch_size(tiny_model, tmp_path, capsys):
    data = write_parquet(gsm8k_table(9), tmp_path / "in.parquet")
    outs = []
    for batch_size in (2, 9):
        out = tmp_path / f"out-{batch_size}.parquet"
        status, err = run_job(capsys, *job_args(tiny_model, data, out, **{
            "data.batch_size": batch_size, "rollout.seed": 5, "rollout.max_num_seqs": 3}))
        assert status == 0, err
        outs.append(pq.read_table(out).column("responses").to_pylist())
    assert outs[0] == outs[1]
    assert len({r[0] for r in outs[0]}) > 1  # rows do differ: seeds are per row


@pytest.mark.parametrize("make_input, message", [
    (lambda p: None, "does not exist"),
    (lambda p: write_parquet(pa.table({"question": ["a"]}), p),
     "has no column 'prompt' (columns: question); set data.prompt_key"),
    (lambda p: write_parquet(pa.table({"prompt": [1, 2]}), p),
     "column 'prompt' holds int64; expected text or a chat list"),
    (lambda p: write_parquet(pa.table({"prompt": pa.array([], pa.string())}), p), "has no rows"),
    (lambda p: write_parquet(pa.table({"prompt": ["a", None]}), p), "row 1 of column 'prompt' is null"),
    (lambda p: p.write_text("not parquet"), "cannot read"),
])
def test_bad_input_fails_in_one_line_before_loading_the_model(tmp_path, capsys, make_input,
                                                              message):
    data = tmp_path / "in.parquet"
    make_input(data)
    # A model that does not exist: an error about the data shows it was never loaded.
    status, err = run_job(capsys, *job_args(tmp_path / "no-model", data, tmp_path / "o.parquet"))
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("fastgen-generate: error: ")
    assert message in err


def test_a_json_schema_constrains_every_response(tiny_model, tmp_path, capsys):
    import json

    import jsonschema

    schema = {"type": "object", "required": ["answer"], "additionalProperties": False,
              "properties": {"answer": {"type": "integer"}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    data = write_parquet(gsm8k_table(4), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    status, err = run_job(capsys, *job_args(tiny_model, data, out), "--json-schema",
                          tmp_path / "schema.json", "rollout.response_length=24",
                          "rollout.top_k=0", "rollout.top_p=1.0", "--save-details")
    assert status == 0, err
    for row in pq.read_table(out).to_pylist():
        for response, reason in zip(row["responses"], row["finish_reasons"]):
            if reason == "stop":
                jsonschema.validate(json.loads(response), schema)
            else:  # 24 tokens may not reach the end of a long integer
                assert response.startswith('{"answer": ')
    (tmp_path / "bad.json").write_text("{not json")
    status, err = run_job(capsys, *job_args(tmp_path / "no-model", data, tmp_path / "o.parquet"),
                          "--json-schema", tmp_path / "bad.json")
    assert status == 1 and "bad.json is not JSON" in err and err.count("\n") == 1
    (tmp_path / "invalid.json").write_text('{"type": "nonsense"}')
    status, err = run_job(capsys, *job_args(tiny_model, data, tmp_path / "o.parquet"),
                          "--json-schema", tmp_path / "invalid.json")
    assert status == 1 and "nonsense" in err


def test_command_line_errors_exit_2(tmp_path, capsys):
    status, err = run_job(capsys, "data.path=x.parquet", "data.output_path=o.parquet", "foo.bar=1")
    assert status == 2 and err == "fastgen-generate: error: unknown config key: foo.bar\n"
    (tmp_path / "bad.yaml").write_text("rollout: {top_k: [\n")
    status, err = run_job(capsys, "--config", tmp_path / "bad.yaml")
    assert status == 2 and "is not valid YAML" in err and err.count("\n") == 1


def test_a_work_folder_of_another_job_is_refused(tiny_model, tmp_path, capsys):
    data = write_parquet(gsm8k_table(3), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    args = job_args(tiny_model, data, out)
    assert run_job(capsys, *args, "--keep-parts")[0] == 0
    status, err = run_job(capsys, *args, "data.n_samples=4")
    assert status == 1 and "holds parts of a different job (it differs in data.n_samples)" in err


def test_enforce_eager_reaches_the_engine(tmp_path, capsys, monkeypatch):
    data = write_parquet(gsm8k_table(2), tmp_path / "in.parquet")
    argv = [*job_args(tmp_path / "model", data, tmp_path / "out.parquet"),
            "rollout.enforce_eager=true"]
    assert llm_arguments(monkeypatch, main, argv)["enforce_eager"] is True
    assert "stopped before loading the model" in capsys.readouterr().err


def test_a_deepseek_v2_lite_folder_runs_the_verl_job_unchanged(tmp_path, capsys):
    """verl's DeepSeek-V2-Lite math example with model.path pointing at a V2-Lite-shaped folder:
    the same keys, every row answered (n samples each), columns kept."""
    from tests.engine.tiny_model import save_tiny_deepseek_v2_lite

    model = save_tiny_deepseek_v2_lite(tmp_path / "tiny-deepseek-v2-lite")
    table = gsm8k_table(5)
    data = write_parquet(table, tmp_path / "in.parquet")
    out = tmp_path / "gen.parquet"
    status, err = run_job(capsys, *job_args(model, data, out, **{
        "data.n_samples": 2, "rollout.temperature": 1.0, "rollout.top_k": 50,
        "rollout.top_p": 0.7}))
    assert status == 0, err
    result = pq.read_table(out)
    assert result.drop_columns(["responses"]).equals(table)
    assert all(len(r) == 2 for r in result.column("responses").to_pylist())
    assert "5 rows (0 resumed from parts), 10 samples" in err
