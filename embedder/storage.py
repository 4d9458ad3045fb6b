"""Storage access through fsspec: local paths and object stores (``s3://``...) alike.

Credentials come from where fsspec and the cloud SDKs look for them (environment, AWS config chain,
``storage_options``); this module never logs them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from embedder.errors import UsageError


class StorageError(UsageError, OSError):
    """A path that cannot be reached, with the fix in the message."""


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Returns the filesystem of ``uri`` and the path within it.

    Raises:
        StorageError: when the protocol needs a package that is not installed.
    """
    try:
        return url_to_fs(uri, **(storage_options or {}))
    except ImportError as err:
        raise StorageError(missing_backend_message(uri.split("://", 1)[0], err)) from err


BACKEND_EXTRAS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
    "adl": ("adlfs", "azure"),
    "hf": ("huggingface_hub", "hf"),
}
"""fsspec protocol -> (the package that implements it, the ``embedder[...]`` extra that installs it)."""


def missing_backend_message(protocol: str, err: BaseException | None = None) -> str:
    """What to install for a protocol whose fsspec backend is missing: the extra that provides it.

    Example:
        >>> missing_backend_message("gs")
        "reading gs:// needs gcsfs: pip install 'embedder[gcs]' (or pip install gcsfs)"
    """
    known = BACKEND_EXTRAS.get(protocol)
    if known is None:
        detail = f" ({err})" if err is not None else ""
        return f"reading {protocol}:// needs an fsspec backend that is not installed{detail}"
    package, extra = known
    return f"reading {protocol}:// needs {package}: pip install 'embedder[{extra}]' (or pip install {package})"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(base: str, *parts: str) -> str:
    """Joins path parts with ``/`` (works for local paths and URLs)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Writes a whole file so readers see either the old content or the new one, never a part.

    Local disk: a temp file in the same folder, fsync, then ``os.replace``. Object stores: a single
    PUT, which is atomic by itself (the object appears whole or not at all).
    """
    if is_local(fs):
        os.replace(_write_temp_beside(path, data), path)
    else:
        fs.pipe_file(path, data)


def _write_temp_beside(path: str, data: bytes) -> str:
    """Writes ``data`` durably to a hidden temp file in ``path``'s folder; returns its path."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """The file's content, or None when it does not exist."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Creates ``path`` with ``data`` only if it does not exist yet; returns False if it did.

    Local disk: the content goes to a temp file that is then hard-linked to ``path`` (``link``
    fails if ``path`` exists, so of two racing writers exactly one wins, and no reader ever sees a
    partial file). Object stores: a conditional PUT (``If-None-Match: *``).
    """
    if is_local(fs):
        tmp = _write_temp_beside(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False


_FSSPEC_TO_OBJECT_STORE = {
    "key": "aws_access_key_id",
    "secret": "aws_secret_access_key",
    "token": "aws_session_token",
    "endpoint_url": "aws_endpoint",
    "region_name": "aws_region",
}
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")


def object_store_options(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Options for Rust ``object_store`` readers (Lance, LanceDB) from the job's fsspec options.

    Lance reads ``AWS_*`` variables by itself; this adds what it cannot infer:

    * s3fs names are translated (``key``, ``secret``, ``token``, ``endpoint_url`` and
      ``client_kwargs.endpoint_url`` / ``region_name``, ``anon``);
    * options already named the object_store way (``aws_endpoint``, ``allow_http``...) pass through;
    * an ``http://`` endpoint (MinIO, moto, a local gateway) gets ``allow_http=true``, which Lance
      otherwise refuses.

    Values are strings, as Lance wants them. The result holds credentials when the job gave some:
    never log it.
    """
    out: dict[str, str] = {}
    for name, value in (storage_options or {}).items():
        if name == "client_kwargs" and isinstance(value, Mapping):
            for inner in ("endpoint_url", "region_name"):
                if value.get(inner):
                    out[_FSSPEC_TO_OBJECT_STORE[inner]] = str(value[inner])
        elif name in _FSSPEC_TO_OBJECT_STORE:
            out[_FSSPEC_TO_OBJECT_STORE[name]] = str(value)
        elif name == "anon":
            if value:
                out["aws_skip_signature"] = "true"
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            out[name] = str(value)
    if uri.startswith(("s3://", "s3a://")):
        endpoint = out.get("aws_endpoint") or next((os.environ[k] for k in _ENDPOINT_ENV if os.environ.get(k)), "")
        if endpoint.startswith("http://") and "allow_http" not in out and "aws_allow_http" not in out:
            out["allow_http"] = "true"
    return out
