"""Job config: overrides, errors naming key and choices, credentials never saved."""

from __future__ import annotations

import pytest

from embedder.config import REDACTED, ConfigError, build_job, load_job_dict, redact_text


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


AZURE_CONNECTION = (
    "DefaultEndpointsProtocol=https;AccountName=lakeacct;AccountKey=Zm9vYmFyYmF6cXV4c2VjcmV0==;"
    "EndpointSuffix=core.windows.net"
)
SAS_URL = "https://lakeacct.blob.core.windows.net/corpus?sv=2022-11-02&se=2030-01-01&sp=rl&sig=SASsig%2Bsecret%3D"
S3_PRESIGNED = (
    "https://lake.s3.amazonaws.com/wiki.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAPRESIGNED"
    "&X-Amz-Signature=f00dfeedsecret"
)
GCS_PRESIGNED = "https://storage.googleapis.com/lake/a.jsonl?X-Goog-Algorithm=GOOG4&X-Goog-Signature=beefsecret"


def test_azure_and_signed_url_secrets_redacted_in_saved_job() -> None:
    """Issue #19 item 10: secret by name (connection_string, sas_token, account_key...) or by look
    (a signed URL, a connection string) never reaches job.yaml; plain settings stay readable."""
    job = build_job(
        {
            "source": {
                "uri": S3_PRESIGNED,
                "storage_options": {
                    "connection_string": AZURE_CONNECTION,
                    "sas_token": "sv=2022-11-02&ss=b&sp=rl&sig=bareSASsecret",
                    "account_name": "lakeacct",
                    "client_secret": "clientsecretvalue",
                    "private_key": "-----BEGIN PRIVATE KEY-----pkvalue",
                    "client_kwargs": {"endpoint": SAS_URL, "headers": {"Authorization": "Bearer bearersecret"}},
                    "config_kwargs": {"signature_version": "s3v4"},
                },
            },
            "output": {"uri": "az://vectors/out", "storage_options": {"url": GCS_PRESIGNED, "conn": AZURE_CONNECTION}},
        }
    )
    saved = job.to_yaml()
    for secret in ("Zm9vYmFy", "SASsig", "bareSASsecret", "clientsecretvalue", "pkvalue", "bearersecret",
                   "AKIAPRESIGNED", "f00dfeedsecret", "beefsecret"):
        assert secret not in saved, secret
    data = job.redacted()
    options = data["source"]["storage_options"]
    assert options["connection_string"] == options["sas_token"] == options["client_secret"] == REDACTED
    assert options["private_key"] == options["client_kwargs"]["headers"]["Authorization"] == REDACTED
    assert options["client_kwargs"]["endpoint"] == f"https://lakeacct.blob.core.windows.net/corpus?{REDACTED}"
    assert options["account_name"] == "lakeacct" and options["config_kwargs"] == {"signature_version": "s3v4"}
    assert data["source"]["uri"] == f"https://lake.s3.amazonaws.com/wiki.parquet?{REDACTED}"
    assert data["output"]["storage_options"] == {
        "url": f"https://storage.googleapis.com/lake/a.jsonl?{REDACTED}",
        "conn": f"DefaultEndpointsProtocol=https;AccountName=lakeacct;AccountKey={REDACTED};EndpointSuffix=core.windows.net",
    }
    assert job.source.storage_options["connection_string"] == AZURE_CONNECTION  # the run itself still has it


@pytest.mark.parametrize(
    "text",
    ["https://example.org/page?id=3&lang=en&design=2", "s3://b/x.parquet", "https://e.org/?usig=1&esp=2", "a?sig"],
)
def test_text_without_secrets_is_left_alone(text) -> None:
    assert redact_text(text) == text
