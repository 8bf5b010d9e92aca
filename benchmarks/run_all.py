"""`make bench`: run every benchmark under benchmarks/ and print one summary.

Each ``bench_*.py`` module exposes ``main(quick: bool = False) -> dict`` which measures ours
against a baseline in the same run, prints its own table, and records its figures in
``docs/bench/<name>.md``. ``--quick`` shrinks every benchmark to a smoke run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import sys
import time
import traceback
from pathlib import Path

from masksae.allocator import keep_freed_memory
from masksae.threads import apply_thread_env_defaults

# what the CLI runs with (before any benchmark imports torch)
apply_thread_env_defaults()
keep_freed_memory()

HERE = Path(__file__).resolve().parent
ORDER = (
    "bench_store",
    "bench_harvest",
    "bench_train_step",
    "bench_peers",
    "bench_sweep",
    "bench_evaluate",
    "bench_downstream",
    "bench_scaleout",
    "bench_probing",
    "bench_study",
    "bench_cli_latency",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks (e.g. bench_store)")
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(HERE))

    names = [n for n in ORDER if (HERE / f"{n}.py").exists()]
    if args.only:
        names = [n for n in names if n in args.only]
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}"
    )
    results: dict[str, object] = {}
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        try:
            results[name] = importlib.import_module(name).main(quick=args.quick)
        except Exception:  # report and go on: one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
        print(f"--- {name}: {time.perf_counter() - start:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print("\nfailed: " + (", ".join(failed) if failed else "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
