r"""Runs a command and reports its wall time and peak resident memory (as JSON).

  python benchmarks/timed_run.py --out run.json -- python train.py --config configs/beauty.py \
      --workdir runs/beauty

What `/usr/bin/time -v` gives, on machines that lack it: the command's output
passes through untouched; at the end one line `timed_run: ...` and the JSON
file hold `wall_s`, `peak_rss_mb` (the largest child process) and `returncode`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=None, help="JSON file for the measurement.")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command.")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("no command given (put it after --)")
  start = time.perf_counter()
  returncode = subprocess.call(command)
  wall_s = time.perf_counter() - start
  # Linux reports ru_maxrss in KiB.
  peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
  result = {"command": command, "wall_s": wall_s, "peak_rss_mb": peak_rss_mb,
            "returncode": returncode}
  print(f"timed_run: {wall_s:.1f} s wall, peak RSS {peak_rss_mb:.0f} MiB, exit {returncode}",
        flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return returncode


if __name__ == "__main__":
  sys.exit(main())
