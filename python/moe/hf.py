"""moe.hf: libmoe as a drop-in for the MoE blocks of a loaded ``transformers`` model.

    import transformers, moe.hf
    model = transformers.AutoModelForCausalLM.from_pretrained(path)   # or built from a config
    moe.hf.replace_moe_blocks(model)          # every MoE block is now a moe.torch.MoE
    logits = model(input_ids).logits          # the same logits, libmoe's kernels underneath

Families: the eight that ``moe.MoE.from_pretrained`` loads (docs/models.md): ``mixtral``,
``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``deepseek_v2``, ``deepseek_v3``, ``gpt_oss``,
``granitemoe``. Each MoE block (a module whose ``experts`` hold ``transformers`` 5's fused
``gate_up_proj`` / ``down_proj`` and whose router is ``gate`` or ``router``) is written, as
``transformers`` holds it in memory and under the model's own names, to a temporary folder
with the model's ``config.json``, and built by ``moe.torch.MoE.from_pretrained(folder, layer,
precision=precision, masters=True)``: the loader's family table decides the routing (softmax
or sigmoid scores, group-limited selection, the DeepSeek-V3 selection bias,
``routed_scaling_factor``, renormalisation), the experts (SwiGLU, GPT-OSS's clamped SwiGLU
with biases) and the shared experts (their own width, Qwen2-MoE's sigmoid gate), so there is
one mapping of each family, tested against ``transformers`` (tests/python/test_pretrained_hf.py).

The new module keeps the block's train/eval mode and holds fp32 masters, so training the
replaced model trains the library's parameters. It has no noise, no capacity limit and no
auxiliary loss of its own: these models add their router loss at the model level from the
router logits ``transformers`` records (``output_router_logits=True``). Each replaced block
records them as the family's router did: a child module ``router_logits`` (an instance of the
family's router class, so ``transformers``' output hooks find it, holding no parameters) is
called with the block's input and its ``W_g`` (and ``b_g``) when hooks are installed on it,
and returns ``x·W_g (+ b_g)`` at the tuple position the family records; the router loss's
gradient reaches ``W_g`` through it and adds to the library's own. The DeepSeek-V3
``e_score_correction_bias`` is held as the layer's
``expert_bias`` (a buffer in ``transformers`` too; nothing updates it). GPT-OSS's block
returns ``(hidden_states, router_scores)`` and its decoder layer drops the second item: the
replacement returns ``(hidden_states, None)``.

Refused by name (``ValueError``): other model types, a model without MoE blocks,
``router_jitter_noise > 0``, experts held quantised in memory (FP8, MXFP4 modules of
``transformers``' quantisers: any tensor of the block that is not a float), and whatever the
loader refuses (``hidden_act`` other than silu, shapes).
"""
from __future__ import annotations

import json
import os
import re
import tempfile

import torch
from torch import nn

from . import _moe
from . import torch as moe_torch

__all__ = ["replace_moe_blocks", "FAMILIES"]

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
            "gpt_oss", "granitemoe")

# Families whose decoder layer unpacks the MoE block's output as (hidden_states, extra).
_TUPLE_OUTPUT = ("gpt_oss",)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# Families whose router returns float32 logits whatever the model's dtype.
_FLOAT_LOGITS = ("deepseek_v2", "deepseek_v3", "granitemoe")
# Rounding as transformers computes a bf16 model's block (docs/routing.md, "Rounding as
# transformers"), per family: whether its router casts the kept weights to the model's dtype
# (then each weighted expert output is a bf16 product), and whether its experts are
# transformers' fused experts alone (no shared expert or gate beside them), so that
# round_each_op reproduces every step of the block.
_WEIGHTS_IN_MODEL_DTYPE = ("qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss")
_EXPERTS_ALONE = ("qwen3_moe", "olmoe", "mixtral", "gpt_oss")


def _recorder_init(self, index: int, float_logits: bool):
    nn.Module.__init__(self)  # not the router's __init__: no weight of its own
    self.index = index
    self.float_logits = float_logits


def _recorder_forward(self, x2d, W_g, b_g):
    logits = torch.nn.functional.linear(x2d.float(), W_g.t(), b_g)
    if not self.float_logits:
        logits = logits.to(x2d.dtype)
    out = [None] * (self.index + 1)
    out[self.index] = logits
    return tuple(out)


def _recorder_reduce(self, protocol):
    return (_make_recorder, (type(self).__bases__[0], self.index, self.float_logits),
            self.__dict__.copy())


class _RecorderBase:
    """Marks the generated recorder classes (found by isinstance after a replacement)."""


_RECORDER_CLASSES: dict = {}


def _make_recorder(router_cls, index: int, float_logits: bool) -> nn.Module:
    """A parameterless module of a subclass of the family's router class (transformers'
    output hooks match by class) returning the logits at the recorded tuple position.
    Pickled as this call and its state (hooks included), so copies and torch.save need no
    generated class by name."""
    cls = _RECORDER_CLASSES.get(router_cls)
    if cls is None:
        cls = type(f"{router_cls.__name__}Logits", (router_cls, _RecorderBase),
                   {"__init__": _recorder_init, "forward": _recorder_forward,
                    "__reduce_ex__": _recorder_reduce, "__module__": __name__})
        _RECORDER_CLASSES[router_cls] = cls
    return cls(index, float_logits)


class _HFMoE(moe_torch.MoE):
    """A moe.torch.MoE in a transformers model: records its router logits through its
    ``router_logits`` child when transformers has hooked it."""

    tuple_output = False

    def forward(self, x: torch.Tensor):
        rec = self._modules.get("router_logits")
        if rec is not None and rec._forward_hooks:
            rec(x.reshape(-1, x.shape[-1]), self.W_g, getattr(self, "b_g", None))
        y = super().forward(x)
        return (y, None) if self.tuple_output else y


class _TupleMoE(_HFMoE):
    """Returning (y, None), for decoder layers that unpack two values (GPT-OSS:
    ``hidden_states, _ = self.mlp(hidden_states)``)."""

    tuple_output = True


def _router_spec(model: nn.Module):
    """(router class, tuple index) of transformers' router-logits recorder for this model,
    or None when this transformers records none (then router logits are refused)."""
    spec = (getattr(type(model), "_can_record_outputs", None) or {}).get("router_logits")
    cls = getattr(spec, "target_class", None)  # an OutputRecorder, as in transformers 5
    return (cls, int(spec.index)) if isinstance(cls, type) else None


def _is_block(mod: nn.Module) -> bool:
    experts = getattr(mod, "experts", None)
    return (isinstance(experts, nn.Module) and hasattr(experts, "gate_up_proj")
            and (hasattr(mod, "gate") or hasattr(mod, "router")))


def _config_json(config) -> str:
    c = json.loads(config.to_json_string(use_diff=False))
    # The in-memory tensors written are floats (quantised ones are refused): the folder must
    # not tell the loader to expect FP8 scales or MXFP4 blocks.
    c.pop("quantization_config", None)
    return json.dumps(c)


def _convert(name: str, block: nn.Module, model_type: str, config_json: str,
             precision: str, router, masters: bool) -> nn.Module:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.[^.]+$", name)
    if m is None:
        raise ValueError(f"{model_type}: MoE block '{name}' is not named "
                         f"'...layers.<N>.<block>'; cannot tell its layer")
    layer = int(m.group(1))
    tensors = {}
    for key, t in block.state_dict().items():
        if t.dtype not in _FLOATS:
            raise ValueError(f"{model_type}: MoE block '{name}': tensor '{key}' is held as "
                             f"{t.dtype}; quantised in-memory experts are not supported "
                             f"(load the model dequantised, or load the folder with "
                             f"moe.MoE.from_pretrained)")
        if t.device.type != "cpu":
            raise ValueError(f"{model_type}: MoE block '{name}': tensor '{key}' is on "
                             f"{t.device}; libmoe runs on the CPU")
        tensors[f"{name}.{key}"] = t.detach().contiguous()
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory(prefix="moe_hf_") as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config_json)
        cls = _TupleMoE if model_type in _TUPLE_OUTPUT else _HFMoE
        try:
            # fp32 / bf16 blocks keep fp32 masters (they can train) unless masters=False;
            # the evaluation-only precisions hold the experts in their own bytes only.
            out = cls.from_pretrained(tmp, layer, precision=precision,
                                      masters=masters and precision in ("fp32", "bf16"))
        except ValueError as e:  # moe.Error names the temporary folder: name the block
            raise _moe.Error(f"{model_type}: MoE block '{name}': {e}") from e
    if router is not None:
        out.router_logits = _make_recorder(router[0], router[1], model_type in _FLOAT_LOGITS)
    if _bf16_block(block):
        _round_as_transformers(out, model_type, precision)
    out.train(block.training)
    return out


def _bf16_block(block: nn.Module) -> bool:
    return all(p.dtype == torch.bfloat16 for p in block.parameters())


def _round_as_transformers(module, model_type: str, precision: str) -> None:
    """A block of a bf16 model computes in bf16 under transformers: its router's logits are
    bf16 (but for the families whose router runs in float32), torch.topk breaks their ties, and
    its experts round each op. The replacement rounds where the family does, so that it
    chooses the same experts and, in precision bf16 for the families whose block is the fused
    experts alone, gives the same bits (docs/routing.md, "Rounding as transformers")."""
    bf16_router = model_type not in _FLOAT_LOGITS
    module.layer.set_rounding(
        round_router_logits=bf16_router,
        round_gate_weights=bf16_router and model_type in _WEIGHTS_IN_MODEL_DTYPE,
        round_each_op=precision == "bf16" and model_type in _EXPERTS_ALONE,
        tie_break="torch" if bf16_router else module.layer.config["tie_break"])


def _refuse_router_logits(module: nn.Module, args, kwargs):
    """Forward pre-hook of the model where this transformers has no router-logits recorder
    to serve: a forward asking for router logits (and for the router loss made from them) is
    refused by name rather than left to fail inside transformers."""
    asked = kwargs.get("output_router_logits")
    if asked is None:
        asked = getattr(module.config, "output_router_logits", False)
    if asked:
        raise ValueError(f"{module.config.model_type}: output_router_logits=True is not "
                         f"supported after moe.hf.replace_moe_blocks with this transformers "
                         f"version (it declares no router-logits recorder for the blocks to "
                         f"serve, so no router loss can be made); "
                         f"pass output_router_logits=False or set "
                         f"config.output_router_logits = False")


def _auto_precision(model_type, config, blocks) -> str:
    """precision="auto" for a loaded model: what its blocks hold (bf16 for bf16 or fp16
    experts, fp32 for fp32 ones). A model transformers quantized in memory is refused: its
    folder is what libmoe reads as stored (moe.MoE.from_pretrained(path, layer, "auto"))."""
    q = getattr(config, "quantization_config", None)
    if q:
        method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", q)
        raise ValueError(f"{model_type}: precision='auto' of a model loaded with "
                         f"quantization_config ({method}): load the block from its folder "
                         f"with moe.MoE.from_pretrained(path, layer, precision='auto'), or "
                         f"load the model dequantised and pass an explicit precision")
    import torch
    dtypes = {p.dtype for _, b in blocks for p in b.parameters()}
    return "fp32" if dtypes == {torch.float32} else "bf16"


def replace_moe_blocks(model: nn.Module, precision: str = "fp32", masters: bool = True) -> int:
    """Replaces every MoE block of ``model`` (a ``transformers`` model of one of FAMILIES)
    with a ``moe.torch.MoE`` holding the same weights, built by the pretrained loader;
    returns how many were replaced. ``precision``: fp32, bf16 (trainable), int8, int4, mxfp4,
    fp8 (evaluation only: the experts held in that format alone, converted from the block's
    weights), or "auto" (what the blocks hold: bf16 for bf16 / fp16 experts, fp32 for fp32).
    ``masters=False``: bf16 blocks hold their bf16 experts alone, without fp32 masters (a third
    of the memory; evaluation only, so the model must be in eval mode)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type '{model_type}': not one of the families this drop-in "
                         f"supports ({', '.join(FAMILIES)})")
    jitter = getattr(config, "router_jitter_noise", 0.0)
    if jitter:
        raise ValueError(f"{model_type}: router_jitter_noise = {jitter} is not supported (it "
                         f"scales the experts' input too)")
    blocks = [(name, mod) for name, mod in model.named_modules() if _is_block(mod)]
    if not blocks:
        raise ValueError(f"{model_type}: no MoE block (a router 'gate' or 'router' and "
                         f"experts.gate_up_proj) found")
    if precision == "auto":
        precision = _auto_precision(model_type, config, blocks)
    if not masters and model.training:
        raise ValueError(f"{model_type}: masters=False makes the blocks evaluation-only; call "
                         f"model.eval() before replace_moe_blocks, or keep masters=True to train")
    config_json = _config_json(config)
    router = _router_spec(model)
    # Every block is built before any is replaced: an error leaves the model as it was.
    built = [(name, _convert(name, block, model_type, config_json, precision, router, masters))
             for name, block in blocks]
    for name, new in built:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    from transformers import PreTrainedModel
    if router is None:
        for mod in model.modules():  # the model and its inner base model (model.model)
            if isinstance(mod, PreTrainedModel) and not getattr(mod, "_moe_hf_hooked", False):
                mod.register_forward_pre_hook(_refuse_router_logits, with_kwargs=True)
                mod._moe_hf_hooked = True
        return len(built)
    # transformers hooks the recorders on a model's first forward that asks for an output;
    # where that forward has run already, the new blocks' recorders are hooked here.
    hooked = [m for m in model.modules() if isinstance(m, PreTrainedModel)
              and getattr(m, "_output_capturing_hooks_installed", False)]
    if hooked:
        from transformers.utils.output_capturing import install_output_capuring_hook
        for rec in (r for m in hooked for r in m.modules() if isinstance(r, _RecorderBase)):
            if not rec._forward_hooks:  # once, where models nest
                install_output_capuring_hook(rec, "router_logits", router[1])
    return len(built)
