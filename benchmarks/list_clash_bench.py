"""What the shared-caption check of ``vision-server caption`` costs on a long path list.

Writes a list of N image paths (the files need not exist: only names are read) spread over
folders of 1000, with a few clashing pairs, then runs the check the reader runs before the
first list entry is captioned (:func:`vision_server.bulk.listed_clashes.find_clashes`). Prints
the time, then (in a second, traced run) the peak memory Python and numpy allocated for it
(tracemalloc) and bytes per line.

    python benchmarks/list_clash_bench.py --lines 1000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

from vision_server.bulk.listed_clashes import find_clashes
from vision_server.bulk.readers import ReadOptions, _listed_paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--clashes", type=int, default=10, help="pairs a.jpg + a.png in the list")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp, "list.txt")
        with listing.open("w", encoding="utf-8") as handle:
            for n in range(args.lines - args.clashes):
                handle.write(f"/datasets/part{n // 1000:05d}/image_{n:09d}.jpg\n")
            for n in range(args.clashes):
                handle.write(f"/datasets/part{n // 1000:05d}/image_{n:09d}.png\n")
        start = time.perf_counter()
        found = find_clashes(lambda: _listed_paths([listing], ReadOptions()))
        seconds = time.perf_counter() - start
        tracemalloc.start()  # a second run for memory: tracing slows Python down several times
        find_clashes(lambda: _listed_paths([listing], ReadOptions()))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    clashing = len(found)
    result = {
        "lines": args.lines,
        "seconds": round(seconds, 2),
        "peak_mib": round(peak / 2**20, 1),
        "bytes_per_line": round(peak / args.lines, 1),
        "clashing_places": clashing,
    }
    print(
        f"{args.lines} lines: {seconds:.2f} s, peak {peak / 2**20:.1f} MiB "
        f"({peak / args.lines:.1f} B/line), {clashing} clashing places"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
