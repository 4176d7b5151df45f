"""``skipgpt eval <what>``: one module per evaluation."""

from __future__ import annotations

import importlib

EVALUATIONS = {
    "ppl": "skipgpt.commands.eval_ppl",
    "zeroshot": "skipgpt.commands.eval_zeroshot",
}


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a dense or routed model")
    inner = p.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    for module in EVALUATIONS.values():  # their optional dependencies are imported when they run
        importlib.import_module(module).add_parser(inner)
