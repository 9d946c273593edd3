"""Run every benchmark in this folder, one after another, and keep their printed tables.

Each ``bench_*.py`` compares medlens with the reference libraries (pytorch-grad-cam, Captum,
Quantus) in the same run and prints ratios of a plain forward pass, so the numbers compare on
any machine. The tables are echoed and also written to ``benchmarks/results/<name>.txt``.

Run: .venv/bin/python benchmarks/run.py [--only gradcam vit] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: smaller settings for a smoke run (``--quick``): the same code paths, fewer repeats
QUICK_ARGS = {"bench_gradcam.py": ["--repeats", "2"], "bench_vit.py": ["--repeats", "1", "--batch", "2"],
              "bench_perturbation.py": ["--size", "112", "--skip-3d"], "bench_metrics.py": ["--repeats", "1"],
              "bench_surrogate.py": ["--repeats", "1", "--images", "2", "--samples", "64"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names without bench_ and .py, e.g. gradcam vit")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches, to check they run")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
        if not scripts:
            print(f"no benchmark named {args.only}; have: {[s.stem.removeprefix('bench_') for s in sorted(HERE.glob('bench_*.py'))]}")
            return 2
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    failed = []
    for script in scripts:
        extra = QUICK_ARGS.get(script.name, []) if args.quick else []
        print(f"\n=== {script.name} {' '.join(extra)}", flush=True)
        start = time.perf_counter()
        run = subprocess.run([sys.executable, str(script), *extra], cwd=HERE, capture_output=True, text=True)
        print(run.stdout, end="")
        if run.returncode != 0:
            failed.append(script.name)
            print(run.stderr[-3000:], file=sys.stderr)
        else:
            (results / f"{script.stem}.txt").write_text(run.stdout)
        print(f"--- {script.name}: {time.perf_counter() - start:.0f} s, exit {run.returncode}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
