"""The generation job: the input's rows, split across data-parallel groups, go to the engine a
batch at a time with n = data.n_samples samples each; every finished batch is saved as a part
(parts.py), so a killed job restarts where it stopped; rank 0 gathers every shard's rows and
writes the output: each input column, in input order, plus `responses`.

The engine is fed at least one batch ahead of the one being finished (more while it has room), so
continuous batching never runs dry at a batch's tail; a kill loses only the batches in flight. Row i's sample j is drawn with seed rollout.seed + i * n_samples + j: the
responses do not depend on the batch size, the number of processes, or where a job resumed.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from fastgen.generation.config import ConfigError, JobConfig, Truncation
from fastgen.generation.data import Prompts, encode_prompt, read_prompts, truncate
from fastgen.generation.distributed import Group, Layout
from fastgen.generation.parts import PART_SCHEMA, WorkDir, covered_rows, work_dir_for, write_atomic

DETAIL_COLUMNS = ("response_token_ids", "finish_reasons", "prompt_tokens", "response_tokens",
                  "prompt_truncated")
# What the results depend on: a work folder written with other values is refused.
RESULT_KEYS = ("data.prompt_key", "data.n_samples", "data.truncation", "data.chat_template",
               "model.path", "rollout.temperature", "rollout.top_k", "rollout.top_p",
               "rollout.do_sample", "rollout.prompt_length", "rollout.response_length",
               "rollout.ignore_eos", "rollout.seed", "rollout.dtype", "rollout.max_model_len",
               "rollout.json_schema")


@dataclass
class ShardStats:
    """One process's work in this run."""

    rows: int = 0            # rows generated now (not resumed)
    tokens: int = 0          # tokens generated now
    seconds: float = 0.0


@dataclass
class Summary:
    rows: int                # in the output
    resumed_rows: int        # found in parts written before this run
    samples: int
    tokens: int              # generated in this run
    seconds: float
    truncated: int           # prompts over rollout.prompt_length
    rejected: int            # ... of which got no responses
    output_path: Path

    def line(self, prompt_length: int, truncation: str) -> str:
        rate = self.rows - self.resumed_rows
        seconds = max(self.seconds, 1e-9)
        text = (f"{self.rows} rows ({self.resumed_rows} resumed from parts), {self.samples} "
                f"samples, {self.tokens} tokens generated in {self.seconds:.1f} s: "
                f"{rate / seconds:.2f} rows/s, {self.tokens / seconds:.1f} tokens/s; "
                f"{self.truncated} prompts over {prompt_length} tokens")
        if self.truncated:
            text += (f" ({self.rejected} rejected)" if truncation == Truncation.REJECT
                     else f" (cut, {truncation})")
        return f"{text}; wrote {self.output_path}"


@dataclass
class _Batch:
    rows: list[int]                                        # global row indices, contiguous
    results: dict[int, dict] = field(default_factory=dict)  # row -> PART_SCHEMA fields

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.rows)


def manifest(config: JobConfig, prompts: Prompts) -> dict:
    stat = config.data_path.stat()
    return {"data.path": str(config.data_path.resolve()), "rows": len(prompts),
            "bytes": stat.st_size, **{key: config[key] for key in RESULT_KEYS}}


def say(message: str) -> None:
    print(f"fastgen-generate: {message}", file=sys.stderr, flush=True)


def run(config: JobConfig, layout: Layout) -> Summary | None:
    """Runs the job in this process; rank 0 returns the summary, other ranks None."""
    device = config["trainer.device"]
    group = Group(layout, "cuda" if device == "cuda" or (device == "auto" and _has_cuda())
                  else "cpu")
    try:
        return _run(config, layout, group)
    finally:
        group.close()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(config: JobConfig, layout: Layout, group: Group) -> Summary | None:
    work = WorkDir(work_dir_for(config.output_path))
    prompts, constraint, error = None, None, None
    try:  # everything checkable without the model, on every rank before any is loaded
        constraint = read_json_schema(config["rollout.json_schema"])
        prompts = read_prompts(config.data_path, config["data.prompt_key"])
        if layout.is_main:
            work.prepare(manifest(config, prompts))
    except ValueError as e:
        error = str(e)
    _raise_first(group.gather_all(error))
    if not layout.is_main:  # the main rank's folder first; on a shared file system, the same
        try:
            work.prepare(manifest(config, prompts))
        except ValueError as e:
            error = str(e)
    _raise_first(group.gather_all(error))
    if layout.is_main and config.ignored:
        say(f"ignored verl keys with no effect in fastgen: {', '.join(config.ignored)}")
    _check_world(config, layout)

    if layout.world_size > 1 and layout.tp_rank != 0:
        # A tensor-parallel worker of its group's engine: its shard of every step, then its
        # (empty) part of the gathers below.
        from fastgen.engine.parallel import serve_as_worker

        serve_as_worker(config.engine_config())
        group.gather((None, None))
        group.broadcast(None)
        return None

    from fastgen.entrypoints.llm import LLM

    llm = LLM.from_engine_config(config.engine_config())
    if constraint is not None:
        llm.engine.grammars.compile(constraint)  # an invalid schema fails now, not mid-job
    shard = layout.shard(len(prompts))
    done = covered_rows(work.parts())
    pending = [row for row in shard if row not in done]
    if layout.is_main and done:
        say(f"resuming: {len(done)} rows already in {work.path}, skipped")
    try:
        stats = _generate(llm, config, prompts, pending, work, layout, len(shard) - len(pending),
                          constraint)
    finally:
        llm.engine.close()  # the group's workers, if any, go on to the gathers
    payload = _to_ipc(work.read_rows(shard))
    gathered = [part for part in group.gather((payload, stats)) or [] if part[0] is not None]
    summary = None
    if layout.is_main:
        results = pa.concat_tables([_from_ipc(p) for p, _ in gathered])
        summary = _assemble(config, prompts, results, [s for _, s in gathered])
    group.broadcast(None)  # the output is written: every rank may now remove its parts
    if not config["data.keep_parts"]:
        work.remove()
    return summary


def _raise_first(errors: list[str | None]) -> None:
    for error in errors:
        if error is not None:
            raise ConfigError(error)


def _check_world(config: JobConfig, layout: Layout) -> None:
    nnodes, per_node = config["trainer.nnodes"], config["trainer.n_gpus_per_node"]
    if nnodes is None and per_node is None:
        return
    expected = (nnodes or 1) * (per_node or 1)
    if expected != layout.world_size and layout.is_main:
        say(f"trainer.nnodes x trainer.n_gpus_per_node = {expected}, but this job has "
            f"{layout.world_size} process(es); launch with torchrun (--nnodes, --nproc-per-node) "
            f"to use more")


def _encode(llm, config: JobConfig, prompts: Prompts, rows: list[int]):
    """Per row: (token ids or None when rejected, prompt length in tokens, truncated)."""
    limit = min(config["rollout.prompt_length"], llm.max_model_len - 1)
    mode = config["data.truncation"]
    encoded = {}
    for row in rows:
        ids = encode_prompt(llm.tokenizer, prompts.prompts[row], config["data.chat_template"])
        kept, truncated = truncate(ids, limit, mode)
        if truncated and mode == Truncation.ERROR:
            raise ConfigError(f"row {row}'s prompt has {len(ids)} tokens, over "
                              f"rollout.prompt_length={limit} (data.truncation=error)")
        encoded[row] = (kept, len(ids), truncated)
    return encoded


def _batches(rows: list[int], size: int) -> list[list[int]]:
    """Runs of consecutive rows, cut every size rows: each becomes one part."""
    batches: list[list[int]] = []
    for row in rows:
        if batches and batches[-1][-1] == row - 1 and len(batches[-1]) < size:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def read_json_schema(path: str | None):
    """The StructuredOutputs of a JSON Schema file (None without one); ValueError naming the file
    when it cannot be read or is not JSON."""
    if path is None:
        return None
    from fastgen.config import StructuredOutputs

    try:
        schema = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"rollout.json_schema: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"rollout.json_schema: {path} is not JSON: {e}") from None
    return StructuredOutputs(json=schema)


def _generate(llm, config: JobConfig, prompts: Prompts, pending: list[int], work: WorkDir,
              layout: Layout, resumed: int, constraint) -> ShardStats:
    from fastgen.config import SamplingParams
    from fastgen.outputs import RequestOutputKind

    encoded = _encode(llm, config, prompts, pending)
    n = config["data.n_samples"]
    engine = llm.engine
    waiting = deque(_Batch(rows) for rows in _batches(pending, config["data.batch_size"]))
    in_flight: list[_Batch] = []
    owner: dict[int, tuple[_Batch, int]] = {}  # request id -> (batch, row)
    progress = _progress(resumed + len(pending), resumed, layout)
    stats = ShardStats()
    start = time.perf_counter()
    try:
        while waiting or in_flight:
            # At least the batch being finished and the next, and more while the engine has
            # room for more sequences than it was given.
            while waiting and (len(in_flight) < 2 or (
                    engine.num_waiting == 0 and engine.num_running < engine.config.max_num_seqs)):
                batch = waiting.popleft()
                in_flight.append(batch)
                for row in batch.rows:
                    ids, num_prompt_tokens, truncated = encoded[row]
                    if ids is None:
                        batch.results[row] = _record(row, [], num_prompt_tokens, truncated)
                        continue
                    params = SamplingParams(
                        n=n, max_tokens=config["rollout.response_length"],
                        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                        ignore_eos=config["rollout.ignore_eos"],
                        seed=config["rollout.seed"] + row * n, structured_outputs=constraint)
                    request_id = engine.add_request(ids, params,
                                                    output_kind=RequestOutputKind.FINAL_ONLY)
                    owner[request_id] = (batch, row)
            # Only finished requests have outputs (FINAL_ONLY).
            for out in engine.step() if engine.has_unfinished() else []:
                batch, row = owner.pop(out.request_id)
                _, num_prompt_tokens, truncated = encoded[row]
                batch.results[row] = _record(row, out.outputs, num_prompt_tokens, truncated)
                stats.tokens += sum(len(o.token_ids) for o in out.outputs)
                if progress is not None:
                    progress.update(1)
                    elapsed = time.perf_counter() - start
                    progress.set_postfix_str(f"{stats.tokens / elapsed:.1f} tokens/s",
                                             refresh=False)
            for batch in [b for b in in_flight if b.done]:
                in_flight.remove(batch)
                rows = [batch.results[row] for row in batch.rows]
                work.write_part(batch.rows[0], batch.rows[-1] + 1,
                                pa.Table.from_pylist(rows, schema=PART_SCHEMA))
                stats.rows += len(rows)
    finally:
        for request_id in owner:
            engine.abort_request(request_id)
        if progress is not None:
            progress.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _record(row: int, samples, num_prompt_tokens: int, truncated: bool) -> dict:
    return {"_row": row, "responses": [s.text for s in samples],
            "response_token_ids": [list(s.token_ids) for s in samples],
            "finish_reasons": [s.finish_reason.value for s in samples],
            "prompt_tokens": num_prompt_tokens,
            "response_tokens": [len(s.token_ids) for s in samples],
            "prompt_truncated": truncated}


def _progress(total: int, initial: int, layout: Layout):
    if not layout.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="Generating", unit="row", dynamic_ncols=True,
                file=sys.stderr)


def _to_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()


def _assemble(config: JobConfig, prompts: Prompts, results: pa.Table,
              stats: list[ShardStats]) -> Summary:
    """Writes the output file: the input's columns, then the results, row for row."""
    results = results.sort_by("_row")
    rows = results.column("_row").to_pylist()
    if rows != list(range(len(prompts))):
        missing = sorted(set(range(len(prompts))) - set(rows))
        raise RuntimeError(f"results do not cover the input once each: {len(rows)} results for "
                           f"{len(prompts)} rows, missing {missing[:10]}")
    table = prompts.table
    extra = ["responses", *(DETAIL_COLUMNS if config["data.save_details"] else ())]
    for name in extra:
        if name in table.column_names:
            say(f"the input's column {name!r} is replaced by the generated one")
            table = table.drop_columns([name])
        table = table.append_column(name, results.column(name))
    config.output_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(table, config.output_path)
    truncated = results.column("prompt_truncated").to_pylist()
    responses = results.column("response_tokens").to_pylist()
    return Summary(rows=len(rows), resumed_rows=len(rows) - sum(s.rows for s in stats), samples=sum(map(len, responses)),
                   tokens=sum(s.tokens for s in stats),
                   seconds=max(s.seconds for s in stats), truncated=sum(truncated),
                   rejected=sum(1 for t, r in zip(truncated, responses) if t and not r),
                   output_path=config.output_path)
