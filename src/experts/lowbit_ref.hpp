// The reference twin of the low-bit precisions (int4, mxfp4, fp8; STYLE.md items 2 and 13):
// one expert applied to one row as obvious loops on any scalar type, on the operands the fast
// path multiplies (experts/lowbit.hpp, quant/kernels.hpp):
//   weights  the values the stored bytes hold (what expert_matrix returns of a layer without
//            masters); where the expert's rows take the prefill kernel on a bf16 path, those
//            values rounded to bf16 as its widened panels hold them (the int8 panels of
//            avx512_vnni hold them exactly);
//   rows     by the kernel the expert's row count M selects and its path: int8 per 32 values
//            (decode on avx512_vnni), per quant_tiled_row_block (the same on the tiled matrices
//            the layer holds there: quant_tiling_wanted) or per 128 (prefill on avx512_vnni), bf16,
//            or exact (fp32).
// The layer and shared-expert twins call it when cfg.precision is low-bit.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/bf16.hpp"
#include "experts/int8_ref.hpp"
#include "experts/lowbit.hpp"
#include "moe/layer.hpp"

namespace moe::detail {

template <typename S>
struct LowbitRefExperts {
  Int8RefExperts<S> exact, widened;  // used as plain holders of weights, biases and F
  QuantFormatId format = QuantFormatId::int4;

  static LowbitRefExperts of(const std::vector<S>& W1, const std::vector<S>& W2,
                             const std::vector<S>& W3, int64_t F, const MoEConfig& cfg) {
    LowbitRefExperts r;
    r.format = quant_format_of(cfg.precision);
    r.exact.W1 = W1;
    r.exact.W2 = W2;
    r.exact.W3 = W3;
    r.exact.F = F;
    const auto wide = [](const std::vector<S>& W) {
      std::vector<S> o(W.size());
      for (size_t i = 0; i < W.size(); ++i)
        o[i] = static_cast<S>(round_bf16(static_cast<float>(W[i])));
      return o;
    };
    r.widened.W1 = wide(W1);
    r.widened.W2 = wide(W2);
    r.widened.W3 = wide(W3);
    r.widened.F = F;
    return r;
  }
  LowbitRefExperts& with_biases(const std::vector<S>& b1, const std::vector<S>& b2,
                                const std::vector<S>& b3) {
    exact.with_biases(b1, b2, b3);
    widened.with_biases(b1, b2, b3);
    return *this;
  }
};

// The path M rows of a matrix of `format` take.
inline QuantPath lowbit_path_ref(QuantFormatId format, int64_t M) {
  return quant_method_for(M, format) == QuantMethod::prefill ? quant_prefill_path(format)
                                                     : quant_decode_path(format);
}

// out (n) = the row v as the kernel for M rows of a matrix of `format` takes it, the matrix
// (n, N) as the layer holds it (block_k values a scale; tiled where quant_tiling_wanted).
template <typename S>
void lowbit_row_ref(S* out, const S* v, int64_t n, QuantFormatId format, int64_t M, int64_t N,
                    int64_t block_k) {
  const bool prefill = quant_method_for(M, format) == QuantMethod::prefill;
  const QuantPath path = lowbit_path_ref(format, M);
  const QuantRowsType rows = prefill && path != QuantPath::avx512_vnni ? QuantRowsType::bf16
                                                                         : quant_rows_type(path);
  if (rows == QuantRowsType::s8) {
    QuantMatrix held;
    held.format = format;
    held.K = n;
    held.N = N;
    held.block_k = block_k;
    const bool tiled = !prefill && quant_tiling_wanted(held);
    const int64_t block = prefill ? 128 : tiled ? quant_tiled_row_block(held) : 32;
    std::vector<float> f(static_cast<size_t>(block));
    for (int64_t b = 0; b < n; b += block) {
      const int64_t len = std::min<int64_t>(block, n - b);
      for (int64_t i = 0; i < len; ++i) f[static_cast<size_t>(i)] = static_cast<float>(v[b + i]);
      const float scale = quant_s8_scale(f.data(), len);
      for (int64_t i = 0; i < len; ++i)
        out[b + i] = static_cast<S>(quant_s8(f[static_cast<size_t>(i)], scale)) * static_cast<S>(scale);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    out[i] = rows == QuantRowsType::bf16 ? static_cast<S>(round_bf16(static_cast<float>(v[i])))
                                         : static_cast<S>(static_cast<float>(v[i]));
}

// out (Do) = expert e of q applied to the row x (d), the expert having M rows in this call.
template <typename S>
void expert_row_lowbit_ref(S* out, const S* x, const LowbitRefExperts<S>& q, int64_t e,
                           const MoEConfig& cfg, int64_t M) {
  const bool widened = quant_method_for(M, q.format) == QuantMethod::prefill &&
                       lowbit_path_ref(q.format, M) != QuantPath::avx512_vnni;
  const QuantFormatId f = q.format;
  const int64_t block_k = f == QuantFormatId::int4 ? cfg.int4_group : quant_format(f).block_k;
  expert_row_quantized_ref(out, x, widened ? q.widened : q.exact, e, cfg,
                           [f, M, block_k](S* o, const S* v, int64_t n, int64_t N) {
                             lowbit_row_ref(o, v, n, f, M, N, block_k);
                           });
}

}  // namespace moe::detail
