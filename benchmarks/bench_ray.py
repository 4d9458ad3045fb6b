"""The Ray runner on every GPU of one machine against the local runner on one GPU.

The same job — the synthetic Wikipedia-like corpus of ``bench_encoder.py`` written as JSONL, a
random-weight model of a benchmark shape, bf16, Parquet sink — runs twice, each in a fresh process:
``runner: local`` with ``CUDA_VISIBLE_DEVICES`` set to the first GPU, then ``runner: ray`` on a
local Ray cluster started by the run (one encoder actor per GPU, reading and chunking as Ray Data
CPU tasks over all cores). It prints tokens/s of each (the embedding phase: the run record's
``pipeline_seconds``, which for Ray includes starting the encoder actors and loading the model in
them), tokens/s per GPU, the scaling efficiency, and checks the two outputs hold the same ids with
vectors at cosine ≥ 0.999 (bf16 on both sides).

Usage (GPU machine with Ray installed, repository root)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_ray.py --models bge-large --tokens 20000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "embedder" / "models"))  # tiny_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bge-large")
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--shard-mb", type=float, default=8.0)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run (2 CPU actors)")
    parser.add_argument("--minilm", default="", help="bundled MiniLM directory (default: the installed package)")
    args = parser.parse_args()

    import torch

    from benchmarks.bench_encoder import build_model
    from benchmarks.bench_pipeline import minilm_dir, write_jsonl_corpus
    from benchmarks.fresh_run import read_vectors, run_fresh

    cpu = args.device == "cpu"
    gpus = 1 if cpu else torch.cuda.device_count()  # on CPU one actor: a 2-core machine has one CPU left to read
    if gpus < 1:
        raise SystemExit("bench_ray needs CUDA GPUs (or --device cpu for a smoke run)")
    minilm = minilm_dir(args.minilm)
    print(f"{gpus} x {'CPU actor' if cpu else torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_jsonl_corpus(root / "corpus.jsonl", args.tokens, minilm)
        for name in args.models.split(","):
            path = build_model(name, root / "models", minilm)
            results = {}
            for kind in ("local", "ray"):
                job = {
                    "source": {"uri": str(corpus), "format": "jsonl", "shard_size_mb": args.shard_mb},
                    "output": {"uri": str(root / f"out-{name}-{kind}"), "sink": "parquet"},
                    "model": {"name": path, "device": args.device, "dtype": "float32" if cpu else "bfloat16"},
                    "runner": {"kind": kind, "show_progress": False, **({"encoders": gpus} if cpu else {})},
                }
                results[kind] = run_fresh(job, "0" if kind == "local" and not cpu else None)
                print(f"  {name} {kind}: {json.dumps(results[kind])}", flush=True)
            ids_l, vec_l = read_vectors(str(root / f"out-{name}-local"))
            ids_r, vec_r = read_vectors(str(root / f"out-{name}-ray"))
            assert ids_l == ids_r, "local and ray outputs hold different ids"
            cos = (vec_l * vec_r).sum(1) / (np.linalg.norm(vec_l, axis=1) * np.linalg.norm(vec_r, axis=1))
            local, ray = results["local"], results["ray"]
            rows.append({
                "model": name, "tokens": local["tokens"], "local_tok_s": local["tokens_per_s"],
                "ray_tok_s": ray["tokens_per_s"], "ray_gpus": gpus, "ray_per_gpu": ray["tokens_per_s"] / gpus,
                "efficiency": ray["tokens_per_s"] / gpus / local["tokens_per_s"], "rows": len(ids_l),
                "min_cos": float(cos.min()), "local_embed_s": local["embed_s"], "ray_embed_s": ray["embed_s"],
                "local_steady": local["steady_tokens_per_s"], "ray_steady": ray["steady_tokens_per_s"],
                "local_first_s": local["first_tokens_s"], "ray_first_s": ray["first_tokens_s"],
            })
    print()
    print(f"| {'model':<10} | {'tokens':>11} | {'local 1 GPU tok/s':>17} | {'ray tok/s':>11} | {'GPUs':>4} | "
          f"{'ray per GPU':>11} | {'per-GPU vs local':>16} | {'rows':>8} | {'min cos':>8} |")
    print("|" + "|".join("-" * n for n in (12, 13, 19, 13, 6, 13, 18, 10, 10)) + "|")
    for r in rows:
        print(f"| {r['model']:<10} | {r['tokens']:>11,} | {r['local_tok_s']:>17,.0f} | {r['ray_tok_s']:>11,.0f} | "
              f"{r['ray_gpus']:>4} | {r['ray_per_gpu']:>11,.0f} | {r['efficiency']:>15.0%} | {r['rows']:>8,} | "
              f"{r['min_cos']:>8.5f} |")
    print()
    print("steady state (10% to 90% of the tokens, from the run timelines) and time to the first vectors:")
    for r in rows:
        print(f"  {r['model']}: local {r['local_steady']:,.0f} tok/s (first after {r['local_first_s']} s); "
              f"ray {r['ray_steady']:,.0f} tok/s = {r['ray_steady'] / r['ray_gpus']:,.0f} per GPU "
              f"({r['ray_steady'] / r['ray_gpus'] / max(1, r['local_steady']):.0%} of local; first after {r['ray_first_s']} s)")


if __name__ == "__main__":
    main()
