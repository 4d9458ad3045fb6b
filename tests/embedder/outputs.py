"""Helpers the runner tests share: read an output back, wait for a dead job's lease to expire."""

from __future__ import annotations

import time

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds


def read_output(output: str, sink: str) -> pa.Table:
    """Every committed row of an output (local or s3://), as a reader outside embedder sees it."""
    if sink == "parquet":
        fs, path = fsspec.core.url_to_fs(output)
        return ds.dataset(path, format="parquet", filesystem=fs).to_table()
    import lancedb

    return lancedb.connect(output).open_table("chunks").to_arrow()


def wait_lease_expired(output: str, timeout_s: float = 30.0) -> None:
    """Returns once no live lease holds ``output`` (a killed job's lease expires by itself)."""
    from embedder.lease import Lease

    lease = Lease(output)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        record = lease.read()
        if record is None or record.get("expires_at", 0) < time.time():
            return
        time.sleep(0.2)
    raise AssertionError("the dead job's lease never expired")
