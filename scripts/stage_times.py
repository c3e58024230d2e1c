"""Wall time of each DVC stage, from a timestamped `dvc repro` log, as a markdown table.

    dvc repro 2>&1 | while IFS= read -r l; do echo "$(date +%s) $l"; done > repro.log
    python scripts/stage_times.py repro.log > stage_times.md

A stage's time runs from its "Running stage" line to the next stage's (or the end of the log).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def stage_times(lines: list[str]) -> list[tuple[str, int]]:
    events = []
    for line in lines:
        stamp, _, text = line.partition(" ")
        if stamp.isdigit():
            events.append((int(stamp), text))
    times, current = [], None
    for stamp, text in events:
        match = re.match(r"Running stage '([^']+)'", text)
        if match or text.startswith("real"):
            if current is not None:
                times.append((current[0], stamp - current[1]))
            current = (match.group(1), stamp) if match else None
    if current is not None and events:
        times.append((current[0], events[-1][0] - current[1]))
    return times


def main() -> None:
    times = stage_times(Path(sys.argv[1]).read_text().splitlines())
    print("| stage | wall time (s) |\n|:--|--:|")
    for stage, seconds in times:
        print(f"| `{stage}` | {seconds} |")
    print(f"| **total** | **{sum(s for _, s in times)}** |")


if __name__ == "__main__":
    main()
