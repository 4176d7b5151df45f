"""``skipgpt <command>``: one sub-command per job; each lives in ``skipgpt.commands``.

Bad input ends with ``error: <one line>`` on stderr and exit status 2. With ``--json`` a
command prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import SkipGPTError

__all__ = ["main", "COMMANDS"]

# name -> module exposing add_parser(subparsers); heavy imports stay inside each command's run().
COMMANDS = {
    "train-router": "skipgpt.commands.train_router",
    "eval": "skipgpt.commands.evaluate",
    "generate": "skipgpt.commands.generate",
    "bench": "skipgpt.commands.bench",
    "calibrate": "skipgpt.commands.calibrate",
    "demo": "skipgpt.commands.demo",
    "finetune-lora": "skipgpt.commands.finetune_lora",
    "export": "skipgpt.commands.export",
    "baseline": "skipgpt.commands.baseline",
    "compare": "skipgpt.commands.compare",
    "analyze": "skipgpt.commands.analyze",
    "serve": "skipgpt.commands.serve",
    "frontier": "skipgpt.commands.frontier",
}


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="skipgpt", description="Dynamic, token-aware layer skipping (SkipGPT) that really saves compute."
    )
    parser.add_argument("--version", action="version", version=f"skipgpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as e:  # TODO(lead): drop once every command module exists
            if e.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args) or 0
    except SkipGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a run with checkpoints continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
