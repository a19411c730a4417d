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
    print("\nresults:", file=sys.stderr)
    for what, path in [*_results(), ("stage times", str(out))]:
        if Path(path).parent.exists() if path.endswith("<arm>.json") else Path(path).exists():
            print(f"  {what:<12} {path}", file=sys.stderr)
    return code


def _results() -> list[tuple[str, str]]:
    """Where the results are: each read from the cmd of the stage that writes it in dvc.yaml."""
    from refinery.core import dag
    from refinery.core.errors import RefineryError

    found = []
    for what, stage, flag, name in (("report", "report", "--out", ""), ("review page", "review", "--out", "index.html"),
                                    ("Data Docs", "validate", "--data-docs", "index.html"),
                                    ("audit", "validate", "--audit", "<arm>.json"),
                                    ("datasets", "assemble", "--out", ""), ("metrics", "report", "--metrics-dir", "")):
        try:
            path = dag.option(stage, flag)
        except RefineryError as e:
            print(f"timed_repro: {what}: {e}", file=sys.stderr)
            continue
        found.append((what, f"{path}/{name}" if name else path))
    return found


def _fmt(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes:d}m{secs:02d}s"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
