"""Peak memory and throughput of `scalevec data prepare` on corpora made by repeating the bundled prose.

    .venv/bin/python benchmarks/data_prepare.py memory --sizes-gb 0.5,2.1    # 0.526 and 2.104 GB: 4x apart
    .venv/bin/python benchmarks/data_prepare.py throughput --size-gb 0.5 --workers 1,2

Each run is `scalevec data prepare --input big.jsonl --tokenizer tokenizer.json` (the 8,192-id tokenizer of the
bundled prose, as in the issue) in a child process; peak memory is sampled every 50 ms over the child and its
tokenizer workers (the sum of their resident sets, which counts shared pages once per process; the sum of their
proportional sets, which counts them once; the largest resident set; and the preparing process's own, without its
workers) and also read from wait4 (the largest single process). Inputs and outputs go under --tmp and are deleted
afterwards; each result is one JSON line.
"""

import argparse
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from scalevec.config import PROSE_SOURCES
from scalevec.data.sources import CORPUS_DIR

SCALEVEC = [sys.executable, "-m", "scalevec"]


def make_input(path: Path, size_gb: float) -> int:
    """A JSONL file of at least size_gb, the bundled prose documents repeated in order."""
    lines = []
    for name in PROSE_SOURCES:
        with lzma.open(CORPUS_DIR / f"{name}.jsonl.xz", "rt", encoding="utf-8") as fh:
            lines += [line if line.endswith("\n") else line + "\n" for line in fh]
    block = "".join(lines).encode()
    with open(path, "wb") as fh:
        while fh.tell() < size_gb * 1e9:
            fh.write(block)
    return path.stat().st_size


def run(args: list[str]) -> dict:
    """Run a preparation; its wall time, peak memory and the tokenization rate it reports."""
    started = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process, tree_peak, tree_pss, largest, parent = psutil.Process(child.pid), 0, 0, 0, 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # this child's own rusage, not earlier runs'
        if pid:
            break
        try:
            memory = [p.memory_full_info() for p in [process, *process.children(recursive=True)]]
        except psutil.NoSuchProcess:
            continue
        tree_peak, largest = max(tree_peak, sum(m.rss for m in memory)), max(largest, *(m.rss for m in memory))
        tree_pss, parent = max(tree_pss, sum(m.pss for m in memory)), max(parent, memory[0].rss)
        time.sleep(0.05)
    output = child.stdout.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"preparation failed:\n{output}")
    rate = re.search(r"tokenized ([\d.]+) MB/s", output)
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_tree_mb": round(tree_peak / 2**20),
            "peak_pss_tree_mb": round(tree_pss / 2**20),
            "peak_rss_largest_mb": round(largest / 2**20), "peak_rss_parent_mb": round(parent / 2**20),
            "ru_maxrss_mb": round(usage.ru_maxrss / 1024),
            "tokenize_mb_per_s": float(rate[1]) if rate else None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("memory", "throughput"))
    parser.add_argument("--sizes-gb", default="0.5,2", help="memory: input sizes")
    parser.add_argument("--size-gb", type=float, default=0.5, help="throughput: input size")
    parser.add_argument("--workers", default="1,2", help="throughput: worker counts (memory uses the last)")
    parser.add_argument("--tmp", default="/tmp/scalevec-data-bench")
    args = parser.parse_args()
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    workers = [int(w) for w in args.workers.split(",")]
    try:
        # in a child, so this process stays small: a child's peak counts what it inherits at the fork
        subprocess.run([*SCALEVEC, "data", "prepare", "--out", str(tmp / "bundled")], check=True,
                       stdout=subprocess.DEVNULL)
        tokenizer = tmp / "bundled" / "tokenizer.json"
        sizes = [float(s) for s in args.sizes_gb.split(",")] if args.what == "memory" else [args.size_gb]
        for size in sizes:
            source = tmp / f"prose-{size}gb.jsonl"
            input_bytes = make_input(source, size)
            for count in (workers[-1:] if args.what == "memory" else workers):
                out = tmp / "out"
                result = run([*SCALEVEC, "data", "prepare", "--input", str(source), "--tokenizer", str(tokenizer),
                              "--out", str(out), "--workers", str(count), "--overwrite"])
                shutil.rmtree(out)
                print(json.dumps({"what": args.what, "input_gb": round(input_bytes / 1e9, 3), "workers": count,
                                  "overall_mb_per_s": round(input_bytes / 1e6 / result["seconds"], 2), **result,
                                  "load_avg_1m": round(psutil.getloadavg()[0], 2)}), flush=True)
            source.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
