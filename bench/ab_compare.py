#!/usr/bin/env python3
"""Two or more kvarn_cuda_bench binaries side by side: run them alternately, round after round (each round begun
by the next binary), in one session on one GPU (so that clocks, power cap and neighbours weigh on all of them
alike), and print each row's median time per binary and the first binary's time over each other's (> 1: the
other is faster).

    python3 bench/ab_compare.py --rounds 5 before/kvarn_cuda_bench after/kvarn_cuda_bench -- \\
        --decode-only --batches 1 --contexts 8192,32768

A row is (kind, shape, dtype, batch, context, splits) of the benchmark's CSV: where the binaries plan different
splits for a shape, it shows as two rows, each with "-" for the binaries that did not run it.

Stopped early (SIGTERM, e.g. by `timeout`, or Ctrl-C), it prints the table of the rounds it finished, so that a
device run cut short keeps what it measured.
"""
import argparse
import csv
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROW_KEY = ("kind", "shape", "dtype", "batch", "context", "splits")


def read_times(csv_path):
    times = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                times[tuple(row[k] for k in ROW_KEY)] = float(row["time_us"])
            except ValueError:  # "skipped (...)"
                pass
    return times


class Stopped(Exception):
    pass


def stop(signum, frame):
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal would cut the table short
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped()


def run_bench(command):
    """Runs one benchmark in a process group of its own, killed whole if this is stopped meanwhile (a wrapper script
    and the benchmark it starts alike); returns its exit status and what it wrote to stderr."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, err


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("binaries", nargs="+", help="kvarn_cuda_bench binaries; the first is the reference")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1:]  # after --: arguments for every binary
    if len(args.binaries) < 2:
        parser.error("expected at least two binaries")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    samples = defaultdict(lambda: [[] for _ in args.binaries])
    rounds_done = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                times = [None] * len(args.binaries)  # this round's, kept only once every binary has run
                # Each round starts with the next binary, so that none always runs first (after the idle GPU's
                # higher clock, or after another binary's heat).
                for i in [(r + j) % len(args.binaries) for j in range(len(args.binaries))]:
                    binary = args.binaries[i]
                    out = Path(tmp) / f"{i}.{r}.csv"
                    status, err = run_bench([binary, "--csv", str(out), *bench_args])
                    if status != 0:
                        sys.exit(f"{binary} failed in round {r + 1}: {err.strip()}")
                    times[i] = read_times(out)
                for i, binary_times in enumerate(times):
                    for key, t in binary_times.items():
                        samples[key][i].append(t)
                rounds_done += 1
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    except Stopped:
        print(f"stopped after {rounds_done} of {args.rounds} rounds; the medians of those", file=sys.stderr)
        if rounds_done == 0:
            sys.exit(1)

    names = " | ".join(f"binary {i} us" for i in range(len(args.binaries)))
    ratios = " | ".join(f"0 / {i}" for i in range(1, len(args.binaries)))
    print(f"| {' | '.join(ROW_KEY)} | {names} | {ratios} |")
    print("| " + " | ".join(["---"] * (len(ROW_KEY) + 2 * len(args.binaries) - 1)) + " |")
    for key in sorted(samples):
        med = [statistics.median(s) if s else None for s in samples[key]]
        cells = [*key, *(f"{m:.1f}" if m else "-" for m in med),
                 *(f"{med[0] / m:.3f}" if med[0] and m else "-" for m in med[1:])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
