"""`python -m bench`: every benchmark against the peers in one run (bench/run_all.py)."""

import sys

from bench.run_all import main

if __name__ == "__main__":  # vLLM starts processes that re-import the main module
    sys.exit(main())
