"""Training from PyTorch (docs/pytorch.md): the two-layer transformer language model of the
docs, the MoE in each layer, trained with torch.optim.AdamW — its loss falls, the expert
loads are logged, and two runs give the same bits."""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def docs_example():
    text = (ROOT / "docs" / "pytorch.md").read_text()
    section = text.split("## Training a small language model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns = {"__name__": "docs_pytorch"}
    exec(compile(code, "docs/pytorch.md", "exec"), ns)
    return ns


def test_tiny_lm_trains_logs_loads_and_repeats_bit_for_bit(capsys):
    ns = docs_example()
    model_a, losses_a = ns["train"]()
    log = capsys.readouterr().out
    model_b, losses_b = ns["train"]()

    first, last = sum(losses_a[:10]) / 10, sum(losses_a[-10:]) / 10
    assert first > 3.0 and last < 0.6 * first, (first, last)
    # The load of each layer's experts is logged: 2 layers x 4 experts per line.
    lines = [l for l in log.splitlines() if l.startswith("step")]
    assert len(lines) == 5
    loads = re.search(r"expert load per layer (\[\[.*\]\])", lines[-1]).group(1)
    assert len(eval(loads)) == 2 and all(len(l) == 4 for l in eval(loads))
    for b in model_a.blocks:
        s = b.moe.stats
        assert s["tokens"] == 16 * ns["CTX"] and sum(s["load_before"]) == 2 * s["tokens"]

    assert losses_a == losses_b
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
