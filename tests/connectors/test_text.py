"""The text-folder connector: one document per file, files grouped into shards, bad files quarantined."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from connectors.base import Connector, ConnectorError
from connectors.registry import CONNECTORS
from embedder.config import SourceConfig
from tests.connectors.reading import bad_of, docs_of, read_all


def _connector(uri: str, **options: object) -> Connector:
    return CONNECTORS.get("text")(SourceConfig(uri=uri, **options))





_TREE = {
    "index.md": "# Welcome\n\nStart here.",
    "guides/install.md": "Install with pip.",
    "guides/deep/tuning.txt": "Tune the token budget. Ünïcode stays.",
    "notes/a.text": "Plain note.",
    "notes/b.txt": "\ufeffA note saved with a byte-order mark.",
    ".hidden.md": "hidden file",
    "_draft.md": "draft",
    ".git/HEAD.txt": "inside a hidden folder",
    "_build/out.md": "inside an underscore folder",
    "image.png": "not text",
}


def _make_tree(root: Path, tree: dict[str, str] = _TREE) -> None:
    for rel, text in tree.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_nested_folder_ids_are_relative_paths(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    docs = docs_of(read_all(_connector(str(tmp_path), metadata_fields=["path"])))
    assert [d.id for d in docs] == [
        "guides/deep/tuning.txt",
        "guides/install.md",
        "index.md",
        "notes/a.text",
        "notes/b.txt",
    ]
    by_id = {d.id: d for d in docs}
    assert by_id["guides/install.md"].title == "install"
    assert by_id["guides/install.md"].text == "Install with pip."
    assert by_id["notes/b.txt"].text == "A note saved with a byte-order mark."
    assert by_id["index.md"].metadata == {"path": str(tmp_path / "index.md")}


def test_grouping_gives_every_file_once(tmp_path: Path) -> None:
    files = {f"d{i % 4}/f{i:03d}.txt": f"file {i} " * (i % 9 + 1) for i in range(60)}
    _make_tree(tmp_path, files)
    one_per_file = _connector(str(tmp_path), shard_size_mb=1 / 1024 / 1024)
    assert len(one_per_file.list_shards()) == 60
    grouped = _connector(str(tmp_path), shard_size_mb=200 / 1024 / 1024)
    shards = grouped.list_shards()
    assert 3 <= len(shards) < 60
    assert [s.id for s in grouped.list_shards()] == [s.id for s in shards]  # stable
    assert len({s.id for s in shards}) == len(shards)
    members = [Path(p).relative_to(tmp_path).as_posix() for s in shards for p in s.get("files")]
    assert members == sorted(files)
    grouped_docs = docs_of(read_all(grouped))
    assert sorted(d.id for d in grouped_docs) == sorted(files)
    assert grouped_docs == docs_of(read_all(one_per_file))
    assert all(d.text == files[d.id] for d in grouped_docs)


def test_group_id_changes_when_a_member_changes(tmp_path: Path) -> None:
    _make_tree(tmp_path, {f"f{i}.txt": "x" for i in range(5)})
    before = [s.id for s in _connector(str(tmp_path)).list_shards()]
    (tmp_path / "f2.txt").unlink()
    (tmp_path / "f2b.txt").write_text("y")
    after = [s.id for s in _connector(str(tmp_path)).list_shards()]
    assert len(before) == len(after) == 1
    assert before[0].startswith("f0.txt+5@") and after[0].startswith("f0.txt+5@")
    assert before != after


def test_files_per_shard_option_caps_groups(tmp_path: Path) -> None:
    _make_tree(tmp_path, {f"f{i:02d}.txt": "x" for i in range(25)})
    shards = _connector(str(tmp_path), options={"files_per_shard": 10}).list_shards()
    assert [len(s.get("files")) for s in shards] == [10, 10, 5]
    with pytest.raises(ConnectorError, match="files_per_shard"):
        _connector(str(tmp_path), options={"files_per_shard": 0}).list_shards()


def test_invalid_utf8_empty_and_missing_files_are_bad_records(tmp_path: Path) -> None:
    _make_tree(
        tmp_path, {"a.txt": "good a", "c.txt": "", "d.txt": " \n\t ", "e.txt": "gone soon", "f.txt": "good f"}
    )
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 in Latin-1")
    connector = _connector(str(tmp_path))
    shards = connector.list_shards()
    assert len(shards) == 1
    os.remove(tmp_path / "e.txt")  # deleted between listing and reading
    items = list(connector.documents(shards[0]))
    assert [d.id for d in docs_of(items)] == ["a.txt", "f.txt"]
    bad = {b.location: b for b in bad_of(items)}
    assert set(bad) == {"b.txt", "c.txt", "d.txt", "e.txt"}
    assert "UTF-8" in bad["b.txt"].reason and bad["b.txt"].doc_id == "b.txt"
    assert "empty" in bad["c.txt"].reason and "empty" in bad["d.txt"].reason
    assert "unreadable" in bad["e.txt"].reason


def test_single_file_source(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    docs = docs_of(read_all(_connector(str(tmp_path / "guides" / "install.md"))))
    assert [(d.id, d.title) for d in docs] == [("install.md", "install")]


def test_only_hidden_files_is_a_clear_error(tmp_path: Path) -> None:
    _make_tree(tmp_path, {".a.md": "x", "_b/c.md": "y"})
    with pytest.raises(ConnectorError, match="hidden"):
        _connector(str(tmp_path)).list_shards()


def test_s3_folder(s3_bucket: str, tmp_path: Path) -> None:
    fs = fsspec.filesystem("s3")
    tree = {k: v for k, v in _TREE.items() if not k.endswith(".png")}
    for rel, text in tree.items():
        fs.pipe_file(f"{s3_bucket}/docs/{rel}", text.encode("utf-8"))
    fs.invalidate_cache()
    _make_tree(tmp_path, tree)
    remote = _connector(f"{s3_bucket}/docs", shard_size_mb=40 / 1024 / 1024)
    local = _connector(str(tmp_path), shard_size_mb=40 / 1024 / 1024)
    assert [s.id for s in remote.list_shards()] == [s.id for s in local.list_shards()]
    remote_items = read_all(remote)
    assert bad_of(remote_items) == []
    strip = [(d.id, d.text, d.title) for d in docs_of(remote_items)]
    assert strip == [(d.id, d.text, d.title) for d in docs_of(read_all(local))]
    assert len(strip) == 5


def test_a_binary_file_of_another_format_is_refused(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "notes.txt.gz").write_bytes(gzip.compress(b"some notes"))
    with pytest.raises(ConnectorError) as err:
        _connector(str(tmp_path / "notes.txt.gz")).list_shards()
    assert str(err.value) == (
        "notes.txt.gz looks like a gzip-compressed file (starts with 1f 8b), not plain text: "
        "use --format jsonl for gzip-compressed JSON Lines (.jsonl.gz)"
    )
    (tmp_path / "docs.jsonl").write_text('{"id": "1", "text": "JSON is text too"}\n')
    assert len(docs_of(read_all(_connector(str(tmp_path / "docs.jsonl"))))) == 1


def test_a_file_name_that_is_not_utf8_is_quarantined_and_the_others_read(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt"), "wb") as f:
        f.write(b"a file named in Latin-1")
    (tmp_path / "z.txt").write_text("last file", encoding="utf-8")
    connector = _connector(str(tmp_path))
    assert [s.id for s in connector.list_shards()] == ["a.txt+3@" + connector.list_shards()[0].id.split("@")[1]]
    items = read_all(connector)
    assert [d.id for d in docs_of(items)] == ["a.txt", "z.txt"]
    assert [(b.location, b.reason) for b in bad_of(items)] == [
        ("caf\\xe9.txt", "file name is not valid UTF-8 (caf\\xe9.txt); rename the file (e.g. convmv -f latin1 -t utf8)")
    ]
    alone = _connector(str(tmp_path), options={"files_per_shard": 1})
    assert [s.id for s in alone.list_shards()] == ["a.txt", "caf\\xe9.txt", "z.txt"]


def test_fifos_are_skipped_and_links_out_of_the_root_need_follow_links(tmp_path: Path, caplog) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("inside", encoding="utf-8")
    (tmp_path / "secret.txt").write_text("outside the source root", encoding="utf-8")
    os.mkfifo(src / "pipe.txt")
    os.symlink(tmp_path / "secret.txt", src / "secret-link.txt")
    os.symlink("../a.txt", src / "sub" / "inner-link.txt")  # a link inside the root is a file of the source
    with caplog.at_level("WARNING", logger="embedder.connectors"):
        docs = docs_of(read_all(_connector(str(src))))
    assert [(d.id, d.text) for d in docs] == [("a.txt", "inside"), ("sub/inner-link.txt", "inside")]
    warnings = [r.getMessage() for r in caplog.records]
    assert any(f"skipped {src}/pipe.txt: not a regular file" in w for w in warnings), warnings
    assert any(f"skipped {src}/secret-link.txt: a link to {tmp_path}/secret.txt" in w for w in warnings), warnings
    followed = docs_of(read_all(_connector(str(src), options={"follow_links": True})))
    assert [d.id for d in followed] == ["a.txt", "secret-link.txt", "sub/inner-link.txt"]
    with pytest.raises(ConnectorError, match="follow_links. must be true or false"):
        _connector(str(src), options={"follow_links": "yes"}).list_shards()
