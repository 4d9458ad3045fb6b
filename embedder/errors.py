"""The root of embedder's exceptions, and the one split the command line cares about.

``UsageError``: a job or command that cannot run as given (a config value, a path, a model name, an
output written with other settings); its message is one line naming the fix, and the CLI exits 2.
Every other ``EmbedderError`` is a run that failed (exit 1) with a message meant for the user. Each
concrete error also keeps the built-in base it always had (``ConfigError`` is a ``ValueError``...),
so existing ``except`` clauses go on working. This module imports nothing, so the CLI maps errors to
exit codes without importing torch.
"""

from __future__ import annotations


class EmbedderError(Exception):
    """Any error embedder raises on purpose, with a message for the user."""


class UsageError(EmbedderError):
    """A job or command that cannot run as given; the message names the fix (CLI exit code 2)."""
