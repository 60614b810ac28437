"""pytest plugin for the Python examples of README.md and docs/ (scripts/test.sh:
`pytest -p doc_plugin --codeblocks README.md docs tests/docs`, tests/docs on PYTHONPATH).

pytest-codeblocks (PyPI) collects and runs each ```python fence; this plugin
- leaves the ```sh fences to tests/docs/test_doc_blocks.py (which runs them with stand-ins);
- runs every Python example in a fresh temporary folder (the examples write files, e.g.
  moe.safetensors), with `__name__` not "__main__";
- makes the stand-in a block's marker names (`<!-- doc-test: standin=NAME -->`): a tiny model
  folder under the name the example opens, so that an example written for a 90 GB
  checkpoint runs in a second. The doc names the stand-in beside the block.
"""
import os
import pathlib
import sys

import pytest

import doc_blocks

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))  # pretrained_folders.py, the folder builder


def tiny_pretrained(name, family, layers):
    """A random block folder of `family` (d_model 16, 8 experts) at ./name, with MoE layers
    0..layers-1 (what the example asks for must exist)."""
    def make(cwd):
        import pretrained_folders as pf
        c = pf.tiny_config(family, num_hidden_layers=layers)
        ws = {l: pf.random_weights(c, seed=l) for l in range(layers)}
        pf.write_folder(str(cwd / name), c, ws)
    return make


def tiny_gptq(name, family, layers):
    """A random GPTQ int4 block folder of `family` (d_model 64, group 32) at ./name."""
    def make(cwd):
        import pretrained_folders as pf
        c = pf.tiny_config(family, num_hidden_layers=layers, hidden_size=64,
                           moe_intermediate_size=64)
        ws = {l: pf.random_weights(c, seed=l) for l in range(layers)}
        pf.write_int4_folder(str(cwd / name), c, ws, method="gptq", group=32)
    return make


def tiny_hf_model(name, model_type):
    """A tiny transformers causal LM of model_type saved with save_pretrained at ./name."""
    def make(cwd):
        import test_pretrained_hf as th
        model = th.build(model_type)
        model.save_pretrained(str(cwd / name))
    return make


STANDINS = {
    # README "Blocks of real models": Mixtral-8x7B's layer 3.
    "tiny-mixtral": tiny_pretrained("Mixtral-8x7B-v0.1", "mixtral", 4),
    # docs/models.md: Qwen3-30B-A3B's layer 12.
    "tiny-qwen3": tiny_pretrained("Qwen3-30B-A3B", "qwen3_moe", 13),
    # docs/models.md "Stored formats": a GPTQ Qwen3-MoE folder.
    "tiny-qwen3-gptq": tiny_gptq("Qwen3-30B-A3B-GPTQ-Int4", "qwen3_moe", 3),
    # docs/pytorch.md: a transformers Mixtral model folder.
    "tiny-hf-mixtral": tiny_hf_model("path/to/mixtral", "mixtral"),
}


def codeblock_items(items):
    return [i for i in items if type(i).__name__ == "TestBlock"]


def pytest_collection_modifyitems(config, items):
    # ```sh fences are tests/docs/test_doc_blocks.py's (stand-ins, a sandbox folder).
    keep, drop = [], []
    for item in items:
        if type(item).__name__ == "TestBlock" and item.obj.syntax != "python":
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def marker_keys(item):
    for b in doc_blocks.blocks(item.path):
        if b.line == item.obj.lineno:
            return b.keys
    raise LookupError(f"{item.path}:{item.obj.lineno}: fence not found")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if type(item).__name__ != "TestBlock":
        yield
        return
    tmp = item.config._tmp_path_factory.mktemp("doc")
    keys = marker_keys(item)
    old = os.getcwd()
    os.chdir(tmp)
    try:
        if "standin" in keys:
            STANDINS[keys["standin"]](tmp)
        yield
    finally:
        os.chdir(old)
