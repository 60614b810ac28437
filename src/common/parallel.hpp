// When a loop is worth an OpenMP team, and how a team shares streaming tasks.
#pragma once
#include <omp.h>

#include <atomic>
#include <cstdint>
#include <vector>

namespace moe::detail {

// Elementwise loops over fewer values than this run on the calling thread: waking a team
// costs more than the work. The choice depends on sizes only, and each element's value does
// not depend on the partition, so results stay bit-identical for any thread count.
inline constexpr int64_t kParallelMin = int64_t{1} << 14;

// The front and back of one thread's share of a task range, in one word so that its owner
// (taking from the front) and a thief (taking from the back) never take the same task.
class TaskShare {
 public:
  void reset(int64_t begin, int64_t end) {
    word_.store(pack(begin, end), std::memory_order_relaxed);
  }
  // The next task from the front, or -1 when the share is empty.
  int64_t take_front() {
    uint64_t v = word_.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t f = front(v), e = back(v);
      if (f >= e) return -1;
      if (word_.compare_exchange_weak(v, pack(f + 1, e), std::memory_order_relaxed)) return f;
    }
  }
  // The last task, or -1 when the share is empty.
  int64_t take_back() {
    uint64_t v = word_.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t f = front(v), e = back(v);
      if (f >= e) return -1;
      if (word_.compare_exchange_weak(v, pack(f, e - 1), std::memory_order_relaxed))
        return e - 1;
    }
  }

 private:
  static uint64_t pack(int64_t f, int64_t e) {
    return static_cast<uint64_t>(f) << 32 | static_cast<uint32_t>(e);
  }
  static uint32_t front(uint64_t v) { return static_cast<uint32_t>(v >> 32); }
  static uint32_t back(uint64_t v) { return static_cast<uint32_t>(v); }
  alignas(64) std::atomic<uint64_t> word_{0};
};

// body(i) for i in [0, n) on the OpenMP team: each thread takes its static share (the same
// consecutive tasks as schedule(static)) from the front, then takes the others' remaining
// tasks from their backs. A thread slowed by its neighbours (interrupts, another tenant,
// memory) thus never holds the team at the join, while each share is still read in order
// (what hardware and panel prefetch depend on; a dynamic schedule dealing tasks one by one
// to alternating threads made a decode step 25–70% slower, docs/quant.md). Which thread
// runs a task never changes its result. n < 2^31; shares is the caller's, reused.
template <class Body>
void parallel_tasks_stealing(int64_t n, std::vector<TaskShare>& shares, const Body& body) {
  const int threads = n > 1 ? omp_get_max_threads() : 1;
  if (threads == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  if (shares.size() < static_cast<size_t>(threads)) shares = std::vector<TaskShare>(threads);
  for (int t = 0; t < threads; ++t) shares[t].reset(n * t / threads, n * (t + 1) / threads);
#pragma omp parallel num_threads(threads)
  {
    const int me = omp_get_thread_num();
    for (int64_t i; (i = shares[me].take_front()) >= 0;) body(i);
    // Every thread visits every other share, so a team smaller than asked for (nested, a
    // thread limit) still takes the shares no thread owns.
    for (int k = 1; k < threads; ++k) {
      TaskShare& other = shares[(me + k) % threads];
      for (int64_t i; (i = other.take_back()) >= 0;) body(i);
    }
  }
}

}  // namespace moe::detail
