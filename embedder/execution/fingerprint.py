"""The vector fingerprint a job would write, told before its model loads, where the config alone decides.

A rerun whose settings would change the stored vectors is refused (``indexes.base.check_compatible``,
exit 2). Most such settings are plain config (``chunking.*``, ``output.vector_dtype``, a lower
``model.max_seq_length``, ``model.truncate_dim``): with the stored rows' provenance and the job that
last wrote them (``_embedder/job.yaml``), the provenance this job's encoder and chunker would give is
arithmetic, and the refusal needs no model load (seconds, not the minutes a BGE-large takes to load).

Anything only the model can tell (another model or prompt, a limit above the stored one, another
device or precision, whose load may fail first) gives ``None``: the run loads the model and checks
as before. The skeleton only refuses early; a job this predicts compatible is checked again after the
load, against the real encoder.
"""

from __future__ import annotations

from typing import Any

from embedder.config import Job

# ``model`` fields a rerun may change and still be predicted here; any other change needs the model.
PREDICTED_MODEL_FIELDS = frozenset({"max_seq_length", "truncate_dim"})


def predicted_provenance(stored: dict[str, Any], saved: Job, job: Job) -> tuple[int, dict[str, Any]] | None:
    """``(dim, provenance)`` that ``job``'s encoder and chunker would give (as ``Run.sink_for`` builds
    them), derived from the ``stored`` rows' provenance and ``saved``, the job that wrote them;
    ``None`` where only loading the model can tell.

    The output options (``vector_dtype``) and the metadata columns are left to the sink and the
    schema, which take them from ``job`` exactly as after a load.
    """
    from embedder.chunking import chunk_settings

    before, after = saved.model.model_dump(), job.model.model_dump()
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    if changed - PREDICTED_MODEL_FIELDS:
        return None
    chunking, limit, dim = stored.get("chunking"), stored.get("max_seq_length"), stored.get("dim")
    if not isinstance(chunking, dict) or not all(isinstance(v, int) for v in (limit, dim, chunking.get("max_tokens"))):
        return None  # an output written before these were stored
    # The saved job chunked at min(its max_tokens, the limit) minus the specials and prompt.
    saved_limit = limit if saved.chunking.max_tokens is None else min(saved.chunking.max_tokens, limit)
    overhead = saved_limit - chunking["max_tokens"]

    new_limit = limit
    if "max_seq_length" in changed:
        wanted = after["max_seq_length"]
        if wanted is None or wanted > limit:  # the model's own limit: only the model knows it
            return None
        new_limit = wanted
    if overhead < 0 or overhead >= new_limit:  # the load refuses such a limit (ModelError)
        return None

    truncate = stored.get("truncate_dim")
    new_dim, new_truncate = dim, truncate
    if "truncate_dim" in changed:
        wanted = after["truncate_dim"]
        full = dim if truncate is None else None  # the model's width, when the stored rows have it
        if wanted is None:
            if full is None:
                return None
            new_dim, new_truncate = full, None
        elif wanted > dim:  # above the model's width (a ConfigError) or above a stored truncation
            return None
        elif wanted == full:
            new_dim, new_truncate = full, None
        else:
            new_dim, new_truncate = wanted, wanted

    try:
        new_chunking = chunk_settings(new_limit, overhead, job.chunking)
    except ValueError:  # the load path raises it, after the model loads
        return None
    provenance = {**stored, "max_seq_length": new_limit, "dim": new_dim, "chunking": new_chunking}
    provenance.pop("truncate_dim", None)
    if new_truncate is not None:
        provenance["truncate_dim"] = new_truncate
    return new_dim, provenance
