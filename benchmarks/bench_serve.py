"""``medlens serve`` under load on loopback: latency (p50/p95) and requests/s of POST /api/explain.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_serve.py [--clients 8] [--requests 25] [--method gradcam]

A real uvicorn server (127.0.0.1, free port) serves the tiny PhantomNet (random init, 2D, 64x64
input); each client (httpx, its own connection) explains a real brain MRI slice (512x512 JPEG from
../shared/data, opened once) ``--requests`` times. Explanations on the shared model are serialised
by its lock, so requests/s measures the whole path: parsing, the lock, the model, the 512x512 map
and its digest. Every map is checked against the sequential result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from medlens.serve import create_app, served_model
from medlens.serve.background import background_server

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDLENS_SHARED_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = DATA / "brain-tumor-mri" / "glioma" / "1841.jpg"
    if not image.exists():
        sys.exit(f"real data not found at {image}")
    torch.manual_seed(0)
    model = served_model("medlens.models:phantom_net", dims=2, size=(args.size, args.size), name="phantom-2d")
    app = create_app(model, data_dir=image.parent)
    with background_server(app) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            image_id = client.post("/api/open", data={"path": image.name}).json()["image_id"]
            form = {"image_id": image_id, "model": "phantom-2d", "method": args.method}
            for _ in range(3):  # warm-up
                expected = client.post("/api/explain", data=form).json()["map_sha256"]
        latencies: list[float] = []
        errors: list[str] = []
        mismatches = 0
        lock = threading.Lock()

        def run_client() -> None:
            nonlocal mismatches
            with httpx.Client(base_url=url, timeout=60) as client:
                for _ in range(args.requests):
                    start = time.perf_counter()
                    r = client.post("/api/explain", data=form)
                    elapsed = time.perf_counter() - start
                    with lock:
                        if r.status_code != 200:
                            errors.append(r.text[:200])
                        else:
                            latencies.append(elapsed)
                            mismatches += r.json()["map_sha256"] != expected

        threads = [threading.Thread(target=run_client) for _ in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    latencies.sort()
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    total = args.clients * args.requests
    print(f"### medlens serve: {args.clients} clients x {args.requests} POST /api/explain ({args.method}, PhantomNet {args.size}x{args.size}, 512x512 MRI)\n")
    print("| requests | errors | maps != sequential | p50 latency (ms) | p95 latency (ms) | requests/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {total} | {len(errors)} | {mismatches} | {1000 * p50:.1f} | {1000 * p95:.1f} | {total / wall:.1f} |")
    if errors or mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
