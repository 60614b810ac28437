#include "kernels/amx_gemm.hpp"

namespace moe::detail {

void amx_gemm_run(const AmxGemmArgs& g, AmxOp op, bool emulated) {
  if (emulated)
    op == AmxOp::bf16 ? amx_gemm<AmxEmu, AmxOp::bf16>(g) : amx_gemm<AmxEmu, AmxOp::u8s8>(g);
  else
    op == AmxOp::bf16 ? amx_gemm<AmxHw, AmxOp::bf16>(g) : amx_gemm<AmxHw, AmxOp::u8s8>(g);
}

}  // namespace moe::detail
