"""What a run did: the run record every runner fills the same way, and the run's failure."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from embedder.errors import EmbedderError


@dataclass(slots=True)
class RunResult:
    """What a run did. ``state`` is ``done``, ``failed`` or ``interrupted``.

    ``seconds`` is the whole run; ``load_seconds`` the part spent listing shards and loading the
    model; ``pipeline_seconds`` the embedding itself (read, chunk, encode, write, commit), over which
    ``tokens_per_second`` is measured (the end-of-run canary check and compaction are outside it).

    ``startup`` says where the time before the first vectors went, as seconds from the run's start
    to each milestone it reached, in the order they happen: ``connected`` (the scheduler set up:
    Ray connected and its encoder actors asked for; local: the reader fork server),
    ``encoders_started`` (Ray: the encoder actors were requested), ``listed`` (the source's shards
    listed), ``encoder_ready`` (the first encoder holds the model: on Ray the first actor that
    loaded it), ``planned`` (the output opened and the pending shards known; ``load_seconds``),
    ``first_vectors`` (the first encoded block reached the run) and ``first_commit`` (the first
    shard committed).
    """

    run_id: str
    output: str
    state: str = "running"
    shards_total: int = 0
    shards_skipped: int = 0
    shards_done: int = 0
    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    rows_written: int = 0
    bad_records: int = 0
    trimmed_documents: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    encode_seconds: float = 0.0
    tokens_per_second: float = 0.0
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    error: str | None = None
    model: str = ""
    sink: str = ""
    runner: str = "local"
    unfinished_shards: list[str] = field(default_factory=list)  # not committed when the run ended
    interrupted_shards: list[str] = field(default_factory=list)  # of those, started (in flight or failed)
    bad_vectors: int = 0
    mode: str = "full"
    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    canary: dict[str, Any] | None = None
    indexes: dict[str, Any] | None = None  # what the sink's finish built (vector / full-text index)
    length_histogram: list[int] = field(default_factory=list)  # committed rows per 16-token bin of their length
    timeline: list[list[float]] = field(default_factory=list)  # [seconds since start, tokens so far]
    # [seconds since start, runner RSS MB, reader processes' RSS MB] (Linux; the readers' is 0 on Ray)
    memory_timeline: list[list[float]] = field(default_factory=list)
    tokens_computed: int | None = None  # tokens the forward computed (specials, prompts, padding included)
    padding_waste: float | None = None  # share of computed tokens that were padding
    gpu_seconds: float = 0.0  # time the encoder thread waited on the device
    write_seconds: float = 0.0  # staging rows in the sink (all threads together)
    commit_seconds: float = 0.0  # committing shards: sink commit, quarantine, change and completion records
    heap_trim_seconds: float = 0.0  # returning freed heap to the OS after commits (embedder.memory)
    gpu_utilization: float | None = None  # mean of nvidia-smi-style samples, when measurable
    gpu_hourly_usd: float | None = None
    usd: float | None = None
    usd_per_million_tokens: float | None = None
    documents_read: int = 0  # documents read and chunked so far (progress; equals documents once all commit)
    bytes_total: int = 0  # input bytes of this run's pending shards (progress, ETA)
    bytes_read: int = 0  # input bytes of the shards read to their end so far
    dtype: str | None = None  # the compute precision of this run's encoder
    shard_bytes: int | None = None  # target input bytes per shard of this output (fixed by its first pass)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)  # reason → records, this run's commits
    quarantine_uri: str | None = None  # where the quarantine files are
    canary_seconds: float = 0.0  # the end-of-run reference check
    canary_device: str | None = None
    output_rows: int | None = None  # rows the output holds at the end of the run
    encoders: int = 1  # encoders that ran (local: one per GPU with runner.encoders auto; Ray: actors)
    encoder_tokens_per_second: list[float] = field(default_factory=list)  # each encoder's share of the rate
    startup: dict[str, float] = field(default_factory=dict)  # milestone → seconds since the run's start

    def mark(self, milestone: str, at: float, started: float) -> None:
        """Records a ``startup`` milestone (perf_counter times); only its first time counts."""
        self.startup.setdefault(milestone, round(at - started, 3))

    def add_cost(self, gpu_hourly_usd: float | None) -> None:
        """Prices the run: the GPU is billed for the whole run, model loading included."""
        self.gpu_hourly_usd = gpu_hourly_usd
        if gpu_hourly_usd is None:
            return
        self.usd = self.seconds / 3600.0 * gpu_hourly_usd
        self.usd_per_million_tokens = self.usd / self.tokens * 1e6 if self.tokens else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunFailed(EmbedderError, RuntimeError):
    """The run stopped on an error; the output keeps every shard committed before it."""
