"""The job's work folder, `<output_path>.parts/` beside the output file: one parquet part per
finished batch of rows, named by the global rows it holds (`rows-000000128-000000256.parquet`:
rows 128 to 255), and job.json, what the results depend on.

A part is written to a temporary name and renamed into place (os.replace is atomic), so a job
killed at any moment leaves only whole parts; a restarted job skips the rows they hold, whatever
the batch size or the number of processes was, and refuses a folder left by a different job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fastgen.generation.config import ConfigError

MANIFEST = "job.json"
_PART = re.compile(r"rows-(\d+)-(\d+)\.parquet")

# One row of results, as parts hold them ("_row" is the row's index in the input file).
PART_SCHEMA = pa.schema([
    ("_row", pa.int64()),
    ("responses", pa.list_(pa.string())),
    ("response_token_ids", pa.list_(pa.list_(pa.int32()))),
    ("finish_reasons", pa.list_(pa.string())),
    ("prompt_tokens", pa.int32()),
    ("response_tokens", pa.list_(pa.int32())),
    ("prompt_truncated", pa.bool_()),
])


@dataclass(frozen=True)
class Part:
    start: int  # first row
    end: int    # one past the last row
    path: Path


def work_dir_for(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + ".parts")


def write_atomic(table: pa.Table, path: Path) -> None:
    """Writes table to path through a temporary file in the same folder and os.replace, after
    an fsync: readers see the old file or the whole new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WorkDir:
    def __init__(self, path: Path):
        self.path = path

    def prepare(self, manifest: dict) -> None:
        """Creates the folder with its manifest, or checks that an existing one is this job's.
        Runs before any part is written, so leftover temporary files are a killed job's."""
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in self.path.glob(".*.tmp-*"):
            entry.unlink(missing_ok=True)
        file = self.path / MANIFEST
        if file.is_file():
            found = json.loads(file.read_text())
            differ = sorted(k for k in manifest.keys() | found.keys()
                            if manifest.get(k) != found.get(k))
            if differ:
                raise ConfigError(f"{self.path} holds parts of a different job (it differs in "
                                  f"{', '.join(differ)}); delete it to start over, or choose "
                                  f"another data.output_path")
            return
        tmp = self.path / f".{MANIFEST}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, file)

    def parts(self) -> list[Part]:
        """The finished parts, by first row."""
        if not self.path.is_dir():
            return []
        found = []
        for entry in self.path.iterdir():
            match = _PART.fullmatch(entry.name)
            if match:
                found.append(Part(int(match[1]), int(match[2]), entry))
        return sorted(found, key=lambda p: p.start)

    def write_part(self, start: int, end: int, table: pa.Table) -> Part:
        path = self.path / f"rows-{start:09d}-{end:09d}.parquet"
        write_atomic(table, path)
        return Part(start, end, path)

    def read_rows(self, rows: range) -> pa.Table:
        """The results of the given rows held by the parts (each row once), by row."""
        tables = []
        for part in self.parts():
            if part.end <= rows.start or part.start >= rows.stop:
                continue
            table = pq.read_table(part.path, schema=PART_SCHEMA)
            row = table.column("_row")
            keep = pc.and_(pc.greater_equal(row, rows.start), pc.less(row, rows.stop))
            tables.append(table.filter(keep))
        if not tables:
            return PART_SCHEMA.empty_table()
        return pa.concat_tables(tables).sort_by("_row")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def covered_rows(parts: list[Part]) -> set[int]:
    covered: set[int] = set()
    for part in parts:
        covered.update(range(part.start, part.end))
    return covered
