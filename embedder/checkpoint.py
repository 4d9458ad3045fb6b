"""Job state under ``<output>/_embedder/``: the resolved job, shard completion records, the quarantine
and run records.

A shard's completion record is written only after the sink committed the shard, and its quarantine
file just before that record, so a rerun skips exactly the shards whose rows and bad records are
both in place. Every file is written whole (temp + rename locally; one PUT on object stores).

Layout::

    _embedder/job.yaml                  the resolved job (credentials redacted)
    _embedder/shards/<key>.json         one per committed shard: shard id, rows, counts
    _embedder/quarantine/<key>.jsonl    bad records of a shard (absent when none)
    _embedder/runs/<run_id>.json        one per run attempt: timings, counts, end state, and the
                                        totals of the whole pass at its end (pass_totals)
    _embedder/generation.json           the current pass over the source: id, mode, complete
    _embedder/changes/<key>.json.gz     incremental passes: per shard, documents seen and chunk ids
                                        that the pass replaced or removed (used by the final prune)

A *generation* is one pass over the source. A run resumes the current generation until it is
complete; an incremental or reembed run then starts a new one. Completion records carry their
generation, so records of an earlier pass never make a shard of this pass look done.

A state file cut short (a full disk, a copy killed halfway) is handled by what it holds: a
completion record only says "this shard is done", so a corrupt one is dropped with a warning and
the shard is redone (its rows are aborted first, so the output stays exact); a run record is
metrics and is skipped the same way; the generation record cannot be rebuilt from the rest, so it
is a ``CheckpointError`` naming the file and the way out.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

from embedder.config import ConfigError, redact_values
from embedder.records import BadRecord
from embedder.storage import filesystem, join, read_bytes, write_bytes_atomic

log = logging.getLogger("embedder")

STATE_DIR = "_embedder"
ENDED_STATES = ("done", "failed", "interrupted")
PASS_TOTAL_KEYS = ("rows", "documents", "chunks", "tokens", "bad_records")


class CheckpointError(ConfigError):
    """A state file under ``_embedder/`` that cannot be read, with the file and the fix in the message
    (a usage-style error: exit 2)."""


class SourceChanged(CheckpointError):
    """A full run over a source whose shards differ from the ones the output holds."""


def check_source_unchanged(shards: Iterable[Any], done: dict[str, dict[str, Any]], source_uri: str) -> None:
    """Refuses a full (or reembed) pass to go on over a source that changed under its output.

    Shard ids name byte ranges or files, so a file that grew, shrank or vanished lists other
    shards (or the same one-shard id over other bytes) than the completion records hold. Going on
    would keep the rows of shards no longer listed next to their new ranges (duplicates) or keep
    a one-shard file's old rows only. New files alone are fine: their shards are new, the others
    equal, and the run extends the pass exactly. Which rows of the old ranges are still current
    is what ``--mode incremental`` works out (it compares documents and prunes vanished ones).

    Args:
        shards: The shards the connector lists now.
        done: Completion records of the pass, by shard id (``Checkpoint.completed``).
        source_uri: For the message.

    Raises:
        SourceChanged: naming examples of both kinds of change and the two modes that handle them.
    """
    sizes = {shard.id: shard.size_bytes for shard in shards}
    gone = sorted(shard_id for shard_id in done if shard_id not in sizes)
    resized = sorted(
        shard_id for shard_id, record in done.items()
        if shard_id in sizes and isinstance(record.get("size_bytes"), int) and record["size_bytes"] != sizes[shard_id]
    )
    if not gone and not resized:
        return
    problems = []
    if gone:
        problems.append(f"{len(gone)} shard(s) done earlier are no longer listed (e.g. {gone[0]!r})")
    if resized:
        record = done[resized[0]]
        problems.append(
            f"{len(resized)} changed size (e.g. {resized[0]!r}: {record['size_bytes']} bytes, now {sizes[resized[0]]})"
        )
    raise SourceChanged(
        f"the source {source_uri!r} changed since this output was written: {'; '.join(problems)}. A full run would "
        "keep stale rows beside the new ones. Run with --mode incremental (embeds what changed and removes what "
        "vanished) or --mode reembed (embeds everything again)"
    )


def _parse_record(raw: bytes, required: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The JSON object in ``raw`` when it is one and has the ``required`` keys, else None."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or any(key not in record for key in required):
        return None
    return record


def _damage(raw: bytes) -> str:
    return "0 bytes" if not raw else f"{len(raw)} bytes that are not a whole record (truncated JSON?)"


def shard_key(shard_id: str) -> str:
    """A file-name-safe, stable key of a shard id."""
    return hashlib.sha1(shard_id.encode("utf-8")).hexdigest()[:20]


class Checkpoint:
    """Reads and writes a job's state under ``<output_uri>/_embedder/``.

    Args:
        output_uri: The job's output URI (local path or fsspec URL).
        storage_options: fsspec options for that URI.
    """

    def __init__(self, output_uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.output_uri = output_uri
        self.fs, root = filesystem(join(output_uri, STATE_DIR), storage_options)
        self.root = root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _write_json(self, path: str, data: Any) -> None:
        write_bytes_atomic(self.fs, path, json.dumps(data, sort_keys=True, default=str).encode("utf-8"))

    def _list(self, folder: str) -> list[str]:
        try:
            self.fs.invalidate_cache(self._path(folder))
            return sorted(p for p in self.fs.ls(self._path(folder), detail=False) if not p.rsplit("/", 1)[-1].startswith("."))
        except FileNotFoundError:
            return []

    # --- job ----------------------------------------------------------------------------------

    def save_job(self, job_yaml: str) -> None:
        write_bytes_atomic(self.fs, self._path("job.yaml"), job_yaml.encode("utf-8"))

    def load_job_yaml(self) -> str | None:
        raw = read_bytes(self.fs, self._path("job.yaml"))
        return None if raw is None else raw.decode("utf-8")

    # --- shards -------------------------------------------------------------------------------

    # --- generations --------------------------------------------------------------------------

    def generation(self) -> dict[str, Any] | None:
        """The current generation record (``id``, ``mode``, ``complete``...), or None before any run."""
        path = self._path("generation.json")
        raw = read_bytes(self.fs, path)
        if raw is None:
            return None
        record = _parse_record(raw, ("id", "mode"))
        if record is None:
            raise CheckpointError(
                f"the generation record {path} is corrupt ({_damage(raw)}); which pass the output is in cannot be "
                "rebuilt from the other state files. Remove it and embed everything again with --mode reembed "
                "(the old rows are replaced), or write to a new output"
            )
        return record

    def write_generation(self, record: dict[str, Any]) -> None:
        self._write_json(self._path("generation.json"), record)

    # --- shards -------------------------------------------------------------------------------

    def completed(self, generation: str | None = None) -> dict[str, dict[str, Any]]:
        """Completion records of committed shards, by shard id (of one generation when given)."""
        out: dict[str, dict[str, Any]] = {}
        for path in self._list("shards"):
            if path.endswith(".json"):
                raw = read_bytes(self.fs, path)
                if raw is None:
                    continue
                record = _parse_record(raw, ("shard_id",))
                if record is None:  # the shard counts as not done: a run aborts its rows and redoes it
                    log.warning(
                        "ignoring the corrupt completion record %s (%s): its shard is embedded again by the next run",
                        path, _damage(raw),
                    )
                    continue
                if generation is None or record.get("generation") == generation:
                    out[record["shard_id"]] = record
        return out

    def record_completion(self, shard_id: str, info: dict[str, Any]) -> None:
        """Marks a shard done. Call only after the sink committed it and its quarantine is written."""
        record = {"shard_id": shard_id, "completed_at": time.time(), **info}
        self._write_json(self._path("shards", f"{shard_key(shard_id)}.json"), record)

    def forget_completions(self, generation: str | None) -> None:
        """Removes the completion records of one generation, so the next run redoes its shards (their
        quarantine files stay until then: a run that embedded nothing points its user at them)."""
        for shard_id in self.completed(generation):
            path = self._path("shards", f"{shard_key(shard_id)}.json")
            if self.fs.exists(path):
                self.fs.rm(path)

    def forget_shards_except(self, shard_ids: set[str]) -> None:
        """Removes completion records and quarantine files of shards not in ``shard_ids`` (shards
        an earlier generation had that this one does not)."""
        keys = {shard_key(s) for s in shard_ids}
        for folder, suffix in (("shards", ".json"), ("quarantine", ".jsonl"), ("changes", ".json.gz")):
            for path in self._list(folder):
                name = path.rsplit("/", 1)[-1]
                if name.endswith(suffix) and name[: -len(suffix)] not in keys:
                    self.fs.rm(path)

    # --- incremental changes -------------------------------------------------------------------

    def write_changes(self, shard_id: str, changes: dict[str, Any]) -> None:
        """Stores what an incremental pass saw and replaced in a shard (before its completion record)."""
        data = gzip.compress(json.dumps(changes).encode("utf-8"), compresslevel=3)
        write_bytes_atomic(self.fs, self._path("changes", f"{shard_key(shard_id)}.json.gz"), data)

    def changes(self, shard_ids: Iterable[str]) -> Iterator[dict[str, Any]]:
        """The stored changes of each given shard that has them."""
        for shard_id in shard_ids:
            raw = read_bytes(self.fs, self._path("changes", f"{shard_key(shard_id)}.json.gz"))
            if raw:
                yield json.loads(gzip.decompress(raw))

    # --- quarantine ---------------------------------------------------------------------------

    def write_quarantine(self, shard_id: str, records: Iterable[BadRecord]) -> int:
        """Replaces the shard's quarantine file with ``records``; returns how many were written."""
        path = self._path("quarantine", f"{shard_key(shard_id)}.jsonl")
        lines = [json.dumps(asdict(r), ensure_ascii=False) for r in records]
        if lines:
            write_bytes_atomic(self.fs, path, ("\n".join(lines) + "\n").encode("utf-8"))
        elif self.fs.exists(path):
            self.fs.rm(path)
        return len(lines)

    def quarantine(self) -> list[dict[str, Any]]:
        """Every quarantined record of the output."""
        out: list[dict[str, Any]] = []
        for path in self._list("quarantine"):
            if path.endswith(".jsonl"):
                raw = read_bytes(self.fs, path) or b""
                out.extend(json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip())
        return out

    # --- runs ---------------------------------------------------------------------------------

    def write_run(self, record: dict[str, Any]) -> None:
        """Stores a run record, signed URLs and connection-string keys redacted (its ``output`` and
        ``error`` may name them).

        A record of a run that ended (``done``, ``failed``, ``interrupted``) gets ``pass_totals``:
        the totals of the whole pass it worked on, every run of it together (``pass_totals``), since
        its own counts are only the part it embedded (after a crash, the resumed run's share).
        """
        if record.get("state") in ENDED_STATES and "pass_totals" not in record:
            try:
                record = {**record, "pass_totals": self.pass_totals()}
            except (CheckpointError, OSError, ValueError) as err:  # the run record is written regardless
                log.warning("run %s: the pass totals could not be read (%s)", record.get("run_id"), err)
        self._write_json(self._path("runs", f"{record['run_id']}.json"), redact_values(record))

    def pass_totals(self) -> dict[str, Any] | None:
        """Totals of the current pass over the source, from its completion records: what every run
        of the pass committed together (a killed run's shards, the resumed run's, an extension's).

        Returns:
            ``generation``, ``mode``, ``complete``, ``shards``, the sums of ``rows``, ``documents``,
            ``chunks``, ``tokens`` and ``bad_records``, and ``runs`` (the runs that committed
            shards of it), or None before any pass.
        """
        generation = self.generation()
        if generation is None:
            return None
        done = self.completed(generation["id"])
        totals: dict[str, Any] = {
            "generation": generation["id"],
            "mode": generation.get("mode"),
            "complete": bool(generation.get("complete")),
            "shards": len(done),
        }
        for key in PASS_TOTAL_KEYS:
            totals[key] = sum(int(r.get(key) or 0) for r in done.values())
        totals["runs"] = len({r["run_id"] for r in done.values() if r.get("run_id")})
        return totals

    def mark_killed_runs(self) -> int:
        """Marks run records still ``running`` as ``killed``: call it holding the output's lease, when
        no other run can be alive (a SIGKILLed or crashed run never wrote its end). Returns how many."""
        killed = 0
        for record in self.runs():
            if record.get("state") == "running":
                record["state"] = "killed"
                record["error"] = record.get("error") or "the run ended without writing its end (killed or crashed)"
                self.write_run(record)
                killed += 1
        return killed

    def runs(self) -> list[dict[str, Any]]:
        """Run records, oldest first."""
        records = []
        for path in self._list("runs"):
            if path.endswith(".json"):
                raw = read_bytes(self.fs, path)
                if raw is None:
                    continue
                record = _parse_record(raw)
                if record is None:
                    log.warning("ignoring the corrupt run record %s (%s)", path, _damage(raw))
                    continue
                records.append(record)
        return sorted(records, key=lambda r: r.get("started_at", 0))
