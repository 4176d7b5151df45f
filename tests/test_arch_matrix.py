"""The architecture matrix: every supported family, wrapped, trained, fast == reference, saved/loaded.

Each cell is a plain function ``check_<name>(arch) -> note`` on the tiny ``random:<arch>``
model; pytest runs every (architecture, check) pair, and

    python tests/test_arch_matrix.py --table

runs the same checks and prints the markdown table (architecture × check, with the attention
path the fast execution takes for that family) and a summary line. A family whose attention the
fast kernel does not implement (Gemma 2's logit soft-capping) runs the reference attention
instead: still equal to the reference, but skipping its attention saves nothing, so its
``fast==ref`` cell says "fallback", not ✓, and the summary names it.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # conftest helpers, also when run as a script
from conftest import ARCHS, random_ids, routed, tiny  # noqa: E402

from skipgpt import SkipGPTConfig, get_skipgpt_model  # noqa: E402
from skipgpt.adapters import model_cache_argument  # noqa: E402
from skipgpt.model import SkipGPTModel  # noqa: E402

# Every family the adapters support; a missing RANDOM_CONFIGS entry fails its row.
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2"]
MATRIX_ARCHS = FAMILIES + [a for a in ARCHS if a not in FAMILIES]
ATOL = 1e-5  # fp32
# The attention path each family's fast execution takes ("kernel" unless listed): a family that
# starts falling back, or stops, fails its fast==ref cell instead of passing silently.
EXPECTED_FALLBACK = {"gemma2": "attention logit softcapping"}


def expected_attention(arch: str) -> str:
    return f"fallback: {EXPECTED_FALLBACK[arch]}" if arch in EXPECTED_FALLBACK else "kernel"


def _random_routers(arch: str) -> SkipGPTModel:
    """A routed tiny model whose routers make real, mixed decisions (paper init, no execute bias)."""
    torch.manual_seed(0)
    model, _ = routed(arch, router_init="paper", execute_bias=0.0)
    return model


def _override(rate: float = 0.4, seed: int = 0):
    """Reproducible random routing: each (layer, module) skips ~``rate`` of the tokens."""

    def override(layer: int, module: str, hidden: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1000 + layer * 2 + (module == "mlp"))
        return torch.rand(hidden.shape[:2], generator=g) >= rate

    return override


def _vocab(model) -> int:
    return model.config.get_text_config(decoder=True).vocab_size


# -- the checks ------------------------------------------------------------------------------------
def check_wrap(arch: str) -> str:
    """Routers on every layer; dense routing reproduces the base model exactly; unwrap restores it."""
    base, _ = tiny(arch)
    ids = random_ids(2, 16, _vocab(base))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_skipgpt_model(base, SkipGPTConfig(), base_spec=f"random:{arch}")
    n_layers = model.state.num_layers
    assert len(model.router_state_dict()) > 0
    assert {k.split(".")[1] for k in model.router_state_dict()} == {str(i) for i in range(n_layers)}
    with torch.no_grad(), model.dense():
        assert torch.equal(model(input_ids=ids).logits, expected)
    with torch.no_grad():  # dense-init routers execute every token at θ = 0.5
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=ATOL)
    plain = model.unwrap()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, expected)
    return f"{n_layers} layers, {model.adapter.layers_path}"


def check_train(arch: str) -> str:
    """A few stage-1 steps: only routers get gradients, losses finite, routers move, base frozen."""
    from skipgpt.train.loop import LoopArgs
    from skipgpt.train.router_tuning import RouterTuningArgs, train_routers

    model = _random_routers(arch)
    model.mark_only_routers_trainable()
    model.train()
    ids = random_ids(2, 16, _vocab(model), seed=1)
    loss = model(input_ids=ids, labels=ids).loss + 20 * (model.realised_sparsity() - 0.25).abs()
    loss.backward()
    for name, p in model.hf_model.named_parameters():
        is_router = ".routers." in name
        assert p.requires_grad == is_router, name
        if is_router:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in model.router_parameters())
    model.zero_grad(set_to_none=True)

    frozen = {k: v.clone() for k, v in model.hf_model.state_dict().items() if ".routers." not in k}
    before = {k: v.detach().clone() for k, v in model.router_state_dict().items()}
    blocks = random_ids(8, 16, _vocab(model), seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_routers(
            model,
            blocks,
            Path(tmp) / "out",
            LoopArgs(max_steps=3, batch_size=2, lr=1e-2, save_every=3),
            RouterTuningArgs(calibrate_blocks=0),
            progress=False,
        )
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    after = model.router_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "routers did not move"
    now = model.hf_model.state_dict()
    assert all(torch.equal(frozen[k], now[k]) for k in frozen), "a base weight changed"
    return f"loss {losses[0]:.3f} → {losses[-1]:.3f}"


def attention_path(model: SkipGPTModel, ids: torch.Tensor) -> str:
    """'kernel' if the fast execution really skips attention for this model, else 'fallback: why'."""
    from skipgpt.fast import fast_attention_supported

    layer = model.routed_layers[0]
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad(), model.dense():
            model(input_ids=ids)
    finally:
        hook.remove()
    reason = fast_attention_supported(layer, **seen)
    return "kernel" if reason is None else f"fallback: {reason}"


def check_fast_equals_reference(arch: str) -> str:
    """Random routing: fast and masked execution give the same logits (prefill, then cached decode)."""
    import warnings

    model = _random_routers(arch).eval()
    ids = random_ids(2, 24, _vocab(model), seed=3)
    path = attention_path(model, ids)
    logits = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="skipgpt fast path")
        for execution in ("masked", "fast"):
            with torch.no_grad(), model.routing(override=_override(), execution=execution):
                out = model(input_ids=ids[:, :20], use_cache=True)
                steps = [out.logits]
                cache = out.past_key_values
                for t in range(20, 24):  # decode one token at a time through the cache
                    kv = {model_cache_argument(model): cache}  # `cache` since transformers 5.24
                    out = model(input_ids=ids[:, t : t + 1], **kv, use_cache=True)
                    cache = out.past_key_values
                    steps.append(out.logits)
            logits[execution] = torch.cat(steps, dim=1)
    diff = (logits["fast"] - logits["masked"]).abs().max().item()
    assert diff <= ATOL, f"fast vs reference max |Δlogit| = {diff:.2e}"
    with torch.no_grad(), model.routing(override=_override()), model.dense():
        dense = model(input_ids=ids).logits
    assert (dense - logits["masked"]).abs().max() > 1e-3, "the override skipped nothing"
    return f"max |Δ| {diff:.1e}; attention {path}"


def check_save_load(arch: str) -> str:
    """save_pretrained → from_pretrained (base rebuilt from its spec): identical routers and logits."""
    model = _random_routers(arch).eval()
    ids = random_ids(2, 16, _vocab(model), seed=4)
    model.reset_stats()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    sparsity = model.sparsity_stats()["module"]
    assert 0 < sparsity < 1, "routing should be mixed for this check to mean something"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = SkipGPTModel.from_pretrained(tmp).eval()
    saved, got = model.router_state_dict(), loaded.router_state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    return f"module sparsity {sparsity:.2f}"


CHECKS = {
    "wrap": check_wrap,
    "train": check_train,
    "fast==ref": check_fast_equals_reference,
    "save/load": check_save_load,
}


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_matrix(arch: str, check: str):
    note = CHECKS[check](arch)
    if check == "fast==ref":
        assert note.endswith(f"attention {expected_attention(arch)}"), note


def test_a_fallback_family_is_reported_as_fallback_not_as_a_pass(monkeypatch):
    """Gemma 2 (soft-capped attention logits): the fast path says why it falls back, warns once,
    and the matrix table labels its fast==ref cell "fallback" (no ✓) and names it in the summary."""
    import warnings

    from skipgpt import fast
    from skipgpt.fast import fast_attention_supported

    model = _random_routers("gemma2").eval()
    assert model.hf_model.config.attn_logit_softcapping is not None
    ids = random_ids(2, 12, _vocab(model), seed=3)
    assert attention_path(model, ids) == "fallback: attention logit softcapping"
    layer = model.routed_layers[0]
    kwargs = {"position_embeddings": (torch.ones(1, 12, layer.part("attn").head_dim),) * 2}
    assert fast_attention_supported(layer, **kwargs) == "attention logit softcapping"
    monkeypatch.setattr(fast, "_warned", set())
    with pytest.warns(UserWarning, match="skipgpt fast path: attention logit softcapping"):
        with torch.no_grad(), model.routing(override=_override(), execution="fast"):
            model(input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel families run without the fallback warning
        kernel = _random_routers("llama").eval()
        assert attention_path(kernel, ids) == "kernel"
        with torch.no_grad(), kernel.routing(override=_override(), execution="fast"):
            kernel(input_ids=ids)

    table, ok = matrix_table(["gemma2", "llama"])
    assert ok  # a fallback is correct (equal to the reference): not a failure ...
    lines = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0]]
    rows = {
        cells[0].strip(): dict(zip(header, (c.strip() for c in cells), strict=True)) for cells in lines[1:]
    }
    gemma2, llama = rows["gemma2"], rows["llama"]
    assert gemma2["fast==ref"] == "fallback" and "✓" not in gemma2["fast==ref"]  # ... but not a pass
    assert gemma2["fast attention"] == "fallback: attention logit softcapping"
    assert llama["fast==ref"] == "✓" and llama["fast attention"] == "kernel"
    assert table.splitlines()[-1] == (
        "Fast attention kernel: 1 of 2 families; fallback (reference attention, correct but skipped "
        "attention saves no time): gemma2 (attention logit softcapping)."
    )


def test_multimodal_gemma3_wraps_its_language_model():
    """Gemma 3 ≥ 4B loads as Gemma3ForConditionalGeneration: the decoder is model.language_model."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    text.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=28, patch_size=14)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision)).eval()
    assert base.config.model_type == "gemma3"
    ids = random_ids(1, 12, 256)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_skipgpt_model(base, SkipGPTConfig(router_init="paper", execute_bias=0.0))
    assert model.state.num_layers == 2
    with torch.no_grad(), model.dense():
        assert torch.equal(model(input_ids=ids).logits, expected)
    model.reset_stats()
    with torch.no_grad():
        model(input_ids=ids)
    assert 0 < model.sparsity_stats()["module"] < 1


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_gemma_attention_on_the_fast_kernel(arch: str, monkeypatch):
    """Gemma 3 attention is the Llama recipe with per-head q/k norms: registered, it takes the
    real kernel and still matches the reference. Gemma 2 soft-caps its attention logits, which the
    kernel does not do: even registered, it must fall back (and still match)."""
    from skipgpt import fast

    parts = (
        fast.AttentionParts(q_norm="q_norm", k_norm="k_norm") if arch == "gemma3" else fast.AttentionParts()
    )
    monkeypatch.setitem(fast.ATTENTION_PARTS, f"{arch.capitalize()}Attention", parts)
    note = check_fast_equals_reference(arch)
    expected = "kernel" if arch == "gemma3" else "fallback: attention logit softcapping"
    assert note.endswith(f"attention {expected}"), note


# -- the table -------------------------------------------------------------------------------------
def matrix_table(archs: list[str] | None = None) -> tuple[str, bool]:
    """Run every check; return (markdown table and a summary line, all passed).

    ``fast==ref`` is ✓ only when the fast kernel ran the attention; a family that falls back to the
    reference attention (equal logits, no saving) reads "fallback" there, its reason in the
    "fast attention" column and its name in the summary. A fallback is not a failure."""
    import warnings

    rows, ok = [], True
    for arch in archs or MATRIX_ARCHS:
        row = {"architecture": arch}
        for name, fn in CHECKS.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    note = fn(arch)
                row[name] = "✓"
                if name == "fast==ref":
                    row["fast attention"] = note.split("attention ", 1)[1]
                    if row["fast attention"] != "kernel":
                        row[name] = "fallback"
            except Exception as e:  # a table cell, not a crash: show what failed
                ok = False
                row[name] = f"✗ {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        row.setdefault("fast attention", "?")
        rows.append(row)
    from skipgpt.eval.tables import markdown_table

    columns = [(c, c) for c in ("architecture", *CHECKS, "fast attention")]
    kernel = [r["architecture"] for r in rows if r["fast attention"] == "kernel"]
    fallback = [
        f"{r['architecture']} ({r['fast attention'].removeprefix('fallback: ')})"
        for r in rows
        if r["fast attention"].startswith("fallback")
    ]
    summary = f"Fast attention kernel: {len(kernel)} of {len(rows)} families"
    if fallback:
        summary += (
            "; fallback (reference attention, correct but skipped attention saves no time): "
            + ", ".join(fallback)
        )
    return markdown_table(rows, columns) + "\n\n" + summary + ".", ok


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the markdown matrix")
    parser.add_argument("--arch", action="append", help="only these architectures (repeatable)")
    cli = parser.parse_args()
    if not cli.table:
        sys.exit(pytest.main([__file__, "-q"]))
    table, passed = matrix_table(cli.arch)
    print(table)
    sys.exit(0 if passed else 1)
