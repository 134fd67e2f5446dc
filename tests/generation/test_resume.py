"""Nothing lost: a real job killed with SIGKILL once its first parts are written, then started
again with the same command, ends with every input row exactly once, in input order, equal (with
its fixed seed) to an uninterrupted run's output, and leaves the parts written before the kill
untouched."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from fastgen.entrypoints.generate import main
from tests.generation.conftest import gsm8k_table, job_args, write_parquet

ROWS = 48


def test_a_killed_job_resumes_without_redoing_finished_parts(tiny_model, tmp_path, capsys):
    data = write_parquet(gsm8k_table(ROWS), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    # Two sequences at a time and no early EOS: slow enough to be killed mid-way.
    keys = {"rollout.response_length": 24, "rollout.ignore_eos": "true",
            "rollout.max_num_seqs": 2, "rollout.seed": 3}
    command = [sys.executable, "-m", "fastgen.entrypoints.generate",
               *job_args(tiny_model, data, out, **keys), "--keep-parts"]
    parts_dir = tmp_path / "out.parquet.parts"

    job = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(parts_dir.glob("rows-*.parquet")):
        assert job.poll() is None, job.stderr.read()
        assert time.monotonic() < deadline, "no part written within 60 s"
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    job.communicate()
    assert job.returncode == -signal.SIGKILL
    assert not out.exists()
    before = {p.name: os.stat(p).st_mtime_ns for p in parts_dir.glob("rows-*.parquet")}
    done = sum(pq.read_metadata(parts_dir / name).num_rows for name in before)
    assert 0 < done < ROWS

    again = subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {done} rows already in" in again.stderr
    assert f"{ROWS} rows ({done} resumed from parts)" in again.stderr
    for name, mtime in before.items():  # finished parts were skipped, not written again
        assert os.stat(parts_dir / name).st_mtime_ns == mtime

    resumed = pq.read_table(out)
    assert [r["index"] for r in resumed.column("extra_info").to_pylist()] == list(range(ROWS))
    assert resumed.drop_columns(["responses"]).equals(gsm8k_table(ROWS))

    whole = tmp_path / "whole.parquet"
    assert main(job_args(tiny_model, data, whole, **keys)) == 0, capsys.readouterr().err
    assert resumed.column("responses").equals(pq.read_table(whole).column("responses"))
