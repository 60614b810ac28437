// Progress of `moe train`: a one-line bar redrawn in place on a terminal, plain throttled
// lines otherwise (logs, pipes, CI).
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>

namespace moe::cli {

struct ProgressSample {
  int64_t step = 0;  // 1-based, of `steps`
  double loss = 0, aux = 0, tokens_per_s = 0, load_cv = 0, drop_rate = 0;
};

class Progress {
 public:
  // Writes to `out`; a bar when out is a terminal. Plain lines every `every` steps.
  Progress(std::FILE* out, int64_t steps, int64_t every);
  void update(const ProgressSample& s);
  void finish();  // ends the bar's line

 private:
  std::FILE* out_;
  bool tty_;
  int64_t steps_, every_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_;
};

}  // namespace moe::cli
