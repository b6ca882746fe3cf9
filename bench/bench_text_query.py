"""CPU time from process start to one text query embedding: open_clip vs ClipTextTower.

    OMP_NUM_THREADS=1 python bench/bench_text_query.py DIR [--runs 3]

DIR is a local-dir CLIP (e.g. cm3rt/assets/default/clip). Each run is a fresh interpreter
(imports are what is measured); prints the median CPU seconds (time.process_time, which
counts this process only, so other load on the machine matters less than for wall time)
of "import torch", "build encoder" and "encode one query", and the max abs difference of
the two embeddings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = """
import json, sys, time
t0 = time.process_time()
import torch
t1 = time.process_time()
from cm3rt.retrieval.clip import ClipEncoder
enc = (ClipEncoder.for_queries if sys.argv[2] == "fast" else ClipEncoder)("local-dir:" + sys.argv[1])
t2 = time.process_time()
q = enc.encode_query("a red circle on a blue square")
t3 = time.process_time()
heavy = [m for m in ("open_clip", "torchvision", "transformers") if m in sys.modules]
print(json.dumps({"torch": t1 - t0, "encoder": t2 - t1, "query": t3 - t2, "total": t3,
                  "heavy": heavy, "q": q.tolist()}))
"""


def run(folder: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), mode], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    results = {}
    for mode in ("open_clip", "fast"):
        rs = [run(a.folder.resolve(), mode) for _ in range(a.runs)]
        med = {k: statistics.median(r[k] for r in rs) for k in ("torch", "encoder", "query",
                                                                 "total")}
        results[mode] = rs[0]["q"]
        print(f"{mode:9s} CPU s (median of {a.runs}): import torch {med['torch']:.2f}  "
              f"encoder {med['encoder']:.2f}  query {med['query']:.3f}  total "
              f"{med['total']:.2f}  heavy modules {rs[0]['heavy']}")
    diff = max(abs(x - y) for x, y in zip(results["open_clip"], results["fast"]))
    print(f"max abs diff of the query embeddings: {diff:.2e}")


if __name__ == "__main__":
    main()
