"""Arguments and output helpers every command shares."""

from __future__ import annotations

import argparse
import json
import math
import sys

__all__ = [
    "probability",
    "positive_int",
    "non_negative",
    "add_model_arg",
    "add_json_arg",
    "emit",
    "print_json",
    "dtype_arg",
    "options_given",
    "refuse_ignored_options",
    "refuse_output_at_model",
    "ARG_TYPES",
]


def _number(text: str, accept, give: str, refusal: str) -> float:
    """``float(text)`` if ``accept(value)``, else argparse's error (``refusal`` formatted with text)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {give}") from None
    if not accept(value):  # every accept() is False for nan
        raise argparse.ArgumentTypeError(refusal.format(text=text))
    return value


def probability(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    give = "a fraction strictly between 0 and 1"
    return _number(text, lambda v: 0.0 < v < 1.0, give, "{text} is outside (0, 1); give " + give)


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _number(text, lambda v: 0.0 <= v <= 1.0, "a value in [0, 1]", "{text} is outside [0, 1]")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a sampling temperature)."""
    give = "a finite number > 0"
    return _number(text, lambda v: v > 0 and math.isfinite(v), give, "{text} must be " + give)


def top_p_fraction(text: str) -> float:
    """argparse type: a number in (0, 1] (nucleus sampling's probability mass)."""
    return _number(text, lambda v: 0.0 < v <= 1.0, "a value in (0, 1]", "{text} is outside (0, 1]")


def non_negative(text: str) -> float:
    """argparse type: a number >= 0 (a loss weight)."""
    return _number(text, lambda v: v >= 0.0, "a number >= 0", "{text} is negative; give a number >= 0")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def seq_len_int(text: str) -> int:
    """argparse type of ``--seq-len``: an integer >= 2 (a window predicts its tokens after the first)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text} must be >= 2: a window needs a token to predict from")
    return value


# argparse types a dataclass field's metadata may name ("type": "positive_int"): the core
# dataclasses say what they accept without importing the command line
ARG_TYPES = {
    "probability": probability,
    "unit_interval": unit_interval,
    "positive_float": positive_float,
    "non_negative": non_negative,
    "positive_int": positive_int,
    "seq_len_int": seq_len_int,
}


def add_model_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument(
        "--model",
        required=default is None,
        default=default,
        help="model spec: smollm2-135m, random:<arch>, a .gguf file, a HF folder or hub id, or a skipgpt output folder",
    )


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")


def dtype_arg(text: str):
    import torch

    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if text not in table:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; accepted: {', '.join(table)}")
    return table[text]


def print_json(obj) -> None:
    print(json.dumps(obj, default=float), flush=True)


def emit(args, result: dict, human: str) -> None:
    """Print the human-readable text; with --json, the JSON object as the last line."""
    if human:
        print(human, file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print_json(result)


def options_given(args) -> set[str]:
    """The option dests the user set on the command line (``args.argv``), as opposed to those
    left at their defaults: the same parser (``args.build_parser``, set by ``cli.main``), every
    default suppressed, parses the same argv. Empty when ``args`` did not come from the command
    line."""
    argv, build_parser = getattr(args, "argv", None), getattr(args, "build_parser", None)
    if argv is None or build_parser is None:
        return set()
    parser = build_parser()
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        p._defaults.clear()  # set_defaults(...) values are not user input
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            else:
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def refuse_ignored_options(args, dests, why: str) -> None:
    """One-line error if the user gave any of ``dests`` (argparse dests) that this run ignores."""
    from ..errors import SkipGPTError

    given = sorted(options_given(args) & set(dests))
    if given:
        flags = ", ".join("--" + d.replace("_", "-") for d in given)
        raise SkipGPTError(f"{flags} would be ignored: {why}; drop {'it' if len(given) == 1 else 'them'}")


def refuse_output_at_model(args, why: str) -> None:
    """One-line error if ``--output`` names the ``--model`` folder itself."""
    from pathlib import Path

    from ..errors import SkipGPTError

    model = Path(args.model)
    if model.exists() and model.resolve() == Path(args.output).resolve():
        raise SkipGPTError(f"--output must differ from --model ({why})")
