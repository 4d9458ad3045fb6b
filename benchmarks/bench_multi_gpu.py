"""Several GPUs, measured (issue #18): one Wikipedia-like job on one GPU, on every GPU through the
local runner, and through the Ray runner — scaling, start-up, memory, identical output, a lost node.

The job: the synthetic Wikipedia-like corpus of ``bench_encoder.py`` (``synthetic_corpus``: 40% full
512-token windows, the rest log-normal), written as a folder of JSONL pieces (200M tokens by
default), a random-weight model of the BGE-large / BGE-base shape (``bench_encoder.build_model``;
``minilm`` is the bundled all-MiniLM-L6-v2), bf16 on GPU (fp32 on CPU), Parquet sink. Each run is a
fresh process (``fresh_run.py``):

1. ``1 device``  — the local runner on one GPU (``CUDA_VISIBLE_DEVICES=0``; on CPU one encoder);
   every other run's output is checked against it: same ids, none twice, cosine ≥ 0.999.
2. ``local``     — the local runner with ``runner.encoders: auto`` (one encoder per GPU; on CPU
   ``--encoders`` of them, default 2).
3. ``ray``       — the Ray runner on a one-node Ray cluster the benchmark starts with every GPU and
   CPU (one encoder actor per GPU; on CPU ``--encoders`` actors); cluster start-up is not timed.
4. ``ray 2 nodes`` and ``ray 2 nodes, 1 killed`` — the Ray runner on a head plus two worker nodes
   (each its own raylet, half the GPUs and CPUs: ``tests/embedder/runners/ray_nodes.py``), clean, then with
   the worker node that holds an encoder actor SIGKILLed once a third of the shards are committed.
   On GPU a replacement node with the same GPUs joins right after the kill (as a spot replacement or
   an autoscaler would; without it the lost actors have no GPU to restart on); on CPU the surviving
   nodes have room and none joins (``--replace`` / ``--no-replace``). Time lost = the two walls' difference.

Ray runs are skipped, with the reason printed, when Ray is not installed. Printed: tokens/s of the
run (the run record's ``pipeline_seconds``: model loading excluded) and in steady state (10%–90% of
the tokens), both per device and against the one-device run (the scaling efficiency; goal ≥ 0.95),
time to the first vectors, peak host memory (PSS of the run's processes, Ray's nodes included), and
a projection for English Wikipedia (~4.6B tokens) on 8 H200s at ``--gpu-hourly-usd`` per GPU-hour
(default 4.54: Spheron's on-demand H200 SXM price of 2026-03-17,
https://www.spheron.network/blog/nvidia-h200-vs-b200-vs-gb200).

Usage (repository root)::

    # the multi-GPU machine (2–8 H200s); --models bge-large and --models bge-base split it across
    # two commands, --work-dir keeps the corpus for the second
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_multi_gpu.py --models bge-large,bge-base
    # CPU smoke run: 2 CPU encoders, Ray on local clusters
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_multi_gpu.py --device cpu --tokens 200000 --models minilm
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "embedder" / "models"))  # tiny_models

WIKIPEDIA_TOKENS = 4.6e9
"""English Wikipedia's articles in BERT tokens (the issue's figure)."""
DEFAULT_GPU_HOURLY_USD = 4.54
"""Spheron's on-demand H200 SXM price per GPU-hour, 2026-03-17 (see the module docstring)."""
PIECE_TOKENS = 10_000_000
"""Tokens per JSONL piece of the corpus (pieces are written in parallel)."""
KILL_AT = 1 / 3
"""Share of the shards committed when the fault run loses its node."""


# --- the corpus and the jobs ----------------------------------------------------------------


def write_corpus(folder: Path, tokens: int, minilm: str) -> Path:
    """A folder of JSONL pieces of about ``tokens`` tokens in all; kept (and reused) once complete."""
    from benchmarks.bench_pipeline import write_jsonl_corpus

    done = folder / f".complete-{tokens}"
    if done.exists():
        print(f"corpus: reusing {folder}", flush=True)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pieces = max(1, math.ceil(tokens / PIECE_TOKENS))
    sizes = [tokens // pieces + (1 if k < tokens % pieces else 0) for k in range(pieces)]
    with ProcessPoolExecutor(max_workers=max(1, min(pieces, (os.cpu_count() or 2) - 1))) as pool:
        futures = [pool.submit(write_jsonl_corpus, folder / f"part-{k:05d}.jsonl", n, minilm, k, f"p{k}-")
                   for k, n in enumerate(sizes)]
        for future in futures:
            future.result()
    done.touch()
    return folder


def model_path(name: str, root: Path, minilm: str) -> str:
    """A random-weight model of a benchmark shape; ``minilm``: the bundled model itself."""
    from benchmarks.bench_encoder import build_model

    return minilm if name == "minilm" else build_model(name, root, minilm)


def make_job(args: argparse.Namespace, corpus: Path, model: str, output: Path, kind: str,
             encoders: int | str, address: str | None = None) -> dict[str, Any]:
    cpu = args.device == "cpu"
    runner: dict[str, Any] = {"kind": kind, "show_progress": False, "encoders": encoders}
    if address:
        runner["address"] = address
    return {
        "source": {"uri": str(corpus), "format": "jsonl", "shard_size_mb": args.shard_mb},
        "output": {"uri": str(output), "sink": "parquet"},
        "model": {"name": model, "device": args.device, "dtype": "float32" if cpu else "bfloat16"},
        "runner": runner,
    }


# --- Ray clusters ---------------------------------------------------------------------------


def ray_missing() -> str | None:
    """Why the Ray runs cannot run here, or None."""
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'embedder[ray]')"
    return None


def one_node_cluster(args: argparse.Namespace, devices: int) -> Any:
    """Every GPU and CPU in one node (on CPU: an actor's CPU per encoder and one to read)."""
    from tests.embedder.runners.ray_nodes import LocalRayCluster

    if args.device == "cpu":
        cluster = LocalRayCluster(head_cpus=devices + 1, object_store_bytes=args.object_store_bytes)
    else:
        cluster = LocalRayCluster(head_cpus=os.cpu_count() or 1, head_gpus=devices,
                                  object_store_bytes=args.object_store_bytes)
    cluster.wait_for_nodes(1)
    return cluster


def two_node_cluster(args: argparse.Namespace, devices: int) -> tuple[Any, list[dict[str, Any]]]:
    """A head without GPUs and two worker nodes of half the GPUs and CPUs each; returns the
    cluster and each worker node's ``add_node`` arguments (to start a replacement)."""
    from tests.embedder.runners.ray_nodes import LocalRayCluster

    cpu = args.device == "cpu"
    cluster = LocalRayCluster(head_cpus=1 if cpu else 2, object_store_bytes=args.object_store_bytes)
    specs = []
    for i in range(2):
        if cpu:
            specs.append({"num_cpus": devices})  # room for a lost node's actor on the survivor
        else:
            gpus = list(range(devices))[i * devices // 2 : (i + 1) * devices // 2]
            specs.append({"num_cpus": max(2, ((os.cpu_count() or 4) - 2) // 2), "num_gpus": len(gpus),
                          "cuda_visible_devices": ",".join(map(str, gpus))})
    for spec in specs:
        cluster.add_node(**spec)
    cluster.wait_for_nodes(3)
    return cluster, specs


def cluster_pids(cluster: Any) -> set[int]:
    pids: set[int] = set()
    for node in cluster.nodes:
        pids |= node.pids()
    return pids


class NodeKiller:
    """``run_fresh``'s watch: kills the worker node holding an encoder actor once ``after`` shards
    of ``output`` are committed (once), and starts ``replacement`` (``add_node`` arguments) if given."""

    def __init__(self, cluster: Any, output: Path, after: int, replacement: dict[str, Any] | None) -> None:
        self.cluster, self.output, self.after, self.replacement = cluster, output, after, replacement
        self.event: dict[str, Any] = {}

    def __call__(self, elapsed_s: float) -> None:
        from embedder.checkpoint import Checkpoint

        if self.event or not (self.output / "_embedder").exists():
            return
        committed = len(Checkpoint(str(self.output)).completed())
        if committed < self.after:
            return
        victim = self.cluster.node_running("EncoderActor")
        if victim is None:
            return
        processes = self.cluster.kill(victim)
        self.event = {"node": victim.name, "at_s": round(elapsed_s, 1), "committed": committed,
                      "processes": processes, "replaced": self.replacement is not None}
        if self.replacement is not None:
            self.cluster.add_node(**self.replacement)
        print(f"    fault: {victim.name} killed ({processes} processes) at {elapsed_s:.1f} s, "
              f"{committed} shards committed{'; a replacement node starts' if self.replacement else ''}", flush=True)


# --- the runs -------------------------------------------------------------------------------


def run_model(args: argparse.Namespace, name: str, corpus: Path, root: Path, devices: int, minilm: str) -> dict[str, Any]:
    """Every run of one model; returns {run name: figures}."""
    from benchmarks.fresh_run import compare_outputs, run_fresh

    cpu = args.device == "cpu"
    path = model_path(name, root / "models", minilm)
    every = devices if cpu else "auto"
    runs: dict[str, dict[str, Any]] = {}

    def record(label: str, kind: str, encoders: int | str, gpus: str | None, n_devices: int, **kw: Any) -> None:
        out = output_of(root, name, label)
        job = make_job(args, corpus, path, out, kind, encoders, kw.pop("address", None))
        figures = run_fresh(job, gpus, **kw)
        figures.update(devices=n_devices, output=str(out))
        if runs:
            figures.update(compare_outputs(runs["1 device"]["output"], str(out)))
        runs[label] = figures
        print(f"  {name} {label}: " + ", ".join(f"{k} {v}" for k, v in figures.items()
                                                 if k not in ("output", "encoder_tokens_per_s")), flush=True)

    record("1 device", "local", 1, None if cpu else "0", 1)
    record("local", "local", every, None, devices)
    reason = ray_missing() if args.ray else "--no-ray"
    if reason:
        print(f"  {name} ray: skipped: {reason}", flush=True)
        return runs
    cluster = one_node_cluster(args, devices)
    try:
        record("ray", "ray", every, None, devices, address=cluster.address, env=ray_env(),
               also_measure=lambda: cluster_pids(cluster))
    finally:
        cluster.shutdown()
    cluster, specs = two_node_cluster(args, devices)
    try:
        pids = lambda: cluster_pids(cluster)  # noqa: E731
        record("ray 2 nodes", "ray", every, None, devices, address=cluster.address, env=ray_env(), also_measure=pids)
        shards = runs["ray 2 nodes"]["shards"]
        killer = NodeKiller(cluster, output_of(root, name, "ray 2 nodes, 1 killed"), max(1, int(shards * KILL_AT)), specs[1] if replace(args) else None)
        record("ray 2 nodes, 1 killed", "ray", every, None, devices, address=cluster.address, env=ray_env(),
               also_measure=pids, watch=killer)
        runs["ray 2 nodes, 1 killed"]["fault"] = killer.event
    finally:
        cluster.shutdown()
    return runs


def output_of(root: Path, model: str, label: str) -> Path:
    return root / f"out-{model}-{label.replace(',', '').replace(' ', '-')}"


def ray_env() -> dict[str, str]:
    """The drivers' environment: that of the benchmark's clusters (``runner.address`` picks one)."""
    from tests.embedder.runners.ray_nodes import RAY_ENV

    return dict(RAY_ENV)


def replace(args: argparse.Namespace) -> bool:
    return args.replace if args.replace is not None else args.device != "cpu"


# --- what is printed ------------------------------------------------------------------------


def print_table(results: dict[str, dict[str, dict[str, Any]]], unit: str) -> None:
    head = (f"| {'model':<10} | {'run':<21} | {unit + 's':>4} | {'tokens':>11} | {'wall s':>7} | {'tok/s':>11} | "
            f"{'per ' + unit:>10} | {'vs 1':>5} | {'steady/' + unit:>11} | {'vs 1':>5} | {'first s':>7} | "
            f"{'peak GB':>7} | {'rows':>9} | {'ids':>4} | {'min cos':>7} |")
    print(head)
    print("|" + "|".join("-" * len(cell) for cell in head.split("|")[1:-1]) + "|")
    for model, runs in results.items():
        one = runs["1 device"]
        for label, r in runs.items():
            n = r["devices"]
            per, steady = r["tokens_per_s"] / n, r["steady_tokens_per_s"] / n
            ids = "=" if label == "1 device" else ("same" if r.get("same_ids") else "DIFF")
            cos = "-" if label == "1 device" else f"{r.get('min_cos', float('nan')):.5f}"
            print(f"| {model:<10} | {label:<21} | {n:>4} | {r['tokens']:>11,} | {r['wall_s']:>7.1f} | "
                  f"{r['tokens_per_s']:>11,.0f} | {per:>10,.0f} | {per / max(one['tokens_per_s'], 1e-9):>5.2f} | "
                  f"{steady:>11,.0f} | {steady / max(one['steady_tokens_per_s'], 1e-9):>5.2f} | "
                  f"{r['first_tokens_s']:>7} | {r['peak_memory_gb']:>7.2f} | {r['rows']:>9,} | {ids:>4} | {cos:>7} |")


def print_fault(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    for model, runs in results.items():
        clean, faulted = runs.get("ray 2 nodes"), runs.get("ray 2 nodes, 1 killed")
        if not clean or not faulted:
            continue
        event = faulted.get("fault") or {}
        if not event:
            print(f"  {model}: the fault run ended before a worker node held an encoder actor: nothing was killed")
            continue
        print(f"  {model}: clean {clean['wall_s']:.1f} s; {event['node']} killed at {event['at_s']} s "
              f"({event['committed']}/{faulted['shards']} shards committed, {event['processes']} processes"
              f"{', replaced' if event['replaced'] else ', not replaced'}): {faulted['wall_s']:.1f} s, "
              f"lost {faulted['wall_s'] - clean['wall_s']:+.1f} s; output "
              f"{'same ids' if faulted.get('same_ids') else 'DIFFERENT ids'}, min cos {faulted.get('min_cos', float('nan')):.5f}")


def print_projection(results: dict[str, dict[str, dict[str, Any]]], gpu_hourly_usd: float, gpus: int = 8) -> None:
    """English Wikipedia on ``gpus`` GPUs from each measured run's steady per-device rate (a run on
    fewer GPUs assumes its per-GPU rate holds at ``gpus``), plus its time to the first vectors."""
    print(f"English Wikipedia ({WIKIPEDIA_TOKENS / 1e9:.1f}B tokens) on {gpus} GPUs at ${gpu_hourly_usd:.2f}/GPU-hour "
          f"(${gpus * gpu_hourly_usd:.2f}/hour), from the measured steady rate per device:")
    for model, runs in results.items():
        for label, r in runs.items():
            if label.endswith("killed"):
                continue
            rate = r["steady_tokens_per_s"] / r["devices"] * gpus
            if rate <= 0:
                continue
            seconds = WIKIPEDIA_TOKENS / rate + (r["first_tokens_s"] if r["first_tokens_s"] == r["first_tokens_s"] else 0)
            hours = seconds / 3600
            print(f"  {model:<10} {label:<12} {rate / 1e6:6.2f}M tok/s -> {seconds / 60:6.1f} min, "
                  f"${hours * gpus * gpu_hourly_usd:,.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bge-large,bge-base", help="bge-large, bge-base, bge-small, minilm-l6 "
                        "(random weights of that shape) or minilm (the bundled model)")
    parser.add_argument("--tokens", type=int, default=200_000_000)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--encoders", type=int, default=2, help="CPU only: encoders of the local and Ray runs")
    parser.add_argument("--shard-mb", type=float, default=None, help="default: 16 on GPU, 0.1 on CPU")
    parser.add_argument("--object-store-gb", type=float, default=None, help="per Ray node; default 32 on GPU, 0.3 on CPU")
    parser.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True, help="the Ray runs")
    parser.add_argument("--replace", action=argparse.BooleanOptionalAction, default=None,
                        help="start a node in place of the killed one (default: on GPU yes, on CPU no)")
    parser.add_argument("--gpu-hourly-usd", type=float, default=DEFAULT_GPU_HOURLY_USD,
                        help=f"price per GPU-hour for the projection (default {DEFAULT_GPU_HOURLY_USD}: Spheron "
                        "on-demand H200 SXM, 2026-03-17)")
    parser.add_argument("--work-dir", default="", help="keep the corpus and outputs here (default: a temp dir, removed)")
    parser.add_argument("--minilm", default="", help="bundled MiniLM directory (default: the installed package)")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    args.shard_mb = args.shard_mb or (0.1 if cpu else 16.0)
    args.object_store_bytes = int((args.object_store_gb or (0.3 if cpu else 32.0)) * 1e9)

    from benchmarks.bench_pipeline import minilm_dir

    if cpu:
        devices, what = args.encoders, f"{args.encoders} CPU encoders (a CPU smoke run, not a GPU figure)"
    else:
        import torch

        devices = torch.cuda.device_count()
        if devices < 1:
            raise SystemExit("bench_multi_gpu needs CUDA GPUs (or --device cpu for a smoke run)")
        what = f"{devices} x {torch.cuda.get_device_name(0)}"
    print(f"{what}, {os.cpu_count()} CPUs; {args.tokens:,} tokens, {args.shard_mb:g} MB shards", flush=True)
    minilm = minilm_dir(args.minilm)
    root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-multi-"))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        t0 = time.perf_counter()
        corpus = write_corpus(root / "corpus", args.tokens, minilm)
        print(f"corpus ready in {time.perf_counter() - t0:.1f} s", flush=True)
        for name in args.models.split(","):
            for old in root.glob(f"out-{name}-*"):
                shutil.rmtree(old)  # a --work-dir kept from an earlier command: runs start empty
            results[name] = run_model(args, name, corpus, root, devices, minilm)
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    unit = "CPU" if cpu else "GPU"
    print()
    print_table(results, unit)
    print()
    print("fault (ray, a head and 2 worker nodes; the worker node holding an encoder actor SIGKILLed):")
    print_fault(results)
    print()
    if cpu:
        print("(CPU smoke run: the projection below uses CPU rates and means nothing for H200s)")
    print_projection(results, args.gpu_hourly_usd)


if __name__ == "__main__":
    main()
