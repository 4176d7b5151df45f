"""``skipgpt export`` writes a folder that plain transformers loads routed (remote code), or dense.

The routed load runs in a subprocess where skipgpt cannot be imported (``-I`` and an import
blocker), so what routes the model is the code shipped in the folder, not the installed library.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_ids
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import check_imports, get_relative_import_files

from skipgpt import SkipGPTConfig, SkipGPTModel, get_skipgpt_model, load_model
from skipgpt.cli import main
from skipgpt.commands.export import export_model
from skipgpt.export import DENSE_WARNING, code_closure
from skipgpt.specs import load_base_model

VOCAB = 259  # random:llama's byte vocabulary

# Runs in a process without skipgpt: loads the folder with remote code, writes what it computed.
PLAIN_TRANSFORMERS = r"""
import json, sys
class _NoSkipgpt:
    def find_spec(self, name, path=None, target=None):
        if name == "skipgpt" or name.startswith("skipgpt."):
            raise ImportError("skipgpt is blocked in this process")
sys.meta_path.insert(0, _NoSkipgpt())
import torch
from transformers import AutoModelForCausalLM
folder, ids_file, out_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids).logits
stats = model.skipgpt_state.stats
sparsity = sum(stats.skipped.values()) / sum(stats.counted.values())
generated = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
try:
    model.save_pretrained(folder + "-copy")
    refused = False
except NotImplementedError:
    refused = True
torch.save({"logits": logits, "generated": generated}, out_file)
print(json.dumps({
    "sparsity": sparsity,
    "layer_module": type(model.model.layers[0]).__module__,
    "model_class": type(model).__name__,
    "execution": model.skipgpt_state.settings.execution,
    "threshold": model.skipgpt_state.settings.threshold,
    "skipgpt_modules": [m for m in sys.modules if m == "skipgpt" or m.startswith("skipgpt.")],
    "save_refused": refused,
}))
"""


FIXTURE_FOLDERS = Path(__file__).parent / "fixtures" / "folders"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A random:llama routed folder (routers that skip about half the decisions), exported."""
    root = tmp_path_factory.mktemp("export")
    base, _ = load_base_model("random:llama")
    config = SkipGPTConfig(router_init="paper", router_hidden=0, threshold=0.5)
    get_skipgpt_model(base, config, "random:llama").save_pretrained(root / "routers")
    export_model(str(root / "routers"), str(root / "out"))
    return root / "out"


def _export_substituted(root: Path) -> Path:
    """A random:llama routed folder whose skipped MLPs run closed-form-shaped substitutes
    (random, non-zero: zero ones would equal plain skipping) and whose routers RMS-normalise their
    input, exported."""
    base, _ = load_base_model("random:llama")
    config = SkipGPTConfig(
        router_init="paper", router_hidden=0, threshold=0.5, mlp_skip_to="adapter", router_norm="rms"
    )
    model = get_skipgpt_model(base, config, "random:llama")
    torch.manual_seed(5)
    with torch.no_grad():
        for layer in model.routed_layers:
            for p in layer.substitutes.parameters():
                p.normal_(0, 0.05)
    model.save_pretrained(root / "substituted")
    export_model(str(root / "substituted"), str(root / "substituted-out"))
    return root / "substituted-out"


def _export_fixture(name: str, root: Path, merge: bool) -> Path:
    """Export a copy of the 0.1.0 fixture folder ``name`` (``tests/fixtures/folders``)."""
    shutil.copytree(FIXTURE_FOLDERS / name, root / name)
    export_model(str(root / name), str(root / f"{name}-out"), merge=merge)
    return root / f"{name}-out"


def _skipgpt_reference(folder: Path, ids: torch.Tensor):
    model, _ = load_model(str(folder))
    assert isinstance(model, SkipGPTModel) and model.routing_settings.execution == "fast"
    model.reset_stats()
    with torch.no_grad():
        logits = model(ids).logits
    sparsity = model.sparsity_stats()["module"]
    generated = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    return logits, sparsity, generated


@pytest.mark.parametrize("source", ["routed", "llm_drop", "exported --merge", "substitutes"])
def test_plain_transformers_loads_the_export_routed_without_skipgpt(exported, tmp_path, source):
    """The folder's own code routes it (LLM-Drop's removed modules too; LoRA merged): same logits
    as skipgpt's routed model on the fast path, same sparsity, same greedy generation."""
    if source == "substitutes":
        exported = _export_substituted(tmp_path)
    elif source != "routed":
        exported = _export_fixture(source.split()[0], tmp_path, merge=source.endswith("--merge"))
    ids = random_ids(2, 24, VOCAB, seed=3)
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TRANSFORMERS)
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            str(script),
            str(exported),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    got = torch.load(tmp_path / "out.pt")

    assert seen["skipgpt_modules"] == []  # routed by the folder's own code
    assert seen["layer_module"].startswith("transformers_modules.") and seen["layer_module"].endswith(
        ".layer"
    )
    assert seen["model_class"] == "LlamaForCausalLM" and seen["execution"] == "fast"
    assert seen["save_refused"]
    ref_logits, ref_sparsity, ref_generated = _skipgpt_reference(exported, ids)
    assert seen["threshold"] == load_model(str(exported))[0].routing_settings.threshold
    assert 0.05 < ref_sparsity < 0.8  # the routers really skip
    torch.testing.assert_close(got["logits"], ref_logits, rtol=0, atol=1e-5)
    assert seen["sparsity"] == pytest.approx(ref_sparsity, abs=1e-12)
    assert torch.equal(got["generated"], ref_generated)


def test_without_remote_code_the_export_is_the_dense_stock_model_and_the_card_says_so(exported):
    ids = random_ids(2, 16, VOCAB, seed=4)
    dense = AutoModelForCausalLM.from_pretrained(exported)  # trust_remote_code not given
    assert type(dense.model.layers[0]).__name__ == "LlamaDecoderLayer"
    base, _ = load_base_model("random:llama")
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, base(ids).logits, rtol=0, atol=1e-6)
    card = (exported / "README.md").read_text()
    assert DENSE_WARNING in card and "trust_remote_code=True" in card


def test_the_shipped_code_is_its_own_import_closure(exported):
    shipped = {p.name for p in exported.glob("*.py")}
    assert shipped == {p.name for p in code_closure()}
    needed = get_relative_import_files(str(exported / "modeling_skipgpt.py"))  # what transformers copies
    assert {Path(f).name for f in needed} <= shipped
    for f in exported.glob("*.py"):
        check_imports(str(f))  # every absolute import is installed (torch, transformers, safetensors)
    # the routing core only: nothing that loads, trains or writes folders travels with it
    assert {"layer.py", "routing.py", "fast.py", "execution.py", "router.py"} <= shipped
    assert not shipped & {"model.py", "checkpoint.py", "specs.py", "outputs.py", "loading.py"}
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_skipgpt.SkipGPTForCausalLM"}
    assert config["skipgpt"]["router_config"]["threshold"] == 0.5


def test_skipgpt_loads_the_export_and_it_can_move(exported, tmp_path):
    ids = random_ids(1, 16, VOCAB, seed=5)
    ref, _, _ = _skipgpt_reference(exported, ids)
    moved = tmp_path / "moved"
    shutil.copytree(exported, moved)
    again, _, _ = _skipgpt_reference(moved, ids)
    assert torch.equal(again, ref)


def test_export_merge_without_adapter_is_refused_in_one_line(exported, tmp_path, capsys):
    source = exported.parent / "routers"
    rc = main(["export", "--model", str(source), "--output", str(tmp_path / "m"), "--merge"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "--merge needs a LoRA adapter" in lines[0], err
    assert not (tmp_path / "m").exists()


def test_export_does_not_need_save_pretrained_and_drops_a_gguf_quantization_config(tmp_path, monkeypatch):
    """A base loaded from GGUF cannot ``save_pretrained`` and its config says ``quant_method: gguf``;
    the export writes the (dequantised) weights itself and a config that loads them as they are."""
    from transformers import PreTrainedModel

    import skipgpt.specs

    def refuse(*args, **kwargs):
        raise ValueError("The model is quantized with gguf and is not serializable")

    def as_if_gguf(spec, *args, **kwargs):
        model, tok = load_base(spec, *args, **kwargs)
        model.config.quantization_config = {
            "quant_method": "gguf",
            "gguf_file": "x.gguf",
            "dequantize": False,
        }
        return model, tok

    load_base = skipgpt.specs.load_base_model
    base, _ = load_base("random:llama")
    get_skipgpt_model(base, SkipGPTConfig(router_init="paper"), "random:llama").save_pretrained(
        tmp_path / "r"
    )
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", refuse)
    monkeypatch.setattr(skipgpt.specs, "load_base_model", as_if_gguf)
    export_model(str(tmp_path / "r"), str(tmp_path / "out"))
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    monkeypatch.undo()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = random_ids(1, 8, VOCAB)
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, load_base("random:llama")[0](ids).logits)


def test_remote_code_refuses_an_unmerged_adapter_in_one_line(tmp_path):
    from transformers import AutoConfig

    from skipgpt.modeling_skipgpt import SkipGPTForCausalLM

    out = _export_fixture("routed_lora", tmp_path, merge=False)
    assert (out / "adapter").is_dir()
    with pytest.raises(ValueError, match="export it with `skipgpt export --merge`"):
        SkipGPTForCausalLM.from_pretrained(out, config=AutoConfig.from_pretrained(out))
    assert "unmerged LoRA adapter" in (out / "README.md").read_text()


def test_export_writes_the_base_weights_in_the_dtype_asked_and_routers_in_float32(exported, tmp_path):
    """``export --dtype bfloat16``: a bf16 model.safetensors, float32 routers; it loads and routes."""
    from safetensors import safe_open

    source = exported.parent / "routers"
    assert (
        main(["export", "--model", str(source), "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
        == 0
    )
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    with safe_open(str(tmp_path / "bf16" / "routers.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    model, _ = load_model(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(random_ids(1, 12, VOCAB)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    with pytest.raises(SystemExit) as refused:  # argparse: the accepted dtypes, exit code 2
        main(["export", "--model", str(source), "--output", str(tmp_path / "x"), "--dtype", "int8"])
    assert refused.value.code == 2 and not (tmp_path / "x").exists()
