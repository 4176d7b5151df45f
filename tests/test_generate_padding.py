"""A prompt generates the same text in a left-padded batch as alone (greedy), dense and routed.

Padding must change nothing for the real tokens: the routed model's padding mask
(``RoutingState.token_mask``, captured per forward by ``layer.real_token_hook``)
keeps padding out of the fast path's work, and the K/V a padded position writes are masked.
Checked for two families (llama, qwen2), with nothing skipped (θ = 0: must equal dense) and
with the routers' own decisions (θ = 0.5), on the fast and the masked execution, through the
same path ``skipgpt generate`` takes (left padding, the tokenizer's pad token).
"""

from __future__ import annotations

import pytest
import torch
from conftest import routed, tiny

PROMPTS = ["hi", "a much longer prompt about the rivers and bridges of an old city, told slowly", "ok then"]
NEW = 12


def generate(model, tok, prompts: list[str]) -> list[list[int]]:
    """Greedy continuations (token ids, up to and including an eos) of a left-padded batch."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    rows = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        if tok.eos_token_id in row:  # after eos a batch row is padding; alone it stops
            row = row[: row.index(tok.eos_token_id) + 1]
        rows.append(row)
    return rows


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "setting", ["dense", "routed θ=0 fast", "routed θ=0 masked", "routed θ=0.5 fast", "routed θ=0.5 masked"]
)
def test_every_prompt_of_a_padded_batch_generates_what_it_generates_alone(arch, setting):
    if setting == "dense":
        model, tok = tiny(arch)
        ctx = torch.no_grad()
    else:
        threshold = 0.0 if "θ=0 " in setting else 0.5
        model, tok = routed(arch, threshold=threshold)
        model.eval()
        ctx = model.routing(execution=setting.split()[-1])
    with ctx:
        batched = generate(model, tok, PROMPTS)
        alone = [generate(model, tok, [p])[0] for p in PROMPTS]
    assert batched == alone
    assert len({len(tok(p).input_ids) for p in PROMPTS}) == len(PROMPTS)  # the batch really is padded


def test_nothing_skipped_equals_the_dense_model_in_a_padded_batch():
    model, tok = routed("llama", threshold=0.0)
    model.eval()
    with model.routing(execution="fast"):
        fast = generate(model, tok, PROMPTS)
    with model.dense():
        dense = generate(model, tok, PROMPTS)
    assert fast == dense
