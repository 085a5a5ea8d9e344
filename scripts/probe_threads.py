"""How steady `cpu.choose_threads`' probe is here: its figure, taken `--trials` times, idle and with a
busy loop on one core (another job), by the old rule and the new.

    .venv/bin/python scripts/probe_threads.py [--trials 20] [--json out.json]

  best-of-rounds  the old rule: the best 1-thread time over the best all-cores time, 3 rounds
  median-paired   `choose_threads`' rule: the median of PROBE_ROUNDS paired ratios (one probe; the
                  function probes again before settling on 1 thread)
All cores are chosen at a ratio of 1.3 or more. It prints min, median and max of each, and how many
trials fell below 1.3: idle, those would have left a run on one thread.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftkit import cpu  # noqa: E402
from peftkit.files import atomic_write_json  # noqa: E402


def best_of_rounds(cores: int) -> float:
    one = many = float("inf")
    for _ in range(3):
        one, many = min(one, cpu.probe_seconds(1)), min(many, cpu.probe_seconds(cores))
    return one / many


def median_paired(cores: int) -> float:
    return statistics.median(cpu.probe_seconds(1) / cpu.probe_seconds(cores) for _ in range(cpu.PROBE_ROUNDS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cores = cpu.available_cores()
    out = {"cores": cores, "trials": args.trials}
    for load in ("idle", "busy"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        try:
            for rule in (best_of_rounds, median_paired):
                ratios = [rule(cores) for _ in range(args.trials)]
                row = {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios),
                       "below_1.3": sum(r < 1.3 for r in ratios), "ratios": ratios}
                out[f"{load}_{rule.__name__}"] = row
                print(f"{load:4s} {rule.__name__:14s}: min {row['min']:.2f}, median {row['median']:.2f}, max {row['max']:.2f}; "
                      f"{row['below_1.3']} of {args.trials} below 1.3", flush=True)
        finally:
            if busy:
                busy.kill()
                busy.wait()
    if args.json:
        atomic_write_json(Path(args.json), out)


if __name__ == "__main__":
    main()
