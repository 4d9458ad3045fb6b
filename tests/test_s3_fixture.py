from __future__ import annotations

import fsspec


def test_moto_bucket_roundtrip(s3_bucket: str) -> None:
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{s3_bucket}/a/b.txt", b"hello")
    fs.invalidate_cache()
    assert fs.cat_file(f"{s3_bucket}/a/b.txt") == b"hello"
    assert fs.ls(f"{s3_bucket}/a") == [f"{s3_bucket[5:]}/a/b.txt"]
