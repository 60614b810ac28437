#include "progress.hpp"

#include <unistd.h>

#include <string>

namespace moe::cli {

Progress::Progress(std::FILE* out, int64_t steps, int64_t every)
    : out_(out),
      tty_(::isatty(::fileno(out)) != 0),
      steps_(steps),
      every_(every < 1 ? 1 : every),
      last_(std::chrono::steady_clock::now() - std::chrono::seconds(1)) {}

void Progress::update(const ProgressSample& s) {
  const bool last = s.step == steps_;
  if (tty_) {
    // Redraw at most ten times a second: the terminal, not the loop, sets the pace.
    const auto now = std::chrono::steady_clock::now();
    if (!last && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    constexpr int kWidth = 24;
    const int filled = static_cast<int>(kWidth * s.step / (steps_ > 0 ? steps_ : 1));
    std::string bar(static_cast<size_t>(filled), '#');
    bar.append(static_cast<size_t>(kWidth - filled), '.');
    std::fprintf(out_,
                 "\r  [%s] %6lld/%lld  loss %.4f  aux %.4f  %7.0f tok/s  load CV %.3f  "
                 "drop %.2f%%\x1b[K",
                 bar.c_str(), static_cast<long long>(s.step), static_cast<long long>(steps_),
                 s.loss, s.aux, s.tokens_per_s, s.load_cv, 100.0 * s.drop_rate);
    std::fflush(out_);
    drawn_ = true;
    return;
  }
  if (s.step != 1 && s.step % every_ != 0 && !last) return;
  std::fprintf(out_,
               "step %6lld/%lld  loss %.5f  aux %.5f  tokens/s %.0f  load_cv %.3f  drop %.2f%%\n",
               static_cast<long long>(s.step), static_cast<long long>(steps_), s.loss, s.aux,
               s.tokens_per_s, s.load_cv, 100.0 * s.drop_rate);
  std::fflush(out_);
}

void Progress::finish() {
  if (tty_ && drawn_) {
    std::fputc('\n', out_);
    std::fflush(out_);
  }
  drawn_ = false;
}

}  // namespace moe::cli
