"""Helpers the runner tests share: the sample's articles, read an output back, wait for a dead job's
lease to expire."""

from __future__ import annotations

import bz2
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds


def sample_articles(wiki_sample: Path, chars: int) -> list[dict]:
    """Non-redirect ns-0 pages of the real sample, parsed independently of our connector, their text
    cut to ``chars`` characters (what keeps CPU encoding of the whole sample to seconds)."""
    with bz2.open(wiki_sample, "rb") as f:
        root = ET.parse(f).getroot()
    ns = root.tag.split("}")[0] + "}"
    out = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        title = page.findtext(f"{ns}title")
        text = page.find(f"{ns}revision/{ns}text").text or ""
        out.append({"id": page.findtext(f"{ns}id"), "title": title, "text": text[:chars],
                    "url": "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")})
    return out


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


def assert_same_rows(table: pa.Table, reference: pa.Table, min_cos: float = 0.9999) -> None:
    """Two outputs (sorted by id) hold the same chunks exactly once, with the same columns and vectors."""
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert ids == reference.column("id").to_pylist(), "missing or extra chunks"
    for column in ("text", "title", "shard_id", "content_hash", "url"):
        assert table.column(column).to_pylist() == reference.column(column).to_pylist(), column
    a = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    b = np.asarray(reference.column("vector").to_pylist(), dtype=np.float32)
    cos = np.sum(a * b, axis=1)
    assert cos.min() >= min_cos, f"min cos {cos.min()}"
