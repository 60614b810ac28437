// A Hugging Face model folder as the pretrained loader sees it: config.json, the tensor names
// of its safetensors files (from model.safetensors.index.json when sharded, else from the
// files' headers), files mapped on first use, and stored weights decoded row by row (F32, F64,
// F16, BF16, F8_E4M3 with block scales, MXFP4, GPTQ / AWQ int4) or handed over as the bytes of
// a low-bit layer (keeps_stored / stored_view). Errors name the file and the tensor.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <vector>

#include "io/safetensors_view.hpp"
#include "moe/layer.hpp"
#include "quant/int4.hpp"

namespace moe::detail {

// Hard limits on the folder's JSON files, so that a hostile folder cannot ask for unbounded
// work before anything is checked.
inline constexpr uint64_t kConfigJsonMaxBytes = 16ull << 20;
inline constexpr uint64_t kIndexJsonMaxBytes = 256ull << 20;

class PretrainedFolder {
 public:
  explicit PretrainedFolder(const std::string& dir);  // reads config.json and the index
  ~PretrainedFolder();

  const std::string& dir() const { return dir_; }
  const nlohmann::ordered_json& config() const { return config_; }
  std::string config_what() const;   // "config.json of '<dir>'"
  // quantize_config.json (AutoGPTQ's settings file, older than transformers'
  // quantization_config): an object, or null when the folder has none.
  const nlohmann::ordered_json& quantize_config() const { return quantize_config_; }
  std::string quantize_config_what() const;  // "quantize_config.json of '<dir>'"
  const std::vector<std::string>& files() const { return files_; }
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  const std::map<std::string, std::string>& tensor_files() const { return where_; }
  // The file and header entry of a tensor, mapping its file on first use. Throws naming the
  // tensor (and the index) when absent or when the index names a missing file.
  struct Ref {
    const SafetensorsView* view = nullptr;
    const StEntry* entry = nullptr;
  };
  Ref get(const std::string& name) const;
  const SafetensorsView& view(const std::string& file) const;

 private:
  std::string dir_;
  nlohmann::ordered_json config_;
  nlohmann::ordered_json quantize_config_;    // null: no quantize_config.json
  std::vector<std::string> files_;            // relative to dir_
  std::map<std::string, std::string> where_;  // tensor → file
  std::string index_name_;                    // empty when unsharded
  mutable std::map<std::string, std::unique_ptr<SafetensorsView>> views_;
};

// model.safetensors.index.json: its weight_map (tensor → file), every file name a plain
// relative path inside the folder. Throws moe::Error naming `what`.
std::map<std::string, std::string> parse_index_json(const std::string& text,
                                                    const std::string& what);

// The MoEConfig of the first MoE block that config.json text describes (pretrained.cpp; the
// fuzzer's door to the family table). Throws moe::Error naming `what`. The second form also
// has a quantize_config.json beside it (`quantize_text`, errors naming `quantize_what`).
MoEConfig pretrained_config_from_json(const std::string& text, const std::string& what);
MoEConfig pretrained_config_from_json(const std::string& text, const std::string& what,
                                      const std::string& quantize_text,
                                      const std::string& quantize_what);

// The quantization settings as the loader uses them (read and checked by pretrained.cpp:
// docs/models.md, "Stored formats"): config.json's quantization_config, or, when config.json
// has none, quantize_config.json's (older AutoGPTQ checkpoints).
struct StoredQuant {
  enum class Method { none, gptq, awq, fp8, mxfp4 };
  Method method = Method::none;
  std::string method_name = "none";  // as config.json spells it
  int64_t group = 128;               // GPTQ / AWQ group_size (-1: GPTQ's one group over K)
  bool sym = true;                   // GPTQ
  bool desc_act = false;             // GPTQ act-order (g_idx)
  bool zeros_minus_one = true;       // GPTQ checkpoint_format "gptq" (v1): stored z - 1
  int64_t fp8_block[2] = {128, 128};  // weight_block_size (rows, cols) of the stored (out, in)
  // modules_to_not_convert, as transformers matches them: a pattern (a regular expression)
  // matching the module's name from its start up to a "." boundary, or a suffix of the name.
  struct Pattern {
    std::string key;
    std::regex re;
  };
  std::vector<Pattern> not_converted;
  // GPTQModel's `dynamic`: "-:regex" leaves matching modules unquantized; "+:regex" (or a
  // bare regex) overrides group_size for them. Matched from the start of the module's name.
  struct Rule {
    std::string key;
    std::regex re;
    bool skip = false;
    int64_t group = 0;  // 0: the default
  };
  std::vector<Rule> dynamic;
  bool from_quantize_file = false;  // the settings are quantize_config.json's
  // A settings key as errors name it: "quantization_config.<k>" or "quantize_config.json's <k>".
  std::string key(const std::string& k) const {
    return (from_quantize_file ? "quantize_config.json's " : "quantization_config.") + k;
  }
  bool int4() const { return method == Method::gptq || method == Method::awq; }
  // Whether `module` (a linear's name without ".weight") stays unquantized, and why.
  bool excluded(const std::string& module, std::string* why = nullptr) const;
  int64_t group_of(const std::string& module) const;
};

// One weight as stored: a matrix (rows, cols) or a stack of them (stack, rows, cols), in its
// format. For MXFP4, `name` is the logical name and the data are name_blocks / name_scales;
// for GPTQ / AWQ (a single (rows = out, cols = in) matrix) the data are <module>.qweight,
// .qzeros, .scales and (GPTQ) .g_idx.
struct StoredWeight {
  enum class Format { plain, fp8_block, mxfp4, gptq, awq };
  std::string name;
  std::string file;
  Format format = Format::plain;
  PretrainedFolder::Ref w, scale;
  PretrainedFolder::Ref zeros, g_idx;  // GPTQ / AWQ (g_idx: GPTQ, optional)
  int64_t stack = 0;             // 0: a single matrix
  int64_t rows = 0, cols = 0;
  int64_t block_rows = 128, block_cols = 128;  // fp8 block scales
  int64_t group = 0;             // GPTQ / AWQ group_size (-1: one group)
  bool zeros_minus_one = true;   // GPTQ v1
  std::string dtype;             // of w ("MXFP4" for the packed pair, "GPTQ-INT4", "AWQ-INT4")

  // out (cols) = row r of matrix e (e = 0 when not stacked), dequantised to float32.
  void row(float* out, int64_t e, int64_t r) const;
  // Hands back the pages of matrix e (see SafetensorsView::release).
  void release(int64_t e) const;
  // Starts reading the bytes of matrix e from disk (see SafetensorsView::prefetch).
  void prefetch(int64_t e) const;
  // dst = the stored bytes of matrix e of a plain weight (rows · cols values of dtype), read
  // from the file (see SafetensorsView::read).
  void read_bytes(int64_t e, void* dst) const;
  // Where matrix e's data starts in its file (for reading in file order).
  uint64_t file_offset(int64_t e) const;
  int64_t file_bytes() const;    // bytes of the data (and scales, zeros, g_idx) in the file
};

// The precision a stored format keeps ("auto"): fp8_block -> fp8, mxfp4 -> mxfp4, gptq / awq
// -> int4, plain -> bf16.
Precision stored_precision(StoredWeight::Format f);

// What load_pretrained(dir, layer, precision_auto) keeps of decoder layer `layer`'s block: the
// precision, how its expert matrices are stored, in words (as PretrainedInfo's
// expert_format), and the layer's config (int4: the checkpoint's group and zero points).
// Headers only (pretrained.cpp; `moe bench --model --precision auto`).
struct StoredBlockFormat {
  Precision precision = Precision::bf16;
  std::string words;
  MoEConfig config;
};
StoredBlockFormat stored_block_format(const std::string& dir, int64_t layer);

// The weight `name` with the logical shape `shape` ({rows, cols} or {stack, rows, cols}):
// plain, F8_E4M3 with name + "_scale_inv", MXFP4 name + "_blocks" / "_scales", or (for a
// "<module>.weight" matrix) GPTQ / AWQ "<module>.qweight" ... as q.method says. Throws
// naming the file and tensor on a missing tensor, a wrong shape or dtype, or an int4 tensor
// the config does not describe.
StoredWeight open_weight(const PretrainedFolder& f, const std::string& name,
                         const std::vector<int64_t>& shape, const StoredQuant& q);

// How one of the library's "in × out" matrices dst (In, Out) is taken from a stored matrix:
// out_major: stored rows are outputs (nn.Linear's (out, in)), dst[i][o] =
//   stored[out_base + out_step·o][in_base + i]; else stored rows are inputs, dst[i][o] =
//   stored[in_base + i][out_base + out_step·o].
struct MatrixMap {
  bool out_major = true;
  int64_t out_base = 0, out_step = 1, in_base = 0;
  int64_t In = 0, Out = 0;
};

// dst (In, Out) from matrix e of w as m says. Parallel over blocks of rows; each thread
// decodes through its own row scratch.
void read_matrix(float* dst, const StoredWeight& w, int64_t e, const MatrixMap& m);

// Whether matrix e of w, taken as m says, goes into a layer of `precision` as its stored bytes
// (no decoding): fp8 with 128 x 128 blocks on block boundaries, mxfp4 whole rows (GPT-OSS's
// interleaved gate/up rows as a doubled stride), GPTQ / AWQ with a group the int4 kernel holds.
bool keeps_stored(const StoredWeight& w, const MatrixMap& m, Precision precision);

// The stored bytes of matrix e of w taken as m says, as the layer's format reads them: a view
// of the mapped file (fp8, mxfp4; scales widened to fp32 or copies of misaligned data go into
// `scales` / `copy`), or GPTQ / AWQ repacked into `int4` (int4_from_gptq / int4_from_awq).
// Errors name the tensor.
struct StoredView {
  QuantMatrix view;
  Int4Kernel::Weights int4;
  std::vector<float> scales;
  std::vector<int32_t> copy;
};
void stored_view(const StoredWeight& w, int64_t e, const MatrixMap& m, StoredView& out);

// The float32 value of every F8_E4M3 (fn: no infinities) byte, and of every e2m1 nibble.
float fp8_e4m3_to_float(uint8_t v);
float fp4_e2m1_to_float(uint8_t nibble);

}  // namespace moe::detail
