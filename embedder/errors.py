"""The root of embedder's exceptions, and the one split the command line cares about.

``UsageError``: a job or command that cannot run as given (a config value, a path, a model name, an
output written with other settings); its message is one line naming the fix, and the CLI exits 2.
Every other ``EmbedderError`` is a run that failed (exit 1) with a message meant for the user. Each
concrete error also keeps the built-in base it always had (``ConfigError`` is a ``ValueError``...),
so existing ``except`` clauses go on working. This module imports nothing, so the CLI maps errors to
exit codes without importing torch. ``environment_failure`` maps what the machine or the store
refused (a full disk, a read-only output, a missing bucket) to ``EnvironmentFailure`` errors of one line;
``ray_auth_refused`` maps a ``ray.init`` refused on token authentication to ``RayAuthRefused``.
"""

from __future__ import annotations


class EmbedderError(Exception):
    """Any error embedder raises on purpose, with a message for the user."""


class UsageError(EmbedderError):
    """A job or command that cannot run as given; the message names the fix (CLI exit code 2)."""


class EnvironmentFailure(UsageError, OSError):
    """The machine or the store refused the output: a full disk, a read-only or forbidden folder, a
    bucket that does not exist. The message names the problem, the place and the fix on one line
    (exit 2, like a usage error: nothing is wrong with the job, and the same command resumes once
    the fix is made)."""


class DiskFull(EnvironmentFailure):
    """No space left (``ENOSPC``) or the user's quota exceeded (``EDQUOT``) while writing."""


class OutputNotWritable(EnvironmentFailure):
    """A read-only file system (``EROFS``) or a folder this user may not write (``EACCES``, ``EPERM``)."""


class BucketMissing(EnvironmentFailure):
    """The object store has no bucket of the given name (S3 ``NoSuchBucket``)."""


class RayClusterUnreachable(EnvironmentFailure, ConnectionError):
    """Nothing answers at the Ray cluster address the run was given (``runner.address`` or
    ``RAY_ADDRESS``): refused in seconds, where ``ray.init`` would retry for minutes."""


class RayAuthRefused(UsageError, ConnectionError):
    """Connecting to a Ray cluster failed on token authentication: the cluster wants a token this
    process does not send (``RAY_AUTH_MODE`` unset or ``disabled``), or not the one it sends. The
    message names ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN_PATH`` and what to set (exit 2)."""


_TEXT = (  # how libraries that do not raise a plain OSError (Lance, object_store, s3fs, Ray) word them
    ("disk_full", ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")),
    ("read_only", ("read-only file system", "os error 30")),
    ("denied", ("permission denied", "os error 13", "operation not permitted")),
    ("no_bucket", ("nosuchbucket", "specified bucket does not exist", "bucket does not exist")),
)


def _kind(err: BaseException) -> str | None:
    import errno

    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full"
    if code == errno.EROFS:
        return "read_only"
    if code in (errno.EACCES, errno.EPERM):
        return "denied"
    text = str(err).lower()
    return next((kind for kind, needles in _TEXT if any(n in text for n in needles)), None)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or during (a runner's wrapper, Ray's)."""
    out: list[BaseException] = []
    while err is not None and err not in out and len(out) < 16:
        out.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return out


def _bucket(uri: str | None) -> str | None:
    if uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}"
    return None


def environment_failure(err: BaseException, uri: str | None = None) -> EnvironmentFailure | None:
    """The ``EnvironmentFailure`` that ``err`` (or an exception in its chain) stands for, or None.

    Matched by errno where the error is a plain ``OSError`` and by the libraries' wording where it is
    not (Lance's ``LanceError(IO): No space left on device (os error 28)``, s3fs's "The specified
    bucket does not exist"): only these four conditions, every other error is left as it is.

    Args:
        err: What a command raised.
        uri: The output (or index) URI the command works on, named in the message when the error
            itself names no path.
    """
    for cause in _chain(err):
        kind = _kind(cause)
        if kind is None:
            continue
        path = getattr(cause, "filename", None) if isinstance(cause, OSError) else None
        place = str(path or uri or "the output")
        if kind == "disk_full":
            return DiskFull(
                f"no space left on the device holding {place}: free space there (or write to another --output), "
                "then run the same command again; a run resumes from its last committed shard"
            )
        if kind == "read_only":
            return OutputNotWritable(
                f"{place} is on a read-only file system: an output must be writable; remount it read-write or "
                "choose another --output (search, status and history only read it)"
            )
        if kind == "denied":
            outside = path is not None and uri is not None and not str(path).startswith(uri.rstrip("/"))
            return OutputNotWritable(
                f"permission denied on {place}: give the user running embedder access to it (chown/chmod, or the "
                "bucket's policy)" + ("" if outside else " or choose another --output")
            )
        bucket = _bucket(uri) or "the output's bucket"
        return BucketMissing(
            f"the bucket {bucket} does not exist (output {uri or '?'}): create it (aws s3 mb {bucket}) or fix the "
            "output URI; check the endpoint (AWS_ENDPOINT_URL) and region if it does exist"
        )
    return None


_RAY_AUTH_TEXT = ("authenticationerror", "invalidauthtoken", "authentication token", "token authentication")
"""Ray's words (2.60) for a refused token, in ray.init's error or the exceptions it was raised from."""


def ray_auth_refused(err: BaseException, address: str | None) -> RayAuthRefused | None:
    """The ``RayAuthRefused`` that ``ray.init``'s failure ``err`` stands for, or None.

    A driver without the cluster's token gets ``ConnectionError: Failed to connect to Ray cluster
    at ...`` after about 20 s; only the exceptions it was raised from (an ``AuthenticationError``:
    "InvalidAuthToken: Authentication token is missing or incorrect") say why. A driver with
    ``RAY_AUTH_MODE=token`` and no token at all gets Ray's ``AuthenticationError`` at once.

    Args:
        err: What ``ray.init`` raised.
        address: The cluster it was asked to connect to (None: a local one).
    """
    import os

    causes = _chain(err)
    text = " ".join(f"{type(c).__name__}: {c}" for c in causes).lower()
    if not any(needle in text for needle in _RAY_AUTH_TEXT):
        return None
    cluster = f"the Ray cluster at {address}" if address else "the local Ray cluster"
    mode = os.environ.get("RAY_AUTH_MODE", "")
    token = "RAY_AUTH_TOKEN_PATH to the file holding the cluster's token (or RAY_AUTH_TOKEN to the token)"
    if "no authentication token was found" in text or "couldn't find an authentication token" in text:
        return RayAuthRefused(
            f"RAY_AUTH_MODE=token but no Ray auth token was found to connect to {cluster}: set {token}, or "
            "RAY_AUTH_MODE=disabled if the cluster runs without token auth, then run the same command again"
        )
    if mode.lower() != "token":
        return RayAuthRefused(
            f"{cluster} requires token authentication and this process has "
            f"{f'RAY_AUTH_MODE={mode}' if mode else 'no RAY_AUTH_MODE'}: set RAY_AUTH_MODE=token and {token}, "
            "then run the same command again"
        )
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    sent = f"RAY_AUTH_TOKEN_PATH={path}" if path else "~/.ray/auth_token"
    if os.environ.get("RAY_AUTH_TOKEN"):  # the token itself is never named
        sent = "RAY_AUTH_TOKEN"
    return RayAuthRefused(
        f"{cluster} refused this process's Ray auth token (from {sent}, RAY_AUTH_MODE=token): set {token}, "
        "then run the same command again"
    )
