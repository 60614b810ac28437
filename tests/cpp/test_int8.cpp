// precision "int8" (SPEC §6, evaluation only): the quantization, the u8·s8 kernel against the
// exact sum of the same integers, and the layer forward against the float64 twin on the same
// quantized operands (experts/int8_ref.hpp; tight: 1e-3 of the output's Frobenius norm) and
// against the fp32 layer (loose: 2%, what int8 quantization costs), for every expert kind,
// dropless and capacity, shared experts and expert choice. Every kernel (portable, VNNI, AMX
// emulated) gives the same bits: test_isa_levels.cpp and tests/python/test_int8.py.
#include <gtest/gtest.h>
#include <malloc.h>
#if defined(__SANITIZE_ADDRESS__)
// From the ASan runtime (its header is not installed with GCC 12 on Debian).
extern "C" size_t __sanitizer_get_current_allocated_bytes(void);
#endif
#include <omp.h>

#include <cmath>
#include <string>
#include <vector>

#include "experts/int8.hpp"
#include "experts/int8_ref.hpp"
#include "layer/expert_choice_ref.hpp"
#include "layer/layer_ref.hpp"
#include "moe/checkpoint.hpp"
#include "moe/layer.hpp"
#include "test_checkpoint_util.hpp"
#include "test_layer_util.hpp"

namespace {

using moe::MoEConfig;
using moe::MoELayer;
using moe::Precision;
using moe_test::Rng;
using moe_test::eval_forward;
using moe_test::rel_fro;

// The fp32 layer and its int8 twin with the same parameters.
struct Pair {
  MoELayer f32, i8;
};
Pair make_pair(const MoEConfig& c32, uint64_t seed) {
  MoEConfig c8 = c32;
  c8.precision = Precision::int8;
  Pair p{MoELayer(c32), MoELayer(c8)};
  Rng rng(seed);
  moe_test::randomize(p.f32, rng);
  for (const auto& n : p.f32.parameter_names()) p.i8.param(n).data = p.f32.param(n).data;
  return p;
}

}  // namespace

TEST(Int8Quant, RoundsToNearestEvenAndClamps) {
  using moe::detail::quantize_int8;
  EXPECT_EQ(quantize_int8(2.5f, 1.0f), 2);
  EXPECT_EQ(quantize_int8(3.5f, 1.0f), 4);
  EXPECT_EQ(quantize_int8(-2.5f, 1.0f), -2);
  EXPECT_EQ(quantize_int8(-0.49f, 1.0f), 0);
  EXPECT_EQ(quantize_int8(300.0f, 1.0f), 127);
  EXPECT_EQ(quantize_int8(-300.0f, 1.0f), -127);
  EXPECT_EQ(quantize_int8(5.0f, 0.0f), 0);
  EXPECT_EQ(quantize_int8(1.0f, 1.0f / 127.0f), 127);
  EXPECT_EQ(moe::detail::int8_scale(2.54f, false), 2.54f / 127.0f);
  EXPECT_TRUE(std::isnan(moe::detail::int8_scale(1.0f, true)));
}

// The vector row quantization gives what the scalar function gives, value by value, with
// the padding at zero (128) and an all-zero row at scale 0.
TEST(Int8Quant, RowsAgreeWithTheScalar) {
  Rng rng(7);
  for (int64_t cols : {1, 15, 16, 37, 100}) {
    SCOPED_TRACE(cols);
    const int64_t rows = 3, ld = (cols + 3) / 4 * 4 + 4;
    auto x = rng.vec(rows * cols, 3.0);
    for (int64_t c = 0; c < cols; ++c) x[2 * cols + c] = 0.0f;  // row 2 all zero
    x[1] = x[0] * 0.5f;  // values on rounding ties are likely somewhere
    std::vector<uint8_t> q(static_cast<size_t>(rows * ld), 7);
    std::vector<float> s(rows);
    moe::detail::quantize_rows_u8(q.data(), ld, s.data(), x.data(), cols, rows, cols);
    for (int64_t r = 0; r < rows; ++r) {
      float amax = 0.0f;
      for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(x[r * cols + c]));
      EXPECT_EQ(s[r], amax / 127.0f);
      for (int64_t c = 0; c < cols; ++c)
        ASSERT_EQ(int(q[r * ld + c]) - 128, moe::detail::quantize_int8(x[r * cols + c], s[r]))
            << r << "," << c;
      for (int64_t c = cols; c < ld; ++c) ASSERT_EQ(q[r * ld + c], 128);
    }
    EXPECT_EQ(s[2], 0.0f);
  }
}

// The kernel's sums are the exact sums of the same integers, scaled: checked against double
// loops over the quantized values the stack holds, on awkward sizes (row tiles of 1…6 and
// their tails, K off 4, N off 64).
TEST(Int8Gemm, MatchesTheExactSumOfTheSameIntegers) {
  Rng rng(11);
  for (int64_t M : {1, 2, 5, 6, 7, 13})
    for (int64_t K : {3, 64, 130})
      for (int64_t N : {1, 64, 97}) {
        SCOPED_TRACE(std::to_string(M) + "x" + std::to_string(K) + "x" + std::to_string(N));
        const int64_t E = 2;
        const auto W = rng.vec(E * K * N, 1.0);
        moe::detail::Int8Stack B;
        B.resize(E, K, N);
        for (int64_t e = 0; e < E; ++e) B.assign(e, W.data() + e * K * N);
        const auto x = rng.vec(M * K, 2.0);
        const int64_t lda = B.K4 * 4;
        std::vector<uint8_t> A(static_cast<size_t>(M * lda));
        std::vector<float> sx(M);
        moe::detail::quantize_rows_u8(A.data(), lda, sx.data(), x.data(), K, M, K);
        std::vector<float> C(static_cast<size_t>(M * N));
        moe::detail::gemm_u8s8_expert(C.data(), N, A.data(), lda, sx.data(), M, B, 1);
        double num = 0.0, den = 0.0;
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < N; ++j) {
            int64_t acc = 0;
            for (int64_t k = 0; k < K; ++k) {
              // The packed value is the quantization of W, column-wise.
              const int8_t w = B.at(1, k, j);
              ASSERT_EQ(w, moe::detail::quantize_int8(W[(K + k) * N + j], B.scale[B.NB * 64 + j]));
              acc += int64_t{A[i * lda + k] - 128} * w;
            }
            const double want = static_cast<double>(acc) * sx[i] * B.scale[B.NB * 64 + j];
            num = std::max(num, std::abs(C[i * N + j] - want));
            den = std::max(den, std::abs(want));
          }
        EXPECT_LE(num, 1e-6 * den);
      }
}

// Every expert kind and capacity policy (a third of the layer matrix, residual or not),
// against the float64 twin on the same quantized operands and against fp32.
TEST(LayerInt8, MatchesTheQuantizedOracleAndFp32) {
  int n = 0;
  double worst_ref = 0.0, worst_f32 = 0.0;
  for (const auto& cs : moe_test::all_cases()) {
    if (n++ % 3 != 0 || cs.noise != moe::Noise::none) continue;
    SCOPED_TRACE(cs.name());
    const int64_t T = 41, d = 48, E = cs.k == 1 ? 4 : 5;
    MoEConfig cfg = moe_test::config_of(cs, d, E, 80, 40, 31 + n);
    Pair p = make_pair(cfg, 600 + n);
    Rng rng(700 + n);
    const auto x = rng.vec(T * d, 1.0);
    const auto y32 = eval_forward(p.f32, x, T);
    const auto y8 = eval_forward(p.i8, x, T);
    ASSERT_EQ(p.f32.routing().indices, p.i8.routing().indices) << "the router is fp32 in both";

    using Ref = moe::detail::RefParams<double>;
    moe::detail::RefSaved<double> sv;
    std::vector<double> yr;
    const auto xd = moe_test::convert<double>(x);
    moe::detail::layer_forward_ref<double>(yr, sv, xd.data(), Ref::from(p.i8), p.i8.config(), T,
                                           false, nullptr);
    ASSERT_EQ(p.i8.routing().indices, sv.indices);
    const double er = rel_fro(y8, yr), ef = rel_fro(y8, y32);
    EXPECT_LE(er, 1e-3) << "against the quantized float64 twin";
    EXPECT_LE(ef, 2e-2) << "against fp32";
    EXPECT_GT(ef, 1e-5) << "int8 gave fp32's values: the int8 path did not run";
    worst_ref = std::max(worst_ref, er);
    worst_f32 = std::max(worst_f32, ef);
  }
  RecordProperty("worst_vs_oracle", std::to_string(worst_ref));
  RecordProperty("worst_vs_fp32", std::to_string(worst_f32));
}

// Shared experts (gated), the router family and expert choice, against the same twin.
TEST(LayerInt8, SharedExpertsRouterFamilyAndExpertChoice) {
  struct Variant {
    const char* name;
    void (*apply)(MoEConfig&);
  };
  const Variant variants[] = {
      {"shared_gated_mlp", [](MoEConfig& c) {
         c.n_shared_experts = 2;
         c.shared_gate = true;
         c.expert = moe::ExpertKind::mlp;
         c.activation = moe::Activation::gelu;
       }},
      {"shared_swiglu", [](MoEConfig& c) { c.n_shared_experts = 1; }},
      {"sigmoid_groups", [](MoEConfig& c) {
         c.router_kind = moe::RouterKind::sigmoid;
         c.renormalize = true;
         c.n_groups = 2;
         c.topk_groups = 1;
         c.scaling_factor = 2.5f;
       }},
      {"expert_choice_swiglu", [](MoEConfig& c) {
         c.router_kind = moe::RouterKind::expert_choice;
         c.capacity_factor = 1.0;
         c.aux_loss_kind = moe::AuxLossKind::none;
       }},
      {"expert_choice_linear", [](MoEConfig& c) {
         c.router_kind = moe::RouterKind::expert_choice;
         c.capacity_factor = 2.0;
         c.aux_loss_kind = moe::AuxLossKind::none;
         c.expert = moe::ExpertKind::linear_relu;
       }},
  };
  int i = 0;
  for (const Variant& v : variants) {
    SCOPED_TRACE(v.name);
    moe_test::Case cs{moe::ExpertKind::swiglu, moe::Activation::silu, 2, std::nullopt,
                      moe::DropPolicy::position, false, moe::Noise::none,
                      moe::NoiseScale::softplus};
    MoEConfig c32 = moe_test::config_of(cs, 40, 4, 72, 40, 17 + i);
    c32.z_alpha = 0.0f;
    v.apply(c32);
    Pair p = make_pair(c32, 800 + i++);
    const int64_t T = 24;
    Rng rng(900 + i);
    const auto x = rng.vec(T * c32.d_model, 1.0);
    const auto y32 = eval_forward(p.f32, x, T);
    const auto y8 = eval_forward(p.i8, x, T);
    const MoEConfig& c8 = p.i8.config();
    using Ref = moe::detail::RefParams<double>;
    std::vector<double> yr;
    const auto xd = moe_test::convert<double>(x);
    if (c8.router_kind == moe::RouterKind::expert_choice) {
      moe::detail::ExpertChoiceRefSaved<double> sv;
      moe::detail::expert_choice_forward_ref<double>(yr, sv, xd.data(), Ref::from(p.i8), c8, T,
                                                     false, nullptr);
      ASSERT_EQ(p.i8.routing().ec_tokens, sv.tokens);
    } else {
      moe::detail::RefSaved<double> sv;
      moe::detail::layer_forward_ref<double>(yr, sv, xd.data(), Ref::from(p.i8), c8, T, false,
                                             nullptr);
      ASSERT_EQ(p.i8.routing().indices, sv.indices);
    }
    EXPECT_LE(rel_fro(y8, yr), 1e-3) << "against the quantized float64 twin";
    EXPECT_LE(rel_fro(y8, y32), 2e-2) << "against fp32";
    EXPECT_NE(y8, y32);
  }
}

// Evaluation only: a training forward and a backward are refused, naming the field.
TEST(LayerInt8, TrainingIsAnError) {
  moe_test::Case cs{moe::ExpertKind::mlp, moe::Activation::relu, 2, std::nullopt,
                    moe::DropPolicy::position, false, moe::Noise::none, moe::NoiseScale::softplus};
  MoEConfig cfg = moe_test::config_of(cs, 16, 4, 32, 16, 3);
  cfg.precision = Precision::int8;
  MoELayer L(cfg);
  const int64_t T = 5;
  std::vector<float> x(T * 16, 0.5f), y(T * 16), dx(T * 16);
  moe::ForwardOptions opt;
  opt.training = true;
  try {
    L.forward(y.data(), x.data(), T, opt);
    FAIL() << "a training forward in int8 was accepted";
  } catch (const moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("precision"), std::string::npos) << e.what();
  }
  opt.training = false;
  L.forward(y.data(), x.data(), T, opt);
  try {
    L.backward(dx.data(), y.data());
    FAIL() << "a backward in int8 was accepted";
  } catch (const moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("precision"), std::string::npos) << e.what();
  }
  cfg.d_ff = moe::detail::kInt8MaxWidth + 1;
  EXPECT_THROW(cfg.validate(), moe::Error);
}

// The quantized copies follow the fp32 masters (param() marks them stale), and quantizing one
// expert matrix from a pointer (assign: the hook for layers that hold no masters) gives the
// bytes that quantizing from the masters gives.
TEST(LayerInt8, CopiesFollowTheMastersAndAssignMatchesPrepare) {
  moe_test::Case cs{moe::ExpertKind::swiglu, moe::Activation::silu, 2, std::nullopt,
                    moe::DropPolicy::position, false, moe::Noise::none, moe::NoiseScale::softplus};
  MoEConfig cfg = moe_test::config_of(cs, 24, 4, 40, 24, 5);
  Pair p = make_pair(cfg, 5);
  const int64_t T = 9;
  Rng rng(6);
  const auto x = rng.vec(T * 24, 1.0);
  const auto before = eval_forward(p.i8, x, T);
  for (float& v : p.i8.param("W2").data) v *= -2.0f;
  const auto after = eval_forward(p.i8, x, T);
  std::vector<double> yr;
  moe::detail::RefSaved<double> sv;
  const auto xd = moe_test::convert<double>(x);
  moe::detail::layer_forward_ref<double>(yr, sv, xd.data(),
                                         moe::detail::RefParams<double>::from(p.i8),
                                         p.i8.config(), T, false, nullptr);
  EXPECT_NE(before, after);
  EXPECT_LE(rel_fro(after, yr), 1e-3);

  const auto s = moe::detail::ExpertShape::of(cfg);
  const moe::MoELayer& L = p.f32;
  const moe::detail::ExpertWeights w{L.param("W1").ptr(), nullptr, L.param("W2").ptr(), nullptr,
                                     L.param("W3").ptr()};
  moe::detail::ExpertWeightsInt8 a, b;
  a.prepare(w, s);
  b.shape(s);
  for (int64_t e = 0; e < s.E; ++e) {
    b.assign("W1", e, w.W1 + e * s.d * s.F);
    b.assign("W2", e, w.W2 + e * s.F * s.Do);
    b.assign("W3", e, w.W3 + e * s.d * s.F);
  }
  EXPECT_EQ(a.W1.q, b.W1.q);
  EXPECT_EQ(a.W2.scale, b.W2.scale);
  EXPECT_EQ(a.W3.colsum, b.W3.colsum);
  // What a stack holds: a byte a weight (K padded to 64, a whole AMX tile; N to 64) and 8
  // bytes a column (scale, column sum): about a quarter of fp32 at real widths.
  moe::detail::Int8Stack big;
  big.resize(2, 256, 512);
  EXPECT_EQ(big.bytes(), 2 * (256 * 512 + 8 * 512));
  EXPECT_LT(big.bytes(), 4 * 2 * 256 * 512 / 3.8);
  big.resize(1, 5, 65);  // padded: K to 64 (K4 = 16 groups of 4), two blocks of 64 columns
  EXPECT_EQ(big.bytes(), 64 * 128 + 8 * 128);
  // Without masters (hold_only), the assigned stacks are the weights: invalidate() keeps them.
  moe::detail::ExpertWeightsInt8 c;
  c.hold_only(s);
  for (int64_t e = 0; e < s.E; ++e) c.assign("W2", e, w.W2 + e * s.F * s.Do);
  c.invalidate();
  EXPECT_TRUE(c.ready);
  c.prepare(moe::detail::ExpertWeights{}, s);  // must not read the (absent) masters
  EXPECT_EQ(c.W2.q, a.W2.q);
  EXPECT_THROW(b.assign("W4", 0, w.W1), moe::Error);
  EXPECT_THROW(b.assign("W1", s.E, w.W1), moe::Error);
}

// Checkpoints of an int8 layer: the expert matrices as I8 with F32 per-column scales, the
// precision in the config; loading back gives the same quantized weights (so the same
// outputs to the scales' last bit); loading into an fp32 layer is refused by name.
TEST(LayerInt8, CheckpointHoldsI8WeightsAndScales) {
  moe_test::Case cs{moe::ExpertKind::mlp, moe::Activation::gelu, 2, std::nullopt,
                    moe::DropPolicy::position, false, moe::Noise::none, moe::NoiseScale::softplus};
  MoEConfig cfg = moe_test::config_of(cs, 20, 4, 36, 20, 8);
  cfg.n_shared_experts = 1;
  Pair p = make_pair(cfg, 8);
  moe_test::ScratchDir dir;
  const std::string path = dir.file("int8.safetensors");
  moe::save_checkpoint(p.i8, path);
  const moe::SafetensorsFile f = moe::load_safetensors(path);
  for (const char* n : {"W1", "W2", "Ws1", "Ws2"}) {
    SCOPED_TRACE(n);
    const moe::NamedTensor* t = f.find(n);
    const moe::NamedTensor* s = f.find(std::string(n) + ".scale");
    ASSERT_TRUE(t && s);
    EXPECT_EQ(t->dtype, "I8");
    EXPECT_EQ(s->dtype, "F32");
    EXPECT_EQ(s->tensor.shape, (std::vector<int64_t>{t->tensor.shape[0], t->tensor.shape[2]}));
    float qmax = 0.0f;
    for (float v : t->tensor.data) qmax = std::max(qmax, std::fabs(v));
    EXPECT_EQ(qmax, 127.0f);
  }
  EXPECT_EQ(f.find("b1")->dtype, "F32");
  EXPECT_EQ(moe::read_checkpoint_config(path).precision, Precision::int8);

  MoEConfig c8 = cfg;
  c8.precision = Precision::int8;
  MoELayer back(c8);
  moe::load_checkpoint(back, path);
  const int64_t T = 7;
  Rng rng(9);
  const auto x = rng.vec(T * 20, 1.0);
  const auto y0 = eval_forward(p.i8, x, T), y1 = eval_forward(back, x, T);
  EXPECT_LE(rel_fro(y1, y0), 1e-6);
  try {
    moe::load_checkpoint(p.f32, path);
    FAIL() << "an int8 checkpoint loaded into an fp32 layer";
  } catch (const moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("holds int8 weights"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("precision 'fp32'"), std::string::npos) << e.what();
  }
  // I8 holds integers in [-128, 127] only.
  moe::Tensor bad({2});
  bad.data = {1.0f, 0.5f};
  EXPECT_THROW(moe::save_safetensors(dir.file("bad.safetensors"), {{"q", &bad}}, {}, {"q"}),
               moe::Error);
}

// Exact integer sums and per-row, per-column scales: the same bits on 1 and 2 threads (sizes
// large enough that every parallel region splits).
TEST(LayerInt8, OneAndTwoThreadsBitIdentical) {
  moe_test::Case cs{moe::ExpertKind::swiglu, moe::Activation::silu, 2, std::nullopt,
                    moe::DropPolicy::position, false, moe::Noise::none, moe::NoiseScale::softplus};
  MoEConfig cfg = moe_test::config_of(cs, 256, 4, 320, 256, 12);
  cfg.n_shared_experts = 1;
  Pair p = make_pair(cfg, 12);
  const int64_t T = 200;
  Rng rng(13);
  const auto x = rng.vec(T * 256, 1.0);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto y1 = eval_forward(p.i8, x, T);
  omp_set_num_threads(2);
  const auto y2 = eval_forward(p.i8, x, T);
  omp_set_num_threads(saved);
  EXPECT_EQ(y1, y2);
  EXPECT_LE(rel_fro(y1, eval_forward(p.f32, x, T)), 2e-2);
}

// Held memory: after drop_masters() an int8 layer holds its expert matrices only as int8
// bytes and scales (the fp32 masters are freed), and gives the same output; a layer built
// without masters (LayerOptions, what from_pretrained builds) and filled with
// set_expert_matrix() holds the same and gives the same bits. Heap bytes from mallinfo2 (from
// the sanitizer's allocator in the ASan build).
TEST(LayerInt8, WithoutMastersHoldsOnlyInt8BytesAndScales) {
  const auto heap = [] {
#if defined(__SANITIZE_ADDRESS__)
    // ASan's allocator replaces malloc's (mallinfo2 reads zeros there): ask it instead.
    return static_cast<int64_t>(__sanitizer_get_current_allocated_bytes());
#else
    const struct mallinfo2 mi = mallinfo2();
    return static_cast<int64_t>(mi.uordblks + mi.hblkhd);
#endif
  };
  moe_test::Case cs{moe::ExpertKind::swiglu, moe::Activation::silu, 2, std::nullopt,
                    moe::DropPolicy::position, false, moe::Noise::none, moe::NoiseScale::softplus};
  MoEConfig cfg = moe_test::config_of(cs, 256, 4, 512, 256, 21);
  cfg.n_shared_experts = 1;
  cfg.precision = Precision::int8;
  const int64_t d = 256, F = 512, stacks = 4 + 1;  // routed + shared experts
  const int64_t master_bytes = 4 * stacks * 3 * d * F;
  // W1, W3 (d × F) and W2 (F × d): widths are multiples of 64 and 4, so no padding.
  const int64_t int8_bytes = stacks * (3 * d * F + 8 * (2 * F + d));
  const int64_t T = 11;
  Rng rng(22);
  const auto x = rng.vec(T * d, 1.0);

  MoELayer L(cfg);
  moe_test::randomize(L, rng);
  std::vector<std::vector<float>> mats;  // the expert matrices, for the lean layer below
  for (const char* n : {"W1", "W2", "W3", "Ws1", "Ws2", "Ws3"}) mats.push_back(L.param(n).data);
  const auto y0 = eval_forward(L, x, T);
  const int64_t before = heap();
  L.drop_masters();
  const int64_t freed = before - heap();
  EXPECT_FALSE(L.holds_masters());
  for (const auto& n : L.parameter_names()) EXPECT_TRUE(n[0] != 'W' || n == "W_g") << n;
  EXPECT_NEAR(static_cast<double>(freed), static_cast<double>(master_bytes), 0.02 * master_bytes);
  EXPECT_EQ(eval_forward(L, x, T), y0) << "dropping the masters changed the output";

  const int64_t h0 = heap();
  moe::LayerOptions o;
  o.masters = false;
  MoELayer lean(cfg, o);
  const int64_t held = heap() - h0;  // int8 stacks, router and biases (none here), shared gate
  EXPECT_GE(held, int8_bytes);
  EXPECT_LE(held, int8_bytes + 4 * d * 8 + 65536) << "more than the int8 bytes and scales";
  for (const auto& n : L.parameter_names()) lean.param(n).data = L.param(n).data;
  const char* names[] = {"W1", "W2", "W3", "Ws1", "Ws2", "Ws3"};
  for (int i = 0; i < 6; ++i) {
    const int64_t E = names[i][1] == 's' ? 1 : 4, per = static_cast<int64_t>(mats[i].size()) / E;
    for (int64_t e = 0; e < E; ++e) lean.set_expert_matrix(names[i], e, mats[i].data() + e * per);
  }
  EXPECT_EQ(eval_forward(lean, x, T), y0) << "set_expert_matrix gave other int8 weights";
}
