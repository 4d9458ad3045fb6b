"""Ray runner: time from a run's start to its first vectors, on a Ray cluster that is already running.

A Ray head is started first (``ray start --head --block`` in a subprocess, its own temp dir and
auth token; stopped at the end), then the same job runs ``--repeats`` times against it with
``runner: ray``, ``runner.address`` and ``runner.keep_encoders_s`` (``--keep-encoders-s``), each run in a fresh driver process as ``embedder run``
would be: the first run meets a fresh cluster, the later ones a warm one (Ray's own processes up,
but every run's workers are its own; its encoder actors too, unless
``--keep-encoders-s`` lets a run take over the loaded actors of the one before). The job: the bundled MiniLM over the
Wikipedia sample's articles as JSONL (or ``--model`` / ``--chars``), LanceDB sink.

The table is the run record's ``startup`` milestones (seconds from the run's start, see
``embedder.execution.result.RunResult``): connected (Ray connected, encoder actors requested),
listed, first encoder ready (an actor holds the model), planned (output opened, pending shards
known), first vectors (first encoded block on the driver), first commit (first shard committed),
and the whole run.

Usage (repository root)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_ray_first_vectors.py                  # CPU, MiniLM
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_ray_first_vectors.py --keep-encoders-s 120
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_ray_first_vectors.py --device cuda    # every GPU
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = REPO.parent / "shared" / "data" / "enwiki-sample-206pages.xml.bz2"
MILESTONES = ("connected", "listed", "encoder_ready", "planned", "first_vectors", "first_commit")


def child(job_json: str) -> None:
    """One run in this process: prints its run record's figures as one JSON line."""
    from embedder import run
    from embedder.config import build_job

    result = run(build_job(json.loads(job_json)))
    print("RESULT " + json.dumps({
        "state": result.state, "startup": result.startup, "seconds": result.seconds, "tokens": result.tokens,
        "chunks": result.chunks, "shards": result.shards_total, "encoders": result.encoders,
    }), flush=True)


def write_corpus(path: Path, sample: Path, chars: int) -> int:
    """The sample's non-redirect articles, each cut to ``chars`` characters, as JSONL."""
    with bz2.open(sample, "rb") as f:
        root = ET.parse(f).getroot()
    ns = root.tag.split("}")[0] + "}"
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for page in root.iter(f"{ns}page"):
            if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
                continue
            text = (page.find(f"{ns}revision/{ns}text").text or "")[:chars]
            out.write(json.dumps({"id": page.findtext(f"{ns}id"), "title": page.findtext(f"{ns}title"), "text": text}) + "\n")
            count += 1
    return count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A Ray head node of this machine, in a subprocess of its own (``ray start --block``)."""

    def __init__(self, root: Path, num_cpus: int, num_gpus: int) -> None:
        token = root / "ray-token"
        token.write_text(secrets.token_hex(32))
        # Token auth with a token of its own: works whether or not ~/.ray/auth_token exists here.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self.env.pop("RAY_ADDRESS", None)
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        cmd = ["ray", "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
               f"--num-gpus={num_gpus}", f"--temp-dir={root / 'ray'}", "--include-dashboard=false",
               "--disable-usage-stats"]
        self.log = open(root / "ray-start.log", "w")
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_up(started)

    def _wait_up(self, started: float, timeout: float = 120.0) -> None:
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"ray start exited with {self.proc.returncode}; see {self.log.name}")
            status = subprocess.run(["ray", "status", f"--address={self.address}"], env=self.env,
                                    capture_output=True, text=True)
            if status.returncode == 0:
                self.up_s = time.perf_counter() - started
                return
            time.sleep(0.5)
        raise SystemExit(f"the Ray cluster did not come up in {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        """SIGTERM to ``ray start --block`` stops the processes it started; SIGKILL to its group after."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()


def _run(job: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"the run failed (exit {done.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _table(rows: list[dict[str, Any]]) -> str:
    names = ["connected", "listed", "encoder ready", "planned", "first vectors", "first commit"]
    head = "| run | cluster | " + " | ".join(names) + " | total | chunks | shards |"
    lines = [head, "|" + "|".join("-" * (len(c) + 2) for c in head.strip("|").split("|")) + "|"]
    for r in rows:
        marks = [f"{r['startup'][m]:.2f}" if m in r["startup"] else "-" for m in MILESTONES]
        lines.append(f"| {r['run']} | {r['cluster']} | " + " | ".join(marks)
                     + f" | {r['seconds']:.2f} | {r['chunks']:,} | {r['shards']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="model name or path (default: the bundled MiniLM)")
    parser.add_argument("--num-cpus", type=int, default=0, help="the cluster's CPUs (default: this machine's, at least 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs on the one cluster (the first meets it fresh)")
    parser.add_argument("--keep-encoders-s", type=float, default=0.0,
                        help="runner.keep_encoders_s: later runs take over the earlier run's loaded encoder actors")
    parser.add_argument("--chars", type=int, default=2000, help="characters kept of each sample article")
    parser.add_argument("--shard-mb", type=float, default=0.05)
    parser.add_argument("--sample", default=str(SAMPLE), help="the Wikipedia sample (.xml.bz2)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    gpus = 0
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if not gpus:
            raise SystemExit("--device cuda needs CUDA GPUs")
    cpus = args.num_cpus or max(3, os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="embedder-bench-") as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        articles = write_corpus(corpus, Path(args.sample), args.chars)
        print(f"corpus: {articles} articles of ≤ {args.chars} chars ({corpus.stat().st_size / 1e6:.2f} MB); "
              f"cluster: {cpus} CPUs, {gpus} GPUs; model {args.model} on {args.device}; "
              f"keep_encoders_s {args.keep_encoders_s:g}", flush=True)
        cluster = Cluster(root, cpus, gpus)
        try:
            print(f"ray start: cluster up after {cluster.up_s:.1f} s at {cluster.address}", flush=True)
            for i in range(args.repeats):
                job = {
                    "source": {"uri": str(corpus), "format": "jsonl", "shard_size_mb": args.shard_mb},
                    "output": {"uri": str(root / f"out-{i}"), "sink": "lance"},
                    "model": {"name": args.model, "device": args.device,
                              "dtype": "bfloat16" if args.device == "cuda" else "float32"},
                    "runner": {"kind": "ray", "address": cluster.address, "show_progress": False,
                               "keep_encoders_s": args.keep_encoders_s},
                }
                result = _run(job, cluster.env)
                result.update(run=i + 1, cluster="fresh" if i == 0 else "warm")
                if i and args.keep_encoders_s:
                    result["cluster"] = "warm, kept encoders"
                print(f"  run {i + 1}: {json.dumps(result)}", flush=True)
                rows.append(result)
        finally:
            cluster.stop()
    print()
    print("seconds from the run's start (run record `startup`):")
    print(_table(rows))


if __name__ == "__main__":
    main()
