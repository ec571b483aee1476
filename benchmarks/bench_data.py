"""The data benchmarks of the hybrid data engine in one run (issue: bench_data).

1. ``bench_data_generation.py``: seconds to generate one anatomical subject with multi-echo simulation
   at 1 mm (full MNI grid) and at 2 mm.
2. ``bench_data_queue.py``: TorchIO queue throughput in 64^3 patches/s with 0 and 1 loader workers
   (volumes read from .nii.gz each pass, and cached in memory), and its ratio to the training-step rate
   of a small 3-D U-Net on the same patches (target >= 2).

Each part prints its own table; options are passed through, e.g.
``python benchmarks/bench_data.py --queue-args "--shape 96 --repeats 1"``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generation-args", default="", help="arguments for bench_data_generation.py")
    ap.add_argument("--queue-args", default="", help="arguments for bench_data_queue.py")
    a = ap.parse_args()
    rc = 0
    for script, extra in (("bench_data_generation.py", a.generation_args), ("bench_data_queue.py", a.queue_args)):
        print(f"== {script}", flush=True)
        rc |= subprocess.call([sys.executable, str(HERE / script), *shlex.split(extra)])
    return rc


if __name__ == "__main__":
    sys.exit(main())
