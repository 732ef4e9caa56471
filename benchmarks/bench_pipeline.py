"""The pipeline benchmark (issue 7): same as ``cspine-submit bench``; arguments are passed through.

    python benchmarks/bench_pipeline.py --studies 3 --size 512 --slices 300
"""

import sys

from cspine_submit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
