#include "train_task.hpp"

#include <cmath>

#include "common/check.hpp"

namespace moe::cli {

namespace {

// SplitMix64: small, fast and good enough to draw the task from; seeded per batch so that
// every batch is a pure function of (seed, batch index).
struct Rng {
  uint64_t s;
  Rng(uint64_t seed, uint64_t stream) : s(seed) {
    s = next() + stream;
    s = next();
  }
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double normal() {  // Box–Muller; the second value is dropped to keep the stream simple
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
};

// Streams other than the training batches (whose stream is the batch index, < 2^63).
constexpr uint64_t kStreamTask = (uint64_t{1} << 63) + 1;   // the teachers and centres
constexpr uint64_t kStreamCalib = (uint64_t{1} << 63) + 2;  // target standardisation
constexpr uint64_t kStreamEval = (uint64_t{1} << 63) + 3;   // the evaluation batch

}  // namespace

void TaskConfig::validate() const {
  MOE_REQUIRE(d_in >= 1, "d_model: must be at least 1, got ", d_in);
  MOE_REQUIRE(d_out >= 1, "d_target: must be at least 1, got ", d_out);
  MOE_REQUIRE(regimes >= 1, "regimes: must be at least 1, got ", regimes);
  MOE_REQUIRE(teacher_hidden >= 1, "teacher_hidden: must be at least 1, got ", teacher_hidden);
  MOE_REQUIRE(std::isfinite(center_scale) && center_scale >= 0, "center_scale: bad value");
  MOE_REQUIRE(std::isfinite(spread) && spread >= 0, "spread: bad value");
}

RegimeTask::RegimeTask(const TaskConfig& cfg) : cfg_(cfg) {
  cfg.validate();
  const int64_t R = cfg.regimes, d = cfg.d_in, H = cfg.teacher_hidden, Do = cfg.d_out;
  Rng rng(cfg.seed, kStreamTask);
  centers_.resize(static_cast<size_t>(R * d));
  for (auto& c : centers_) c = static_cast<float>(cfg.center_scale * rng.normal());
  // Teacher weights scaled so that pre-activations are O(1) over a regime's inputs.
  const double sa = 1.5 / std::sqrt(static_cast<double>(d) * (cfg.spread * cfg.spread + 1e-12));
  A_.resize(static_cast<size_t>(R * d * H));
  a_.resize(static_cast<size_t>(R * H));
  B_.resize(static_cast<size_t>(R * H * Do));
  for (auto& v : A_) v = static_cast<float>(sa * rng.normal());
  for (auto& v : B_) v = static_cast<float>(rng.normal() / std::sqrt(static_cast<double>(H)));
  // Centre each hidden unit on its regime (bias = -centre·A) so that the teacher varies
  // within the regime instead of saturating at its centre.
  for (int64_t r = 0; r < R; ++r)
    for (int64_t h = 0; h < H; ++h) {
      double acc = 0.0;
      for (int64_t i = 0; i < d; ++i) acc += centers_[r * d + i] * A_[(r * d + i) * H + h];
      a_[r * H + h] = static_cast<float>(-acc + 0.5 * rng.normal());
    }
  // Standardise the targets over a calibration batch.
  const int64_t Tc = 8192;
  std::vector<float> x(static_cast<size_t>(Tc * d)), y(static_cast<size_t>(Tc * Do));
  std::vector<int32_t> reg(static_cast<size_t>(Tc));
  sample(x.data(), y.data(), reg.data(), Tc, kStreamCalib);
  double s = 0.0, s2 = 0.0;
  for (float v : y) {
    s += v;
    s2 += static_cast<double>(v) * v;
  }
  const double n = static_cast<double>(y.size());
  y_mean_ = s / n;
  y_scale_ = 1.0 / std::sqrt(std::max(s2 / n - y_mean_ * y_mean_, 1e-12));
}

void RegimeTask::teacher(float* y, const float* x, int32_t r) const {
  const int64_t d = cfg_.d_in, H = cfg_.teacher_hidden, Do = cfg_.d_out;
  for (int64_t c = 0; c < Do; ++c) y[c] = 0.0f;
  for (int64_t h = 0; h < H; ++h) {
    double acc = a_[r * H + h];
    for (int64_t i = 0; i < d; ++i) acc += x[i] * A_[(r * d + i) * H + h];
    const float z = static_cast<float>(std::tanh(acc));
    const float* b = &B_[(r * H + h) * Do];
    for (int64_t c = 0; c < Do; ++c) y[c] += z * b[c];
  }
  for (int64_t c = 0; c < Do; ++c) y[c] = static_cast<float>((y[c] - y_mean_) * y_scale_);
}

void RegimeTask::sample(float* x, float* y, int32_t* regime, int64_t T, uint64_t batch) const {
  const int64_t d = cfg_.d_in, Do = cfg_.d_out;
  Rng rng(cfg_.seed, batch);
  for (int64_t t = 0; t < T; ++t) {
    const auto r = static_cast<int32_t>(rng.below(cfg_.regimes));
    regime[t] = r;
    float* xt = x + t * d;
    for (int64_t i = 0; i < d; ++i)
      xt[i] = static_cast<float>(centers_[r * d + i] + cfg_.spread * rng.normal());
    teacher(y + t * Do, xt, r);
  }
}

void RegimeTask::sample_eval(float* x, float* y, int32_t* regime, int64_t T) const {
  sample(x, y, regime, T, kStreamEval);
}

}  // namespace moe::cli
