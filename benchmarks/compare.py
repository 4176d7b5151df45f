"""The baselines table: SkipGPT-RT vs ShortGPT, LLM-Drop and MoD-D on SmolLM2-135M at one budget.

A thin wrapper over ``skipgpt compare`` with the settings the README table uses; any option given
here overrides the default (argparse keeps the last value), e.g. ``--sparsity 0.4``.

    python benchmarks/compare.py --out runs/compare-0.25            # ~1.5-2 h on 2 CPU cores
    python benchmarks/compare.py --out runs/smoke --model random:llama --max-steps 2 --max-windows 2
"""

from __future__ import annotations

import sys

from skipgpt.cli import main

DEFAULTS = [
    "--model", "smollm2-135m",
    "--sparsity", "0.25",
    "--dataset", "calib", "--seq-len", "256", "--batch-size", "8", "--max-steps", "300",
    "--eval-datasets", "wiki-heldout,ptb", "--eval-seq-len", "1024", "--max-windows", "32",
    "--speed-tokens", "1024", "--speed-repeats", "5",
]  # fmt: skip

if __name__ == "__main__":
    sys.exit(main(["compare", *DEFAULTS, *sys.argv[1:]]))
