#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/: small valid inputs (so that the fuzzer
starts deep inside the code) and small invalid ones (one per kind of refusal). Rerun after
changing it; the files are committed so that CI needs no Python to fuzz."""
import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write(target, name, data):
    d = HERE / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def gate():
    ok = {
        "ref_flat": {"logits": [1.0, 2.0, 0.5], "k": 2, "training": False},
        "matrix_noise": {"logits": [[1, 2, 3, 4], [4, 3, 2, 1]], "k": 2, "noise_stddev": 1.0,
                         "seed": 7, "round": 3},
        "ties": {"logits": [[2, 2, 1]], "k": 1, "training": False},
        "k_eq_e": {"logits": [[0.1, -0.2]], "k": 2, "noise_stddev": 0.0},
        "big_logits": {"logits": [[3e38, -3e38, 0]], "k": 2, "training": False},
    }
    bad = {
        "k_zero": {"logits": [1, 2], "k": 0},
        "k_big": {"logits": [1, 2], "k": 3},
        "neg_sigma": {"logits": [1, 2], "k": 1, "noise_stddev": -1},
        "ragged": {"logits": [[1, 2], [3]], "k": 1},
        "unknown_field": {"logits": [1, 2], "k": 1, "kk": 1},
        "string_entry": {"logits": ["a", 2], "k": 1},
        "empty": {"logits": [], "k": 1},
    }
    for n, d in {**ok, **bad}.items():
        write("gate", n + ".json", json.dumps(d))
    write("gate", "overflow.json", '{"logits": [1e999, 1], "k": 1}')
    write("gate", "truncated.json", '{"logits": [[1, 2], [3, ')
    write("gate", "not_object.json", '[1, 2, 3]')


def route():
    ex2 = dict(X=[[1, 0], [0, 1]], W_g=[[1, .5, 0], [0, .5, 1]], W_noise=[[.1] * 3] * 2,
               N=[[.5, -.5, .2], [.1, 0, -.1]], k=2)
    ok = {
        "ex1_linear": dict(X=[[1, 2]], W_g=[[1, 0], [0, 1]], W_noise=[[.5, .5], [.5, .5]],
                           N=[[1, -1]], k=2, noise_scale="linear", round=3),
        "ex2_softplus": ex2,
        "ex3_tie_low": dict(X=[[1, 1]], W_g=[[2, 1, .5], [0, 1, .5]], k=1, tie_break="low"),
        "seeded_noise": dict(X=[[1, 2], [3, 4], [5, 6]], W_g=[[1, 0, 1], [0, 1, 1]],
                             W_noise=[[1, 1, 1], [1, 1, 1]], k=2, seed=3),
        "bias_eval": dict(X=[[1, 2]], W_g=[[1, 0], [0, 1]], b_g=[0.5, -0.5], k=1,
                          training=False),
    }
    bad = {
        "wg_rows": dict(X=[[1, 2]], W_g=[[1, 0]], k=1),
        "n_without_wnoise": dict(X=[[1, 2]], W_g=[[1, 0], [0, 1]], N=[[0, 0]], k=1),
        "n_shape": dict(ex2, N=[[0, 0]]),
        "b_g_shape": dict(X=[[1, 2]], W_g=[[1, 0], [0, 1]], b_g=[[1, 2]], k=1),
        "bad_scale": dict(ex2, noise_scale="cubic"),
        "bad_tie": dict(ex2, tie_break="middle"),
        "k_big": dict(ex2, k=4),
        "round_big": dict(ex2, round=99),
        "seed_neg": dict(ex2, seed=-1),
    }
    for n, d in {**ok, **bad}.items():
        write("route", n + ".json", json.dumps(d))
    write("route", "h_overflow.json",
          json.dumps(dict(X=[[3e38, 3e38]], W_g=[[3e38, 0], [3e38, 1]], k=1)))


def safetensors(header, data=b"", pad=True, length=None):
    h = json.dumps(header, separators=(",", ":")).encode() if not isinstance(header, bytes) \
        else header
    if pad:
        h += b" " * (-len(h) % 8)
    n = len(h) if length is None else length
    return struct.pack("<Q", n) + h + data


def st():
    f32 = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    two = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}
    cfg = json.dumps({"d_model": 2, "n_experts": 2, "k": 1, "expert": "linear_relu"})
    ok = {
        "two_f32": safetensors(two, f32 + struct.pack("<2f", 7, 8)),
        "meta": safetensors({"__metadata__": {"moe_config": cfg, "step": "3"},
                             "W_g": {"dtype": "F32", "shape": [2, 2],
                                     "data_offsets": [0, 16]}}, f32[:16]),
        "f16_bf16_f64": safetensors(
            {"h": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
             "bf": {"dtype": "BF16", "shape": [2], "data_offsets": [4, 8]},
             "d": {"dtype": "F64", "shape": [1], "data_offsets": [8, 16]}},
            struct.pack("<2e", 1.5, -2.0) + b"\x80\x3f\x00\x40" + struct.pack("<d", 0.25)),
        "scalar_and_empty": safetensors(
            {"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
             "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]}},
            struct.pack("<f", 9)),
        "empty_header": safetensors({}),
    }
    bad = {
        "truncated_data": safetensors(two, f32),
        "header_past_end": safetensors(two, f32, length=1 << 40),
        "offsets_overlap": safetensors(
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, f32),
        "offsets_out_of_range": safetensors(
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [16, 40]}}, f32),
        "shape_mismatch": safetensors(
            {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 24]}}, f32),
        "wrong_dtype": safetensors(
            {"a": {"dtype": "I64", "shape": [3], "data_offsets": [0, 24]}}, f32),
        "not_utf8": safetensors(b'{"\xff\xfe":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                                f32[:4]),
        "deep_json": safetensors(b"[" * 200 + b"]" * 200),
        "huge_shape": safetensors(
            {"a": {"dtype": "F32", "shape": [1 << 62, 8], "data_offsets": [0, 24]}}, f32),
        "short": b"\x08\x00\x00",
    }
    for n, d in {**ok, **bad}.items():
        write("safetensors", n + ".safetensors", d)


def config():
    full = {"d_model": 8, "n_experts": 4, "k": 2, "expert": "mlp", "d_ff": 16, "d_out": 0,
            "activation": "gelu", "expert_bias": True, "capacity_factor": 1.25,
            "drop_policy": "probs", "noise": "learned", "noise_scale": "softplus",
            "noise_stddev": 1.0, "aux_alpha": 0.01, "z_alpha": 0.001, "normalize_by_k": False,
            "residual": True, "tie_break": "high", "router_bias": False,
            "router_init_std": 0.0, "seed": 0}
    ok = {
        "full": full,
        "minimal": {"d_model": 2, "n_experts": 2, "k": 1},
        "swiglu_dropless": {"d_model": 4, "n_experts": 3, "k": 3, "expert": "swiglu",
                            "capacity_factor": None},
    }
    bad = {
        "k_big": dict(full, k=5),
        "cf_zero": dict(full, capacity_factor=0),
        "bad_kind": dict(full, expert="moe"),
        "bad_act": dict(full, activation="tanh"),
        "huge_dims": dict(full, d_model=1 << 40, d_ff=1 << 40, n_experts=1 << 30),
        "neg_sigma": dict(full, noise_stddev=-1),
        "unknown": dict(full, colour="red"),
    }
    for n, d in {**ok, **bad}.items():
        write("config_json", n + ".json", json.dumps(d))


def pretrained():
    """fuzz_pretrained: byte 0 picks the reader (0 header, 1 index, 2 config.json, 3 an int4
    matrix, 4 config.json + NUL + quantize_config.json)."""
    q = safetensors({"w": {"dtype": "F8_E4M3", "shape": [2, 4], "data_offsets": [0, 8]},
                     "w_scale_inv": {"dtype": "F32", "shape": [1, 1], "data_offsets": [8, 12]},
                     "b": {"dtype": "U8", "shape": [2, 1, 16], "data_offsets": [12, 44]}},
                    bytes(range(44)))
    write("pretrained", "header_fp8_u8.bin", b"\x00" + q)
    write("pretrained", "header_bad_dtype.bin", b"\x00" + safetensors(
        {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\x00"))
    write("pretrained", "index_ok.bin", b"\x01" + json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                        "b": "sub/model-2.safetensors"}}).encode())
    write("pretrained", "index_escape.bin", b"\x01" + json.dumps(
        {"weight_map": {"a": "../x.safetensors"}}).encode())
    configs = {
        "mixtral": {"model_type": "mixtral", "hidden_size": 16, "num_hidden_layers": 2,
                    "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 8},
        "qwen2_moe": {"model_type": "qwen2_moe", "hidden_size": 16, "num_hidden_layers": 2,
                      "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                      "shared_expert_intermediate_size": 12, "mlp_only_layers": [0],
                      "decoder_sparse_step": 1, "norm_topk_prob": False},
        "deepseek_v3": {"model_type": "deepseek_v3", "hidden_size": 16, "num_hidden_layers": 3,
                        "n_routed_experts": 8, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 8, "n_shared_experts": 1, "n_group": 4,
                        "topk_group": 2, "first_k_dense_replace": 1,
                        "routed_scaling_factor": 2.5,
                        "quantization_config": {"weight_block_size": [128, 128]}},
        "deepseek_v2": {"model_type": "deepseek_v2", "hidden_size": 16, "num_hidden_layers": 2,
                        "n_routed_experts": 8, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 8, "topk_method": "group_limited_greedy",
                        "n_group": 4, "topk_group": 2},
        "gpt_oss": {"model_type": "gpt_oss", "hidden_size": 32, "num_hidden_layers": 1,
                    "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32},
        "bad_groups": {"model_type": "deepseek_v3", "hidden_size": 16, "num_hidden_layers": 3,
                       "n_routed_experts": 8, "num_experts_per_tok": 2,
                       "moe_intermediate_size": 8, "n_group": 3, "topk_group": 2},
        "unknown_type": {"model_type": "llama", "hidden_size": 16},
        # Found by the fuzzer: a layer list of 2^54 entries was built before any check.
        "huge_layers": {"model_type": "deepseek_v2", "hidden_size": 16,
                        "num_hidden_layers": 29007199254740993, "n_routed_experts": 8,
                        "num_experts_per_tok": 2, "moe_intermediate_size": 8},
    }
    qwen3 = {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2,
             "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
    configs.update({
        "gptq_act_order": dict(qwen3, quantization_config={
            "quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False,
            "desc_act": True, "checkpoint_format": "gptq",
            "dynamic": {"-:.*mlp\\.gate$": {}, "+:.*experts\\.0\\.": {"group_size": 64}}}),
        "gptq_bits8": dict(qwen3, quantization_config={"quant_method": "gptq", "bits": 8,
                                                       "group_size": 128}),
        "awq_gemm": dict(qwen3, quantization_config={"quant_method": "awq", "bits": 4,
                                                     "group_size": 128, "version": "gemm",
                                                     "zero_point": True,
                                                     "modules_to_not_convert": ["gate"]}),
        "awq_gemv": dict(qwen3, quantization_config={"quant_method": "awq", "w_bit": 4,
                                                     "q_group_size": 48, "version": "gemv"}),
        "mxfp4": dict(configs["gpt_oss"], quantization_config={
            "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.mlp.router"]}),
        "unknown_method": dict(qwen3, quantization_config={"quant_method": "bitsandbytes"}),
    })
    for n, c in configs.items():
        write("pretrained", "config_" + n + ".bin", b"\x02" + json.dumps(c).encode())
    # GPTQ / AWQ matrices through the repacking: flags (gptq, g_idx, v1), K/8-1, N/8-1, group.
    for n, head in {"int4_gptq_act": bytes([0x03 | 4 | 0, 15, 3, 0]),
                    "int4_gptq_all_k": bytes([0x01 | 4, 9, 1, 4]),
                    "int4_awq": bytes([0x03, 31, 2, 2]),
                    "int4_bad_group": bytes([0x01, 7, 0, 5])}.items():
        write("pretrained", n + ".bin", b"\x03" + head + bytes(range(256)) * 8)
    # AutoGPTQ's quantize_config.json beside config.json: alone, agreeing, disagreeing, malformed.
    autogptq = {"bits": 4, "group_size": 128, "desc_act": True, "sym": False,
                "true_sequential": True, "model_file_base_name": "model"}
    pairs = {
        "alone": (qwen3, autogptq),
        "agree": (configs["gptq_act_order"], dict(autogptq, quant_method="gptq")),
        "disagree": (configs["gptq_act_order"], dict(autogptq, group_size=64)),
        "not_object": (qwen3, [autogptq]),
        "wrong_type": (qwen3, dict(autogptq, model_file_base_name=3)),
    }
    for n, (c, q) in pairs.items():
        write("pretrained", "quantize_config_" + n + ".bin",
              b"\x04" + json.dumps(c).encode() + b"\x00" + json.dumps(q).encode())


if __name__ == "__main__":
    gate()
    route()
    st()
    config()
    pretrained()
