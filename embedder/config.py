"""The job configuration: a typed, validated pydantic model loaded from YAML.

A job says where the corpus is (``source``), which model embeds it (``model``), how documents are cut
into chunks (``chunking``), where vectors go (``output``) and what runs it (``runner``). Unknown keys
and invalid values are errors that name the key and the valid choices; the CLI turns them into exit
code 2. The resolved job is saved under ``<output>/_embedder/job.yaml`` with credentials redacted.

Example:
    >>> job = Job.model_validate({"source": {"uri": "docs/"}, "output": {"uri": "out/"}})
    >>> job.model.name
    'all-MiniLM-L6-v2'
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from embedder.errors import UsageError

FormatName = str
"""``auto`` or a connector name of ``connectors.registry.CONNECTORS`` (built-in: jsonl, parquet, text,
wikipedia, lance, and memory for in-memory sources given from Python; plugins add theirs with
``register_connector``); checked against the registry when the job is resolved, so a plugin's name
is valid."""
SinkName = str
"""``auto`` or a sink name of ``indexes.registry.SINKS`` (built-in: lance, parquet), checked likewise."""
DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "float32", "float16", "bfloat16", "float8"]
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp8": "float8"}
ContextName = Literal["none", "title", "section"]
RunnerName = Literal["local", "ray"]
VectorDtypeName = Literal["float32", "float16", "int8", "binary"]
ModeName = Literal["full", "incremental", "reembed"]

_SECRET_KEY = re.compile(
    r"key|secret|token|password|passwd|credential|session|connection_?string|private|sas|authorization|bearer"
    r"|cookie|(^|[_-])sig(nature)?$",
    re.IGNORECASE,
)
"""Option names whose values are credentials (``account_key``, ``client_secret``, ``sas_token``...)."""
_SIGNED_QUERY = re.compile(
    r"\?(?=[^\s'\"]*?(?<=[?&])(?:(?:sig|signature|x-amz-signature|x-goog-signature|x-amz-security-token"
    r"|x-amz-credential|x-goog-credential)=|se=[^&\s'\"]*&(?:[^\s'\"]*&)?sp=))[^\s'\"]*",
    re.IGNORECASE,
)
"""The query of a signed URL: S3/GCS presigned (``X-Amz-Signature=``...), Azure SAS (``sig=``,
``se=...&sp=...``)."""
_BARE_SAS = re.compile(r"(?:^|(?<=[\s'\"=]))sv=[^\s'\"]*&sig=[^\s'\"]*", re.IGNORECASE)
"""A SAS token given without its URL (``sv=2022-11-02&ss=b&...&sig=...``)."""
_CONNECTION_SECRET = re.compile(
    r"((?:AccountKey|SharedAccessKey|SharedAccessSignature|AccessKey|Password|Pwd)=)[^;\s'\"]+", re.IGNORECASE
)
"""The secret parts of an Azure (or ODBC-style) connection string."""
REDACTED = "***redacted***"
_TABLE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


class ConfigError(UsageError, ValueError):
    """A job configuration that cannot run, with a message that names the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Section):
    """Where the corpus is and how to read it."""

    uri: str = Field(
        description="File, folder, glob or fsspec URL (s3://bucket/prefix/*.jsonl); from Python also an "
        "in-memory object (see _in_memory)."
    )
    format: FormatName = "auto"
    id_field: str = "id"
    text_field: str = "text"
    title_field: str | None = "title"
    metadata_fields: list[str] = Field(default_factory=list, description="Passthrough columns.")
    shard_size_mb: float = Field(64.0, gt=0, description="Target input bytes per shard.")
    options: dict[str, Any] = Field(default_factory=dict, description="Connector-specific options.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options.")
    _data: Any = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _in_memory(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> SourceConfig:
        """Accepts an in-memory object (a list of strings or dicts, a pandas DataFrame, a pyarrow
        Table or RecordBatchReader, a ``datasets.Dataset``...) as the source itself or as its ``uri``
        (``{"uri": df, "text_field": "body"}``). The object is kept beside the config, never in it:
        the config says ``uri: memory://<kind>`` and ``format: memory`` (``embedder.in_memory``
        turns the object into a spool file when the job runs)."""
        data = None
        if isinstance(value, dict) and isinstance(value.get("uri"), os.PathLike):
            value = {**value, "uri": os.fspath(value["uri"])}  # a pathlib.Path is a path
        if isinstance(value, dict) and "uri" in value and not isinstance(value["uri"], str):
            data = value["uri"]
        elif not isinstance(value, (dict, BaseModel)):
            data = value
        if data is None:
            return handler(value)
        kind = in_memory_kind(data)
        fields = dict(value) if isinstance(value, dict) else {}
        if fields.get("format", "auto") not in ("auto", "memory"):
            raise ValueError(
                f"source.format {fields['format']!r} reads files; an in-memory {kind} source is read with "
                "format 'memory' (leave source.format unset)"
            )
        config = handler({**fields, "uri": f"memory://{kind}", "format": "memory"})
        config._data = data
        return config

    @property
    def data(self) -> Any:
        """The in-memory object this source reads (None for a path or URL)."""
        return self._data

    @field_validator("format")
    @classmethod
    def _registered_format(cls, value: str) -> str:
        return _registered("connectors.registry", "CONNECTORS", value)


class ModelConfig(_Section):
    """Which model embeds, on what device and in what precision."""

    name: str = Field("all-MiniLM-L6-v2", description="Bundled alias, local directory or hub id.")
    device: DeviceName = "auto"
    dtype: DtypeName = Field(
        "auto",
        description="auto: bf16 on GPU, fp32 on CPU. float16: 3 more mantissa bits than bf16 at the same speed "
        "(a 7B decoder's min cos to fp32 0.99997 against 0.99780), for models whose activations fit its range. "
        "float8 (alias fp8): e4m3 GEMMs with per-channel weight and "
        "per-token activation scales (GPUs with FP8 tensor cores: compute capability >= 8.9), everything else bf16; "
        "a fidelity gate against bf16 (validation.min_cosine) runs on the first batch.",
    )
    trust_remote_code: bool = False
    document_prompt: str | None = Field(None, description="Override the model's document prompt.")
    query_prompt: str | None = Field(None, description="Override the model's query prompt.")
    task: str | None = Field(
        None,
        description="Task instruction of instruction-tuned embedders (Qwen3-Embedding, e5-mistral, gte-Qwen2) for "
        "queries: fills {task} in the query prompt, or replaces the instruction of an 'Instruct: ...\\nQuery:' "
        "prompt, else the query prompt becomes 'Instruct: <task>\\nQuery:'. Documents stay raw.",
    )
    max_seq_length: int | None = Field(None, ge=8, description="Lower the model's own limit.")
    truncate_dim: int | None = Field(
        None,
        ge=1,
        description="Matryoshka: keep the first k dimensions of each vector (re-normalized when the model "
        "normalizes), as SentenceTransformer(..., truncate_dim=k). At most the model's dimension.",
    )
    token_budget: int | Literal["auto"] = Field("auto", description="Tokens per packed batch.")
    compile: bool = False
    packed: bool = Field(True, description="Use the padding-free forward where the family has one.")
    approximate_gelu: bool | Literal["auto"] = Field(
        "auto",
        description="CUDA fp16/bf16: GELU in tanh form fused into the FFN matmul (~10% faster; differs from "
        "erf by <= 4.7e-4, under bf16/fp16 rounding). auto: on there; false: exact erf GELU.",
    )
    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

    attention: Literal["auto", "flash4", "varlen", "padded", "flex"] = Field(
        "auto",
        description="Attention kernel of the packed forward. varlen: torch's varlen FlashAttention-2 (CUDA "
        "fp16/bf16); padded: SDPA over a padded grid (any device); flash4: FlashAttention-4 (Hopper/Blackwell, "
        "pip install 'embedder[flash4]'; slower than varlen on an H200 for BERT shapes); flex: torch flex_attention "
        "(ModernBERT only). auto: varlen, else padded.",
    )


class ChunkingConfig(_Section):
    """How documents become token windows."""

    max_tokens: int | None = Field(None, ge=8, description="Tokens per chunk (default: the model's limit).")
    overlap_tokens: int = Field(0, ge=0)
    context: ContextName = Field("none", description="Prefix each chunk with the title or 'Title — Section'.")
    max_document_chars: int = Field(2_000_000, ge=1000, description="Longer documents are trimmed.")


class OutputConfig(_Section):
    """Where vectors go."""

    uri: str
    sink: SinkName = "auto"
    table: str = Field("chunks", description="LanceDB table name: letters, digits, '_', '-' and '.'.")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    mode: ModeName = Field(
        "full",
        description="full: embed (and resume) the source; incremental: only what changed since the last "
        "complete run; reembed: everything again into a fresh table version (e.g. a new model).",
    )
    deletes: bool = Field(True, description="Incremental runs delete chunks of documents gone from the source.")
    vector_index: Literal["auto", "none"] = Field(
        "auto", description="LanceDB: build an ANN index at the end of a run once the table is large enough."
    )
    fts_index: bool = Field(True, description="LanceDB: build a full-text index on text (hybrid search).")
    vector_dtype: VectorDtypeName = Field(
        "float32",
        description="How vectors are stored: float32; float16 (half the bytes); int8 (a quarter: values of "
        "normalized vectors times 127, the scale kept in the schema); binary (1/32: sign bits packed 8 a byte, "
        "searched by Hamming distance).",
    )

    @field_validator("sink")
    @classmethod
    def _registered_sink(cls, value: str) -> str:
        return _registered("indexes.registry", "SINKS", value)

    @field_validator("table")
    @classmethod
    def _table_is_a_plain_name(cls, value: str) -> str:
        """The table becomes paths under the output (``<table>.lance``, staging folders) that a sink
        writes and deletes: a name with ``/`` or ``..`` would point them outside the output."""
        if not _TABLE_NAME.fullmatch(value) or ".." in value:
            raise ValueError(
                f"invalid table name {value!r}: use a plain name of letters, digits, '_', '-' and '.' "
                "(no '/', no '..', not starting with '.'), e.g. chunks"
            )
        return value


class RunnerConfig(_Section):
    """What drives the job."""

    kind: RunnerName = "local"
    workers: int | Literal["auto"] = Field("auto", description="Reader/tokenizer processes.")
    address: str | None = Field(
        None,
        description="Ray cluster address (runner: ray): host:port, ray://host:port, auto, or local (a new "
        "local cluster); none: RAY_ADDRESS, else the cluster `ray start` runs here, else a new local one.",
    )
    encoders: int | Literal["auto"] = Field(
        "auto", description="Encoders: local, one model per GPU (several on CPU share it); ray, encoder actors. "
        "auto: one per GPU (one on a CPU)."
    )
    gpus_per_encoder: float = Field(1.0, gt=0, description="GPUs each encoder actor holds (runner: ray).")
    keep_encoders_s: float = Field(
        0.0, ge=0, description="runner: ray on a cluster the run did not start: seconds its encoder actors stay "
        "up, model loaded, after their last call, for the next run of the same model to take (0: they end with the run)."
    )
    show_progress: bool = True
    lease_ttl_s: float = Field(60.0, gt=0, description="A lease without heartbeat for this long is dead.")
    grace_period_s: float = Field(
        100.0, ge=0, description="On SIGTERM/spot notice: time to finish in-flight shards (AWS gives 120 s)."
    )
    spot_watch: bool = Field(False, description="Poll the instance-metadata endpoint for a spot notice.")
    spot_url: str = "http://169.254.169.254/latest/meta-data/spot/instance-action"
    spot_poll_s: float = Field(5.0, gt=0)
    gpu_hourly_usd: float | None = Field(None, ge=0, description="GPU price per hour, for $ per 1M tokens.")


class ValidationConfig(_Section):
    """Checks that the vectors are right."""

    canary_samples: int = Field(32, ge=0, description="Chunks re-embedded with the reference path (0: off).")
    canary_max_tokens: int = Field(
        8192, ge=1, description="Bound on the canaries' tokens (long-context models check fewer, longer chunks)."
    )
    min_cosine: float = Field(0.999, gt=0, le=1, description="A canary below this cosine fails the run.")


class Job(_Section):
    """A whole embedding job."""

    source: SourceConfig
    output: OutputConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @field_validator("chunking")
    @classmethod
    def _overlap_below_max(cls, value: ChunkingConfig) -> ChunkingConfig:
        if value.max_tokens is not None and value.overlap_tokens >= value.max_tokens // 2:
            raise ValueError(
                f"overlap_tokens ({value.overlap_tokens}) must be below half of max_tokens ({value.max_tokens})"
            )
        return value

    def redacted(self) -> dict[str, Any]:
        """The job as a dict with every credential replaced by a placeholder: storage options named
        like one or looking like one, and signed URLs or connection strings anywhere (a presigned
        ``source.uri``)."""
        data = self.model_dump(mode="json")
        for section in ("source", "output"):
            data[section]["storage_options"] = _redact(data[section]["storage_options"])
        return redact_values(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.redacted(), sort_keys=False)


IN_MEMORY_KINDS = (
    "a list of strings or of dicts, a pandas DataFrame, a pyarrow Table, RecordBatch or RecordBatchReader, "
    "a datasets.Dataset, or any object with __arrow_c_stream__ (polars, DuckDB)"
)


def in_memory_kind(data: Any) -> str:
    """What an in-memory source is (``"pandas.DataFrame"``, ``"list"``...), by type alone (nothing
    heavy is imported here).

    Raises:
        ValueError: ``data`` is not a kind of in-memory source embedder reads (the message lists them).
    """
    cls = type(data)
    module = cls.__module__.split(".", 1)[0]
    kind = cls.__name__ if module == "builtins" else f"{module}.{cls.__name__}"
    if isinstance(data, (list, tuple)):
        return "list"
    if kind in ("pandas.DataFrame", "pyarrow.Table", "pyarrow.RecordBatch", "pyarrow.RecordBatchReader", "datasets.Dataset"):
        return kind
    if kind == "datasets.DatasetDict":
        raise ValueError(f"source is a datasets.DatasetDict with splits {list(data)}: pass one split, e.g. ds['train']")
    if hasattr(data, "__arrow_c_stream__"):
        return kind
    raise ValueError(f"source must be a path or URL string, or an in-memory object ({IN_MEMORY_KINDS}); got {kind}")


def _registered(module: str, registry: str, value: str) -> str:
    """``value`` if it is ``auto`` or a name of the registry (built-ins and the plugins registered so
    far), else a ValueError listing the valid names in the style of a ``Literal``'s error."""
    import importlib

    names = ["auto", *getattr(importlib.import_module(module), registry).names()]
    if value in names:
        return value
    listed = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
    raise ValueError(f"invalid value {value!r}. Valid: {listed}")


def redact_text(text: str) -> str:
    """``text`` with the secrets it may carry replaced by ``REDACTED``: the query of a signed URL
    (the URL itself stays readable), a bare SAS token, the key of a connection string.

    Example:
        >>> redact_text("https://acct.blob.core.windows.net/c/a.parquet?sv=2022-11-02&se=2030&sp=r&sig=abc")
        'https://acct.blob.core.windows.net/c/a.parquet?***redacted***'
    """
    text = _SIGNED_QUERY.sub("?" + REDACTED, text)
    text = _BARE_SAS.sub(REDACTED, text)
    return _CONNECTION_SECRET.sub(lambda m: m.group(1) + REDACTED, text)


def redact_values(value: Any) -> Any:
    """``value`` (dicts and lists walked) with every string passed through ``redact_text``."""
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_values(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value


def _redact(value: Any, key: str = "") -> Any:
    """Storage options with every credential replaced: by name (``_SECRET_KEY``) or by look
    (``redact_text``: signed URLs, SAS tokens, connection strings)."""
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if key and _SECRET_KEY.search(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value


def _section_keys(path: tuple[Any, ...]) -> list[str] | None:
    """The valid keys of the config section at ``path`` (``()`` is the job itself), or None when
    ``path`` does not lead to a section (a free-form dict such as ``source.options``)."""
    model: type[BaseModel] = Job
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return list(model.model_fields)


def _unknown_key_message(loc: tuple[Any, ...]) -> str:
    """``unknown key 'source.text_feild' (did you mean 'source.text_field'?)``; with nothing close,
    the section's valid keys, so the message names the fix either way."""
    dotted = ".".join(str(p) for p in loc)
    keys = _section_keys(loc[:-1])
    if not keys:
        return f"unknown key {dotted!r}"
    prefix = "".join(f"{p}." for p in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    if close:
        return f"unknown key {dotted!r} (did you mean {prefix + close[0]!r}?)"
    where = prefix[:-1] if prefix else "the job"
    return f"unknown key {dotted!r} (valid keys of {where}: {', '.join(keys)})"


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(tuple(e["loc"])))
        elif e["type"] == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            lines.append(f"invalid value {e.get('input')!r} for {loc!r}. Valid: {expected}")
        elif e["type"] == "missing":
            lines.append(f"missing key {loc!r}")
        elif e["type"] == "value_error" and str(e["msg"]).startswith("Value error, invalid value"):
            message = str(e["msg"]).removeprefix("Value error, invalid value ")
            value, _, valid = message.partition(". Valid: ")
            lines.append(f"invalid value {value} for {loc!r}. Valid: {valid}")
        else:
            lines.append(f"{loc}: {e['msg']}")
    return "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parses ``section.key=value`` (value read as YAML, so ``true``, ``3``, ``[a, b]`` work)."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def build_job(data: dict[str, Any], overrides: list[str] | None = None) -> Job:
    """Validates a job dict after applying ``section.key=value`` overrides."""
    data = dict(data)
    for item in overrides or []:
        path, value = parse_override(item)
        apply_override(data, path, value)
    try:
        return Job.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid job: {_format_validation_error(err)}") from None


def load_job_dict(path: str | Path) -> dict[str, Any]:
    """Safe-loads a YAML job file; paths in it stay as written (relative to the working directory)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (source, output, model...)")
    return data
