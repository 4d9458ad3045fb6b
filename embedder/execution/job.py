"""The job as a run resolves it: ``auto`` choices filled from the URIs, names checked against the
connector and sink registries, and the plugin modules other processes must import."""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Sequence

from embedder.config import ConfigError, Job
from embedder.registry import connector_registry, sink_registry


def resolve_job(job: Job) -> Job:
    """Fills ``auto`` choices (source format, sink) from the URIs; returns a new Job."""
    job = job.model_copy(deep=True)
    if job.source.format == "auto":
        job.source.format = _detect_source_format(job)
    if job.output.sink == "auto":
        job.output.sink = sink_registry().detect_sink(job.output.uri)
    connector_registry().CONNECTORS.get(job.source.format)  # unknown names: RegistryError listing the valid
    sink_registry().SINKS.get(job.output.sink)
    sink_registry().check_output_location(job.output.uri, job.output.storage_options)
    return job


def plugin_modules(job: Job) -> list[str]:
    """Modules that other processes (readers, Ray tasks) import so that the job they validate finds its
    connector and its sink registered there: the modules of those the user's own code registered
    (built-ins register themselves). Readers never write, but they validate the whole job, sink name
    included: without its module a plugin sink failed every reader.

    Raises:
        ConfigError: the connector or sink is defined in the script being run (``__main__``), which
            other processes cannot import; the message says to move it into a module.
    """
    modules = []
    for kind, name, cls, builtin in (
        ("connector", job.source.format, connector_registry().CONNECTORS.get(job.source.format), "connectors."),
        ("sink", job.output.sink, sink_registry().SINKS.get(job.output.sink), "indexes."),
    ):
        module = cls.__module__
        if module.startswith(builtin):
            continue
        if module in ("__main__", "__mp_main__"):
            raise ConfigError(
                f"{kind} {name!r} is defined in the script being run (__main__), which reader "
                f"processes cannot import: move the class into a module (e.g. my_{kind}s.py) and import it"
            )
        modules.append(module)
    return modules


def import_plugins(modules: Sequence[str]) -> None:
    """Imports plugin modules in a reader process or Ray task (see ``plugin_modules``)."""
    for module in modules:
        importlib.import_module(module)


def _detect_source_format(job: Job) -> str:
    registry = connector_registry()
    uri = job.source.uri
    fmt = registry.detect_format(uri)
    if fmt:
        return fmt
    from embedder.storage import filesystem

    fs, path = filesystem(uri, job.source.storage_options)
    if not fs.exists(path):
        raise ConfigError(f"source {uri!r} does not exist: check source.uri / --source")
    if fs.isdir(path):
        if fs.exists(f"{path.rstrip('/')}/data") and fs.exists(f"{path.rstrip('/')}/_versions"):
            return "lance"
        counts: Counter[str] = Counter()
        for i, found in enumerate(fs.find(path)):
            if i >= 2000:
                break
            name = found.rsplit("/", 1)[-1]
            if name.startswith((".", "_")):
                continue
            detected = registry.detect_format(found)
            if detected:
                counts[detected] += 1
        if counts:
            return counts.most_common(1)[0][0]
    valid = ", ".join(n for n in registry.CONNECTORS.names())
    raise ConfigError(f"cannot tell the format of {uri!r}; set source.format / --format (valid: {valid})")
