"""Storage backends: each object store or hub protocol's missing-backend hint names the extra that
installs it, and each extra in pyproject.toml installs the backend its hint promises."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from embedder.storage import BACKEND_EXTRAS, StorageError, filesystem

REPO = Path(__file__).resolve().parents[2]


def test_every_hinted_extra_installs_its_backend() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for protocol, (package, extra) in BACKEND_EXTRAS.items():
        assert extra in extras, f"{protocol}:// hints at embedder[{extra}], which pyproject.toml lacks"
        names = [req.split(">")[0].split("=")[0].split("[")[0].strip().lower() for req in extras[extra]]
        assert package.lower() in names, (protocol, extra, extras[extra])
    assert extras["gcs"] and extras["azure"] and extras["hf"] and extras["s3"]


@pytest.mark.parametrize("uri,extra,package", [
    ("gs://bucket/corpus/*.jsonl", "gcs", "gcsfs"),
    ("az://container/corpus/*.jsonl", "azure", "adlfs"),
    ("abfs://container/corpus/*.jsonl", "azure", "adlfs"),
])
def test_missing_cloud_backend_names_its_extra(uri: str, extra: str, package: str) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here: the backend is not missing")
    with pytest.raises(StorageError) as caught:
        filesystem(uri)
    assert f"pip install 'embedder[{extra}]'" in str(caught.value) and package in str(caught.value)


def test_missing_hf_backend_names_the_hf_extra() -> None:
    """huggingface_hub comes with transformers; a child without it (import blocked) gets the hf hint."""
    code = (
        "import sys; sys.modules['huggingface_hub'] = None\n"
        "from embedder.storage import StorageError, filesystem\n"
        "try:\n    filesystem('hf://datasets/wikimedia/wikipedia/20231101.en/*.parquet')\n"
        "except StorageError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert "pip install 'embedder[hf]'" in out.stdout and "huggingface_hub" in out.stdout, out.stdout + out.stderr


def test_cli_run_from_a_missing_backend_exits_2_with_the_hint(tmp_path: Path) -> None:
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    proc = subprocess.run(
        [sys.executable, "-m", "embedder.cli", "run", "--source", "gs://bucket/docs.jsonl", "--output",
         str(tmp_path / "out"), "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                          "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'embedder[gcs]'" in proc.stderr
