// Pretrained MoE blocks (SPEC §7): the MoE block of one decoder layer of a Hugging Face model
// folder (config.json, one or several *.safetensors, model.safetensors.index.json when
// sharded) as a MoELayer whose evaluation forward equals that family's transformers module.
// Families by config model_type: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
// deepseek_v3, gpt_oss, granitemoe (tensor names, router and expert semantics per family:
// docs/models.md), with plain (F32, F16, BF16), FP8, MXFP4, GPTQ or AWQ expert weights.
//
// Only the requested layer's tensors are read: the files are mapped read-only and each
// expert matrix is converted on its own (through one small scratch) into the layer, whose
// pages are then handed back, so the peak memory stays near the block's own weights in the
// chosen precision. Every problem with the folder is a moe::Error naming the file and the
// tensor or config key.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "moe/layer.hpp"

namespace moe {

// What `moe inspect` prints about a folder.
struct PretrainedInfo {
  std::string family;                  // config.json's model_type
  int64_t n_layers = 0;                // num_hidden_layers
  std::vector<int64_t> moe_layers;     // decoder layers with an MoE block
  std::vector<int64_t> dense_layers;   // the others (a dense MLP)
  int64_t n_experts = 0, k = 0, d_model = 0, d_ff = 0;
  std::string expert;                  // the library's expert kind: swiglu | clamped_swiglu
  std::string router;                  // the family's routing in words
  int64_t n_shared_experts = 0;        // as the library holds them
  int64_t shared_d_ff = 0;             // hidden width of each shared expert (0: none)
  bool shared_gate = false;            // sigmoid(x·w_shared_gate) scales the shared output
  std::string layout;                  // "per-expert" or "stacked" names (first MoE block)
  std::map<std::string, int64_t> dtypes;  // dtype → number of the first MoE block's tensors
  // How the first MoE block's expert matrices are stored, in words ("bf16", "fp8 e4m3 (block
  // 128x128)", "mxfp4 (e2m1, e8m0 scale per 32)", "gptq int4 g128 sym act-order (v1 zeros)",
  // "awq int4 g128 (gemm)", ...), and the precision load_pretrained(..., precision_auto)
  // gives it: "bf16", "fp8", "mxfp4" or "int4".
  std::string expert_format;
  std::string auto_precision;
  int64_t file_bytes_per_block = 0;    // bytes of the first MoE block's tensors in the files
  int64_t bf16_bytes_per_block = 0;    // that block held in bf16 (experts) + fp32 (the rest)
  int64_t fp32_bytes_per_block = 0;    // ... all in fp32
  std::vector<std::string> files;      // the folder's safetensors files
  MoEConfig config;                    // the first MoE block's, precision bf16
};

// precision "auto": load_pretrained(dir, layer, moe::precision_auto) keeps the format the
// folder stores the block's experts in — BF16 / F16 / F32 files give bf16, FP8 (e4m3 with
// block scales) fp8, MXFP4 mxfp4, GPTQ / AWQ int4 — and the low-bit bytes go from the mapped
// file into the layer as stored (GPTQ / AWQ repacked into libmoe's int4 layout), with no
// wider copy of any matrix. An explicit precision converts (docs/models.md, "Stored formats").
struct AutoPrecision {};
inline constexpr AutoPrecision precision_auto{};

// The MoE block of decoder layer `layer`. By default the layer holds its expert matrices in
// `precision` only (LayerOptions{masters = false}: evaluation-only in bf16); pass
// LayerOptions{} to keep fp32 masters (trainable, three times the memory in bf16).
MoELayer load_pretrained(const std::string& dir, int64_t layer,
                         Precision precision = Precision::bf16);
MoELayer load_pretrained(const std::string& dir, int64_t layer, Precision precision,
                         const LayerOptions& options);
MoELayer load_pretrained(const std::string& dir, int64_t layer, AutoPrecision);
MoELayer load_pretrained(const std::string& dir, int64_t layer, AutoPrecision,
                         const LayerOptions& options);

// The MoEConfig load_pretrained would build (precision bf16), from config.json alone.
MoEConfig pretrained_config(const std::string& dir, int64_t layer);

// The folder's family, MoE layers, shapes, router, dtypes and sizes (headers only: no tensor
// data is read).
PretrainedInfo inspect_pretrained(const std::string& dir);

}  // namespace moe
