// docs/errors.md, C++ column: one test per row, named after the row (R1, L3, ...). Each checks
// that the public entry point throws moe::Error (never another exception, never a crash), that
// the message names the argument and the bad value, and that it is one of the messages of the
// test's row in docs/errors.md (read as tests/python/errors_doc.py reads it).
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "moe/moe.hpp"

namespace {

// A message pattern of the table as a regex: `<name>` any value, `[..]` or a bracketed shape
// in letters (`[E, d, d_ff]`) any shape, `…` or `...` any text, the rest literal.
std::string pattern_regex(const std::string& t) {
  const std::string ellipsis = "\xE2\x80\xA6";
  std::string out;
  for (size_t i = 0; i < t.size();) {
    if (t.compare(i, 3, "...") == 0 || t.compare(i, 3, ellipsis) == 0) {
      out += ".*?";
      i += 3;
      continue;
    }
    if (t[i] == '<' || t[i] == '[') {
      const char close = t[i] == '<' ? '>' : ']';
      size_t j = i + 1;
      while (j < t.size() && t[j] != close && t[j] != t[i]) ++j;
      const std::string inner = j < t.size() && t[j] == close ? t.substr(i + 1, j - i - 1) : "";
      bool shape = false;
      for (char c : inner) shape = shape || std::isalpha(static_cast<unsigned char>(c)) || c == '.';
      if (t[i] == '<' && !inner.empty()) {
        out += ".+?";
        i = j + 1;
        continue;
      }
      if (t[i] == '[' && shape) {
        out += inner[0] == '<' ? "\\[.+?\\]" : "\\[[^\\]]*\\]";
        i = j + 1;
        continue;
      }
    }
    if (std::string("\\^$.|?*+()[]{}").find(t[i]) != std::string::npos) out += '\\';
    out += t[i++];
  }
  return out;
}

// The code spans of row `row`'s cells after its Case cell.
std::vector<std::string> errors_md_row(const std::string& row) {
  std::ifstream in(MOE_ERRORS_MD);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("| " + row + " |", 0) != 0) continue;
    size_t cell = 0, pos = 0;
    for (int bars = 0; bars < 2 && pos != std::string::npos; ++bars) pos = line.find('|', pos + 1);
    cell = pos == std::string::npos ? line.size() : pos;
    std::vector<std::string> spans;
    for (size_t a = line.find('`', cell); a != std::string::npos; a = line.find('`', a + 1)) {
      const size_t b = line.find('`', a + 1);
      if (b == std::string::npos) break;
      spans.push_back(line.substr(a + 1, b - a - 1));
      a = b;
    }
    return spans;
  }
  return {};
}

// Row `row`, else the running test's (R1 of R1_KOutsideOneToE), must show msg.
void expect_in_errors_md(const std::string& msg, const char* row_or_null) {
  const std::string test = ::testing::UnitTest::GetInstance()->current_test_info()->name();
  const std::string row = row_or_null ? row_or_null : test.substr(0, test.find('_'));
  const auto spans = errors_md_row(row);
  ASSERT_FALSE(spans.empty()) << "docs/errors.md has no row " << row;
  for (const std::string& t : spans)
    if (std::regex_match(msg, std::regex(pattern_regex(t)))) return;
  std::ostringstream shown;
  for (const std::string& t : spans) shown << "\n  " << t;
  ADD_FAILURE() << "docs/errors.md row " << row << " does not show this message:\n  " << msg
                << "\nthe row's messages:" << shown.str();
}

using moe::MoEConfig;
using moe::MoELayer;
using moe::RouterConfig;

// Runs f, which must throw moe::Error whose message contains every one of `parts`.
// The message must also be one of its docs/errors.md row's: the test's, or `row`.
template <typename F>
void expect_error(F&& f, std::initializer_list<const char*> parts, const char* row = nullptr) {
  try {
    f();
  } catch (const moe::Error& e) {
    const std::string msg = e.what();
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg;
    expect_in_errors_md(msg, row);
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected moe::Error, got another exception: " << e.what();
    return;
  }
  ADD_FAILURE() << "expected moe::Error, nothing was thrown";
}

RouterConfig router_cfg(int64_t d = 3, int64_t E = 4, int64_t k = 2) {
  RouterConfig c;
  c.d_model = d;
  c.n_experts = E;
  c.k = k;
  return c;
}

MoEConfig layer_cfg(int64_t d = 3, int64_t E = 4, int64_t k = 2) {
  MoEConfig c;
  c.d_model = d;
  c.n_experts = E;
  c.k = k;
  c.d_ff = 5;
  return c;
}

// Routes T tokens of x (T, d) with W_g all ones, no noise.
void route(const std::vector<float>& x, const RouterConfig& c, int64_t T, bool training = false) {
  std::vector<float> W(static_cast<size_t>(c.d_model * c.n_experts), 1.0f);
  moe::RouterParams p;
  p.W_g = W.data();
  moe::RouterState s;
  moe::router_forward(s, x.data(), p, c, T, training, {});
}

// --- Router --------------------------------------------------------------------------------

TEST(Errors, R1_KOutsideOneToE) {
  expect_error([] { router_cfg(3, 4, 0).validate(); }, {"k: must be in 1..4", "got 0"});
  expect_error([] { router_cfg(3, 4, 5).validate(); }, {"k: must be in 1..4", "got 5"});
  std::vector<float> h(8, 0.0f);
  expect_error([&] { moe::noisy_top_k_gating(h.data(), 2, 4, 5, 1.0f, true, 0); },
               {"k: must be in 1..4", "got 5"});
  expect_error([] { MoELayer L(layer_cfg(3, 4, 0)); }, {"k: must be in 1..4", "got 0"});
}

TEST(Errors, R2_ZeroExperts) {
  expect_error([] { router_cfg(3, 0, 1).validate(); }, {"n_experts: must be at least 1", "got 0"});
  expect_error([] { MoELayer L(layer_cfg(3, 0, 1)); }, {"n_experts: must be at least 1"});
  expect_error([] { moe::noisy_top_k_gating(nullptr, 1, 0, 1, 1.0f, true, 0); },
               {"n_experts: must be at least 1"});
}

TEST(Errors, R3_ZeroModelWidth) {
  expect_error([] { router_cfg(0, 4, 1).validate(); }, {"d_model: must be at least 1", "got 0"});
  expect_error([] { MoELayer L(layer_cfg(-2, 4, 1)); }, {"d_model: must be at least 1", "got -2"});
}

TEST(Errors, R4_NegativeOrNonFiniteNoiseStddev) {
  auto c = router_cfg();
  c.noise_stddev = -0.5f;
  expect_error([&] { c.validate(); }, {"noise_stddev: must be finite and >= 0", "-0.5"});
  c.noise_stddev = std::numeric_limits<float>::infinity();
  expect_error([&] { c.validate(); }, {"noise_stddev"});
  std::vector<float> h(4, 0.0f);
  expect_error([&] { moe::noisy_top_k_gating(h.data(), 1, 4, 1, -1.0f, true, 0); },
               {"noise_stddev: must be finite and >= 0"});
  auto lc = layer_cfg();
  lc.noise_stddev = -1.0f;
  expect_error([&] { MoELayer L(lc); }, {"noise_stddev"});
}

TEST(Errors, R5_UnknownNoiseMode) {
  expect_error([] { moe::parse_noise("gaussian"); },
               {"noise: unknown mode 'gaussian'", "none, fixed or learned"});
}

TEST(Errors, R6_UnknownNoiseScale) {
  expect_error([] { moe::parse_noise_scale("exp"); },
               {"noise_scale: unknown value 'exp'", "softplus or linear"});
}

TEST(Errors, R7_UnknownTieBreak) {
  expect_error([] { moe::parse_tie_break("random"); },
               {"tie_break: unknown value 'random'", "high, low or torch"});
}

TEST(Errors, R8_NonFiniteInputNamesTheToken) {
  const auto c = router_cfg(3, 4, 2);
  std::vector<float> x(5 * 3, 0.5f);
  x[3 * 3 + 1] = std::nanf("");
  expect_error([&] { route(x, c, 5); }, {"x: non-finite value at token 3"});
  x[3 * 3 + 1] = 0.5f;
  x[1 * 3 + 2] = -std::numeric_limits<float>::infinity();
  expect_error([&] { route(x, c, 5); }, {"x: non-finite value at token 1"});
  // The layer reports the same, through its router.
  MoELayer L(layer_cfg(3, 4, 2));
  std::vector<float> y(5 * 3);
  expect_error([&] { L.forward(y.data(), x.data(), 5); }, {"non-finite value at token 1"});
}

TEST(Errors, R9_NonFiniteLogitsNameTheToken) {
  // Finite x whose product with W_g (all ones) overflows float32 at token 2.
  const auto c = router_cfg(3, 4, 2);
  std::vector<float> x(4 * 3, 1.0f);
  for (int i = 0; i < 3; ++i) x[2 * 3 + i] = 3e38f;
  expect_error([&] { route(x, c, 4); }, {"router logits h: non-finite value at token 2"});
  std::vector<float> h(2 * 4, 0.0f);
  h[4 + 2] = std::numeric_limits<float>::infinity();
  expect_error([&] { moe::noisy_top_k_gating(h.data(), 2, 4, 1, 0.0f, false, 0); },
               {"logits: non-finite value at token 1"});
}

TEST(Errors, R10_NonFiniteNoisyLogitsNameTheToken) {
  // h is finite (3e38) but h + σ·ε overflows for a large σ.
  std::vector<float> h{3e38f, 3e38f, 3e38f, 3e38f};
  expect_error([&] { moe::noisy_top_k_gating(h.data(), 1, 4, 1, 3e38f, true, 1); },
               {"noisy logits", "non-finite value at token 0"});
}

TEST(Errors, R11_MissingRouterParameters) {
  auto c = router_cfg();
  std::vector<float> x(3, 1.0f), W(12, 1.0f);
  moe::RouterState s;
  moe::RouterParams p;
  expect_error([&] { moe::router_forward(s, x.data(), p, c, 1, false, {}); }, {"W_g: missing"});
  p.W_g = W.data();
  c.use_bias = true;
  expect_error([&] { moe::router_forward(s, x.data(), p, c, 1, false, {}); }, {"b_g: missing"});
  c.use_bias = false;
  c.noise = moe::Noise::learned;
  expect_error([&] { moe::router_forward(s, x.data(), p, c, 1, true, {}); },
               {"W_noise: missing"});
}

TEST(Errors, R12_NegativeTokenCount) {
  std::vector<float> x(3, 1.0f);
  expect_error([&] { route(x, router_cfg(), -1); }, {"T: must be >= 0", "got -1"});
  MoELayer L(layer_cfg());
  expect_error([&] { L.forward(x.data(), x.data(), -3); }, {"T: must be >= 0", "got -3"});
}

TEST(Errors, R13_EmptyBatchIsAnEmptyResult) {
  moe::RouterState s;
  std::vector<float> W(12, 1.0f);
  moe::RouterParams p;
  p.W_g = W.data();
  moe::router_forward(s, nullptr, p, router_cfg(), 0, true, {});
  EXPECT_EQ(s.T, 0);
  EXPECT_TRUE(s.indices.empty());
  EXPECT_TRUE(s.dense_gates().empty());
  EXPECT_TRUE(moe::noisy_top_k_gating(nullptr, 0, 4, 2, 1.0f, true, 0).empty());
  MoELayer L(layer_cfg());
  L.forward(nullptr, nullptr, 0);
  EXPECT_EQ(L.stats().tokens, 0);
  L.backward(nullptr, nullptr);
  EXPECT_EQ(moe::load_balancing_loss(nullptr, nullptr, nullptr, 0, 2, 4, 0.01, false), 0.0);
}

// --- Layer configuration -------------------------------------------------------------------

TEST(Errors, L1_CapacityFactorNotPositive) {
  for (double cf : {0.0, -1.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    auto c = layer_cfg();
    c.capacity_factor = cf;
    expect_error([&] { MoELayer L(c); }, {"capacity_factor: must be finite and > 0"});
  }
}

TEST(Errors, L2_UnknownExpertKind) {
  expect_error([] { moe::parse_expert_kind("ffn"); },
               {"expert: unknown kind 'ffn'", "linear_relu, mlp, swiglu or clamped_swiglu"});
}

TEST(Errors, L3_UnknownActivation) {
  expect_error([] { moe::parse_activation("tanh"); },
               {"activation: unknown value 'tanh'", "relu, gelu or silu"});
}

TEST(Errors, L4_UnknownDropPolicy) {
  expect_error([] { moe::parse_drop_policy("random_order"); },
               {"drop_policy: unknown value 'random_order'"});
}

TEST(Errors, L5_NegativeWidths) {
  auto c = layer_cfg();
  c.d_ff = -1;
  expect_error([&] { MoELayer L(c); }, {"d_ff: must be >= 0", "got -1"});
  c = layer_cfg();
  c.d_out = -4;
  expect_error([&] { MoELayer L(c); }, {"d_out: must be >= 0", "got -4"});
}

TEST(Errors, L6_ResidualNeedsSquareLayer) {
  auto c = layer_cfg(3, 4, 2);
  c.residual = true;
  c.d_out = 5;
  expect_error([&] { MoELayer L(c); }, {"residual: needs d_out == d_model"});
}

TEST(Errors, L7_NegativeLossWeightsAndInitStd) {
  auto c = layer_cfg();
  c.aux_alpha = -0.1f;
  expect_error([&] { MoELayer L(c); }, {"aux_alpha: must be finite and >= 0"});
  c = layer_cfg();
  c.z_alpha = std::nanf("");
  expect_error([&] { MoELayer L(c); }, {"z_alpha: must be finite and >= 0"});
  c = layer_cfg();
  c.router_init_std = -1.0f;
  expect_error([&] { MoELayer L(c); }, {"router_init_std: must be finite and >= 0"});
}

TEST(Errors, L8_DimensionsTooLarge) {
  auto c = layer_cfg();
  c.d_model = int64_t{1} << 40;
  expect_error([&] { MoELayer L(c); }, {"d_model: too large"});
  c = layer_cfg();
  c.d_ff = int64_t{1} << 30;
  expect_error([&] { MoELayer L(c); }, {"d_ff: too large"});
  c = layer_cfg();
  c.n_experts = int64_t{1} << 40;
  expect_error([&] { MoELayer L(c); }, {"n_experts: too large"});
}

TEST(Errors, L9_ParameterCountOverflowsOrCannotBeAllocated) {
  // Every width is allowed on its own; d_model·d_ff·E overflows int64.
  auto c = layer_cfg();
  c.d_model = int64_t{1} << 24;
  c.d_ff = int64_t{1} << 24;
  c.n_experts = int64_t{1} << 30;
  expect_error([&] { MoELayer L(c); }, {"too large"});
  // No overflow, but 2^44 floats (64 TiB) per expert tensor: no machine has that.
  c.n_experts = int64_t{1} << 14;
  c.d_model = int64_t{1} << 15;
  c.d_ff = int64_t{1} << 15;
  expect_error([&] { MoELayer L(c); }, {"too large"});
}

TEST(Errors, L10_ParameterAssignedWithWrongShape) {
  MoELayer L(layer_cfg(3, 4, 2));
  L.param("W1") = moe::Tensor({4, 3});
  std::vector<float> x(3, 1.0f), y(3);
  expect_error([&] { L.forward(y.data(), x.data(), 1); },
               {"W1: expected shape [4, 3, 5]", "got [4, 3]"});
  // A shape that matches but data of the wrong length (a hand-edited Tensor).
  MoELayer L2(layer_cfg(3, 4, 2));
  L2.param("W_g").data.resize(5);
  expect_error([&] { L2.forward(y.data(), x.data(), 1); }, {"W_g: expected shape [3, 4]"});
}

TEST(Errors, L11_UnknownParameterName) {
  MoELayer L(layer_cfg());
  expect_error([&] { L.param("W9"); }, {"parameter: unknown name 'W9'", "W_g"});
  expect_error([&] { L.grad("b3"); }, {"parameter: unknown name 'b3'"});
  auto c = layer_cfg();
  c.expert = moe::ExpertKind::swiglu;
  MoELayer S(c);
  expect_error([&] { S.param("b1"); }, {"unknown name 'b1'"});  // swiglu has no biases
}

TEST(Errors, L12_BackwardBeforeForward) {
  MoELayer L(layer_cfg());
  std::vector<float> dx(3), dy(3);
  expect_error([&] { L.backward(dx.data(), dy.data()); }, {"backward: called before forward"});
  // A forward that failed leaves no state to go back through either.
  std::vector<float> x(3, std::nanf("")), y(3);
  expect_error([&] { L.forward(y.data(), x.data(), 1); }, {"non-finite"}, "R8");
  expect_error([&] { L.backward(dx.data(), dy.data()); }, {"backward: called before forward"});
}

TEST(Errors, L13_NullBuffers) {
  MoELayer L(layer_cfg());
  std::vector<float> x(3, 1.0f), y(3);
  expect_error([&] { L.forward(nullptr, x.data(), 1); }, {"forward: x and y must not be null"});
  L.forward(y.data(), x.data(), 1);
  expect_error([&] { L.backward(nullptr, y.data()); }, {"backward: dx and dy must not be null"});
}

TEST(Errors, L14_TooManyTokensForOneBatch) {
  MoELayer L(layer_cfg(3, 4, 2));
  std::vector<float> x(3, 1.0f), y(3);
  // Refused before x is read: T·k does not fit the int32 slot indices.
  expect_error([&] { L.forward(y.data(), x.data(), int64_t{1} << 31); },
               {"T: too many tokens for one batch"});
}

TEST(Errors, L15_BatchTooLargeForMemory) {
  auto c = layer_cfg(64, 4, 1);
  c.d_ff = 256;
  MoELayer L(c);
  std::vector<float> x(64, 1.0f), y(64);
  // About 4 TiB of workspace: refused before x (one token here) is read.
  expect_error([&] { L.forward(y.data(), x.data(), int64_t{1} << 30); },
               {"forward: workspace for the batch"});
}

TEST(Errors, L16_Precision) {
  expect_error([] { moe::parse_precision("fp16"); },
               {"precision: unknown value 'fp16' (expected fp32, bf16, int8, int4, mxfp4 or fp8)"});
  auto c = layer_cfg(8, 4, 2);
  c.precision = moe::Precision::int8;
  c.d_ff = 65537;
  expect_error([&] { MoELayer L(c); },
               {"precision: 'int8' needs d_model, d_ff and d_out <= 65536, got 8, 65537, 8"});
  c.d_ff = 16;
  MoELayer L(c);
  std::vector<float> x(8), y(8);
  expect_error([&] { L.forward(y.data(), x.data(), 1); },
               {"precision: 'int8' is for evaluation only"});
}

// --- Losses --------------------------------------------------------------------------------

TEST(Errors, X1_LossIndicesOutOfRange) {
  std::vector<int32_t> idx{0, 4};
  std::vector<float> probs(4, 0.25f);
  expect_error([&] { moe::load_balancing_loss(nullptr, idx.data(), probs.data(), 1, 2, 4, 0.01,
                                              false); },
               {"indices: expert 4"});
  idx[1] = -1;
  expect_error([&] { moe::load_balancing_loss(nullptr, idx.data(), probs.data(), 1, 2, 4, 0.01,
                                              false); },
               {"indices: expert -1"});
}

TEST(Errors, X2_LossSizes) {
  std::vector<int32_t> idx{0};
  std::vector<float> probs(4, 0.25f);
  expect_error([&] { moe::load_balancing_loss(nullptr, idx.data(), probs.data(), 1, 5, 4, 0.01,
                                              false); },
               {"k: must be in 1..4"});
  expect_error([&] { moe::load_balancing_loss(nullptr, idx.data(), probs.data(), 1, 1, 4,
                                              std::nan(""), false); },
               {"alpha: must be finite"});
  expect_error([&] { moe::router_z_loss(nullptr, probs.data(), 1, 0, 1.0); },
               {"n_experts: must be at least 1"});
}

}  // namespace

// --- rows only C++ reaches (docs/errors.md) ---------------------------------------------------

TEST(Errors, M2_SetExpertMatrixNames) {
  MoELayer L(layer_cfg(3, 4, 2));
  std::vector<float> w(3 * 5, 0.0f);
  expect_error([&] { L.set_expert_matrix("W_g", 0, w.data()); },
               {"set_expert_matrix: 'W_g' is not an expert matrix of this layer"});
  expect_error([&] { L.set_expert_matrix("W1", 4, w.data()); },
               {"set_expert_matrix: expert 4 of W1 out of range 0..3"});
}
