"""Job config: overrides, errors naming key and choices, credentials never saved."""

from __future__ import annotations

import pytest

from embedder.config import REDACTED, ConfigError, build_job, load_job_dict


def test_overrides_and_defaults(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("source: {uri: data/}\noutput: {uri: out/}\n")
    job = build_job(load_job_dict(path), ["chunking.max_tokens=128", "model.dtype=float16", "source.metadata_fields=[url, lang]"])
    assert job.chunking.max_tokens == 128 and job.model.dtype == "float16"
    assert job.source.metadata_fields == ["url", "lang"]
    assert job.model.name == "all-MiniLM-L6-v2" and job.model.trust_remote_code is False


def test_unknown_key_and_invalid_value_named() -> None:
    with pytest.raises(ConfigError) as err:
        build_job({"source": {"uri": "x", "colour": 1}, "output": {"uri": "y"}, "model": {"pooling": "x"}})
    assert "source.colour" in str(err.value) and "model.pooling" in str(err.value)
    with pytest.raises(ConfigError, match=r"output.sink.*Valid: 'auto', 'lance' or 'parquet'"):
        build_job({"source": {"uri": "x"}, "output": {"uri": "y", "sink": "csv"}})


def test_unknown_key_suggests_the_closest_valid_key(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        build_job({"source": {"uri": "x"}, "output": {"uri": "y"}}, ["source.text_feild=body"])
    assert str(err.value) == (
        "invalid job: unknown key 'source.text_feild' (did you mean 'source.text_field'?)"
    )
    path = tmp_path / "job.yaml"
    path.write_text("sorce: {uri: data/}\noutput: {uri: out/}\nmodel: {nmae: x}\n")
    with pytest.raises(ConfigError) as err:
        build_job(load_job_dict(path))
    assert "unknown key 'sorce' (did you mean 'source'?)" in str(err.value)
    assert "unknown key 'model.nmae' (did you mean 'model.name'?)" in str(err.value)


def test_unknown_key_with_nothing_close_lists_the_section_keys() -> None:
    with pytest.raises(ConfigError) as err:
        build_job({"source": {"uri": "x"}, "output": {"uri": "y"}}, ["chunking.colour=red"])
    assert str(err.value) == (
        "invalid job: unknown key 'chunking.colour' "
        "(valid keys of chunking: max_tokens, overlap_tokens, context, max_document_chars)"
    )


def test_yaml_is_safe_loaded(tmp_path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("source: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_dict(path)


def test_credentials_redacted_in_saved_job() -> None:
    job = build_job(
        {
            "source": {"uri": "s3://b/x", "storage_options": {"key": "AKIA123", "secret": "s3cr3t", "endpoint_url": "http://e"}},
            "output": {"uri": "s3://b/out", "storage_options": {"client_kwargs": {"aws_session_token": "tok"}}},
        }
    )
    saved = job.to_yaml()
    assert "AKIA123" not in saved and "s3cr3t" not in saved and "tok" not in saved.replace("token", "")
    assert REDACTED in saved and "http://e" in saved


def test_every_shipped_config_is_valid() -> None:
    from pathlib import Path

    from embedder.api import load_job

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        job = load_job(path)
        assert job.source.uri and job.output.uri, path


@pytest.mark.parametrize("table", ["../../../victim", "a/b", "..", ".hidden", "/abs", "", "x" * 129, "t\\u"])
def test_table_must_be_a_plain_name(table) -> None:
    with pytest.raises(ConfigError) as err:
        build_job({"source": {"uri": "docs/"}, "output": {"uri": "out/", "table": table}})
    assert f"invalid table name {table!r}: use a plain name of letters, digits" in str(err.value)
    assert str(err.value).startswith("invalid job: output.table: ")


@pytest.mark.parametrize("table", ["chunks", "wiki_2024-06", "v1.2", "_private"])
def test_plain_table_names_are_accepted(table) -> None:
    assert build_job({"source": {"uri": "docs/"}, "output": {"uri": "out/", "table": table}}).output.table == table
