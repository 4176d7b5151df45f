"""Arguments and output helpers every command shares."""

from __future__ import annotations

import argparse
import json
import math
import re
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
    "DTYPES",
    "device_arg",
    "add_device_args",
    "available_devices",
    "resolve_device",
    "load_options",
    "add_hidden_alias",
    "warn_if_beyond_positions",
    "add_config_arg",
    "show_defaults",
    "apply_config_file",
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


# --dtype names -> torch dtype names (float32 stays the default: what every command loaded before)
DTYPES = ("float32", "bfloat16", "float16")
_DEVICE_FORMS = "auto, cpu, cuda, cuda:N, mps"


def device_arg(text: str) -> str:
    """argparse type of ``--device``: auto, cpu, cuda, cuda:N or mps (availability is checked at
    load time by ``resolve_device``)."""
    name = text.strip().lower()
    if name in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", name):
        return name
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; accepted: {_DEVICE_FORMS}")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, the same on every command that loads a model."""
    g = p.add_argument_group("device and precision")
    g.add_argument(
        "--device",
        type=device_arg,
        default="cpu",
        help="where the model is loaded: cpu, cuda, cuda:N, mps, or auto (every visible GPU, a model "
        "larger than one GPU split layer by layer with each router beside its layer; else mps; else cpu); "
        "training commands then run where accelerate puts the model (default: %(default)s)",
    )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="precision of the base model's weights; routers stay float32 (default: %(default)s)",
    )


def available_devices() -> list[str]:
    """The devices ``--device`` can name on this machine, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    import torch

    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(name: str) -> str:
    """``--device`` -> a ``device_map`` for ``from_pretrained``: ``"cpu"``, ``"cuda:N"``, ``"mps"`` or
    ``"auto"`` (several GPUs). One-line ``SkipGPTError`` naming what is available when ``name`` is not."""
    import torch

    from ..errors import SkipGPTError

    name = device_arg(name)
    here = available_devices()
    if name == "auto":
        return "auto" if torch.cuda.is_available() else ("mps" if "mps" in here else "cpu")
    device = "cuda:0" if name == "cuda" else name
    if device not in here:
        raise SkipGPTError(f"--device {name}: not available on this machine; available: {', '.join(here)}")
    return device


def load_options(args) -> dict:
    """``dtype`` and ``device_map`` for ``load_model`` / ``load_base_model`` from ``--dtype`` and
    ``--device`` (a namespace without them: float32 on the CPU, as before these options)."""
    import torch

    return {
        "dtype": getattr(torch, getattr(args, "dtype", None) or "float32"),
        "device_map": resolve_device(getattr(args, "device", None) or "cpu"),
    }


def warn_if_beyond_positions(model, seq_len: int, flag: str = "--seq-len") -> bool:
    """Warn (one line on stderr) when ``seq_len`` exceeds the model's ``max_position_embeddings``."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is None or seq_len <= limit:
        return False
    print(
        f"warning: {flag} {seq_len} exceeds the model's {limit} positions; "
        "windows beyond them give meaningless results",
        file=sys.stderr,
        flush=True,
    )
    return True


def add_hidden_alias(p: argparse.ArgumentParser, new: str, *old: str) -> None:
    """Accept the ``old`` option strings for the option ``new`` without listing them in ``--help``
    (renamed options keep their old names for one release)."""
    action = p._option_string_actions[new]
    for name in old:
        p._option_string_actions[name] = action


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """``--config FILE``: a YAML or JSON mapping of option values used as defaults (flags win)."""
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML or JSON file of option values (keys: option names, dashes or underscores) used as "
        "defaults; flags given on the command line win",
    )


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """If ``argv`` names ``--config FILE``, set its values as ``parser``'s defaults (unknown keys:
    one-line ``SkipGPTError`` naming the accepted ones) and return their dests (``options_given``
    counts them as given, so a ``--recipe`` does not replace them). ``parser``: the sub-command's."""
    from ..errors import SkipGPTError

    path = None
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
    if path is None:
        return set()
    values = read_config_file(path)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = sorted(k for k in values if k.replace("-", "_") not in actions)
    if unknown:
        raise SkipGPTError(
            f"--config {path}: unknown option(s) {', '.join(unknown)}; accepted: "
            + ", ".join(sorted(d.replace("_", "-") for d in actions))
        )
    defaults = {}
    for key, value in values.items():
        action = actions[key.replace("-", "_")]
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)  # lists are given comma-separated
        if action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise SkipGPTError(f"--config {path}: {key}: {e}") from None
        if action.choices is not None and value not in action.choices:
            raise SkipGPTError(
                f"--config {path}: {key}={value!r}; accepted: {', '.join(map(str, action.choices))}"
            )
        action.required = False  # given by the file
        defaults[action.dest] = value
    parser.set_defaults(**defaults)
    return set(defaults)


def read_config_file(path: str) -> dict:
    """The mapping in a ``.json``, ``.yaml`` or ``.yml`` file (one-line ``SkipGPTError`` otherwise)."""
    import json
    from pathlib import Path

    from ..errors import SkipGPTError

    file = Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        raise SkipGPTError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    if file.suffix.lower() in (".yaml", ".yml"):
        import yaml

        parse, kind, errors = yaml.safe_load, "YAML", (yaml.YAMLError,)
    else:
        parse, kind, errors = json.loads, "JSON", (ValueError,)
    try:
        values = parse(text)
    except errors as e:
        raise SkipGPTError(f"--config {path}: not valid {kind} ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise SkipGPTError(f"--config {path}: give a mapping of option names to values")
    return values


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: ...)`` to the help of every option of ``parser`` and its sub-parsers that
    has a default (not None, not a switch's False) and does not state it already."""
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
                continue
            default, text = action.default, action.help
            if text in (None, argparse.SUPPRESS) or "(default" in text:
                continue
            if (
                default is None
                or default is False
                or default is argparse.SUPPRESS
                or not action.option_strings
            ):
                continue
            action.help = text + " (default: %(default)s)"


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
    from_config = set(getattr(args, "from_config", ()))  # --config FILE values count as given
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
    return (set(vars(parser.parse_args(argv))) | from_config) - {"command"}


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
