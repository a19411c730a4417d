"""Run `dvc repro` and print the wall time of every stage it ran.

Usage: python tools/timed_repro.py [dvc repro arguments...]

DVC prints "Running stage 'NAME':" when a stage starts; a stage ends when the next one starts or the
command exits. The output is passed through unchanged, each stage's wall time is printed as it finishes,
and at the end a table of stage wall times (also written to .refinery/stage_times.json, git-ignored) and
where the results are. The exit code is dvc's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

STAGE_START = re.compile(r"^Running stage '([^']+)'")


def main(argv: list[str]) -> int:
    started = time.monotonic()
    times: dict[str, float] = {}
    current: tuple[str, float] | None = None
    proc = subprocess.Popen(
        ["dvc", "repro", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        match = STAGE_START.match(line)
        if match:
            now = time.monotonic()
            if current is not None:
                times[current[0]] = now - current[1]
                print(f"timed_repro: {current[0]} finished in {_fmt(times[current[0]])} "
                      f"(total {_fmt(now - started)})", flush=True)
            current = (match.group(1), now)
    code = proc.wait()
    end = time.monotonic()
    if current is not None:
        times[current[0]] = end - current[1]
    total = end - started
    width = max([len(name) for name in times] + [5])
    print(f"\n{'stage':<{width}}  wall", file=sys.stderr)
    for name, seconds in times.items():
        print(f"{name:<{width}}  {_fmt(seconds)}", file=sys.stderr)
    print(f"{'total':<{width}}  {_fmt(total)}  (dvc exit {code})", file=sys.stderr)
    out = Path(".refinery/stage_times.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stages_s": times, "total_s": total, "exit_code": code}, indent=2) + "\n")
    results = [("report", "reports/report.md"), ("review page", "reports/review/index.html"),
               ("Data Docs", "reports/data_docs/index.html"), ("audit", "reports/audit/<arm>.json"),
               ("datasets", "data/06_datasets"), ("metrics", "metrics"), ("stage times", str(out))]
    print("\nresults:", file=sys.stderr)
    for what, path in results:
        if Path(path).exists():
            print(f"  {what:<12} {path}", file=sys.stderr)
    return code


def _fmt(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes:d}m{secs:02d}s"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
