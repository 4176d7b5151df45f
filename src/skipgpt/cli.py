"""``skipgpt <command>``: one sub-command per job; each lives in ``skipgpt.commands``.

Bad input ends with ``error: <one line>`` on stderr and exit status 2. With ``--json`` a
command prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import SkipGPTError

__all__ = ["main", "COMMANDS", "OPTIONAL_DEPENDENCIES"]

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
    "serve-tune": "skipgpt.commands.serve_tune",
    "frontier": "skipgpt.commands.frontier",
}

# optional dependency (top-level import name) -> the extra of skipgpt that installs it; a command
# that needs one which is missing says so in one line, any other import error is a bug and raises
OPTIONAL_DEPENDENCIES = {"lm_eval": "eval", "matplotlib": "eval", "vllm": "serve", "openai": "serve"}


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="skipgpt", description="Dynamic, token-aware layer skipping (SkipGPT) that really saves compute."
    )
    parser.add_argument("--version", action="version", version=f"skipgpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    from .commands.common import show_defaults

    show_defaults(parser)
    _forbid_abbreviations(parser)
    return parser


def _forbid_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Options must be spelled in full: with argparse's prefix matching ``--sparsity 0.3`` would
    silently set ``--sparsity-weight`` and ``serve`` would take vLLM's options for its own.
    ``--sparsity`` is kept as a hidden alias of ``--target-sparsity`` (see ``add_hidden_alias``)."""
    from .commands.common import add_hidden_alias

    parser.allow_abbrev = False
    if "--target-sparsity" in parser._option_string_actions:
        add_hidden_alias(parser, "--target-sparsity", "--sparsity")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _forbid_abbreviations(command)


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser | None:
    """The sub-command parser ``argv`` names (``argv[0]``), or None."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and argv and argv[0] in action.choices:
            return action.choices[argv[0]]
    return None


def main(argv: list[str] | None = None) -> int:
    from .commands.common import apply_config_file

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = _command_parser(parser, argv)
    try:  # --config FILE: its values become the command's defaults, flags still win
        from_config = (
            apply_config_file(command, argv)
            if command is not None and "--config" in command._option_string_actions
            else set()
        )
    except SkipGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.argv = argv
    args.from_config = from_config
    args.build_parser = build_parser  # commands.common.options_given re-parses argv (no upward import)
    try:
        return args.func(args) or 0
    except SkipGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = OPTIONAL_DEPENDENCIES.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"error: skipgpt {args.command} needs the optional package '{e.name}'; "
            f"install it with: pip install 'skipgpt[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted; a run with checkpoints continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
