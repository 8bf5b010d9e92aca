"""CLI latency: ``masksae --help`` and a harvest rerun on a complete store ("nothing to
compute"), each against what it cannot go below, measured in one run on this machine.

- ``masksae --help`` against ``python -c "import torch"`` (what the help cost when the CLI
  imported torch) and against a bare ``python -c pass``;
- the rerun of a complete bundled-model harvest against its floor (a process that imports
  torch + transformers and reads the model's config and tokenizer, which the provenance
  check needs) and against loading the weights too (the least the harvest did before it
  checked the store).

Each command runs ``repeats`` times, interleaved; the medians are reported. ``main(quick)``
prints the table, writes ``docs/bench/cli_latency.md`` and returns the figures.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "bench" / "cli_latency.md"
MODEL = "bundled:smollm2-135m"


def _seconds(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def _floor_code(weights: bool) -> str:
    load = (
        "AutoModelForCausalLM.from_pretrained(folder)"
        if weights
        else "AutoConfig.from_pretrained(folder)"
    )
    return (
        "import torch\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        "from masksae.models.bundled import resolve_bundled\n"
        f"folder = str(resolve_bundled({MODEL!r})[0])\n"
        f"AutoTokenizer.from_pretrained(folder); {load}\n"
    )


def main(quick: bool = False) -> dict[str, Any]:
    repeats = 2 if quick else 7
    py = sys.executable
    cli = [py, "-m", "masksae"]
    with tempfile.TemporaryDirectory(prefix="masksae-bench-cli-") as tmp:
        work = Path(tmp)
        harvest = [
            *cli,
            "harvest",
            "--out",
            "store",
            "--model",
            MODEL,
            "--layer",
            "15",
            "--tokens",
            "2048",
            "--device",
            "cpu",
            "--no-progress",
        ]
        subprocess.run(harvest, cwd=work, check=True, capture_output=True)  # the store
        commands = {
            "masksae --help": [*cli, "--help"],
            'python -c "import torch"': [py, "-c", "import torch"],
            "python -c pass": [py, "-c", "pass"],
            "harvest rerun, complete store": harvest,
            "floor: torch + transformers + config + tokenizer": [py, "-c", _floor_code(False)],
            "config + tokenizer + weights": [py, "-c", _floor_code(True)],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(repeats):  # interleaved: a busy spell hits every command alike
            for name, argv in commands.items():
                times[name].append(_seconds(argv, work))
    med = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        "help / import torch": med["masksae --help"] / med['python -c "import torch"'],
        "rerun / floor": med["harvest rerun, complete store"]
        / med["floor: torch + transformers + config + tokenizer"],
        "rerun / with weights": med["harvest rerun, complete store"]
        / med["config + tokenizer + weights"],
    }
    lines = [
        "# CLI latency",
        "",
        f"`benchmarks/bench_cli_latency.py` ({'quick, ' if quick else ''}median of {repeats}"
        f" interleaved runs; {platform.machine()}, python {platform.python_version()}).",
        "",
        "| command | median s |",
        "|---|---|",
        *(f"| {name} | {value:.2f} |" for name, value in med.items()),
        "",
        "| ratio | value |",
        "|---|---|",
        *(f"| {name} | {value:.2f} |" for name, value in ratios.items()),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not quick:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text, encoding="utf-8")
    return {"median_s": med, "ratios": ratios}


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
