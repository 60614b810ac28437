// parallel_tasks_stealing (src/common/parallel.hpp): every task exactly once, each thread's
// own share from the front in order, the slow thread's remaining tasks taken by the others.
#include <gtest/gtest.h>
#include <omp.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "common/parallel.hpp"

namespace moe::detail {
namespace {

// OpenMP's thread count for one test, given back after it (the suite runs in one process).
struct Threads {
  explicit Threads(int n) : saved(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~Threads() { omp_set_num_threads(saved); }
  int saved;
};

// Runs n tasks on `threads` threads; returns which thread ran each (-1: none) and checks
// that no task ran twice.
std::vector<int> run(int64_t n, int threads, std::vector<TaskShare>& shares,
                     int slow_thread = -1) {
  std::vector<std::atomic<int>> count(static_cast<size_t>(n));
  std::vector<int> who(static_cast<size_t>(n), -1);
  const Threads team(threads);
  parallel_tasks_stealing(n, shares, [&](int64_t i) {
    const int me = omp_get_thread_num();
    if (me == slow_thread) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    count[static_cast<size_t>(i)].fetch_add(1);
    who[static_cast<size_t>(i)] = me;
  });
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(count[static_cast<size_t>(i)].load(), 1) << "task " << i;
  return who;
}

TEST(ParallelTasks, EveryTaskRunsOnceForAnyCountAndTeam) {
  std::vector<TaskShare> shares;  // reused across calls and team sizes, as a workspace is
  for (int threads : {1, 2, 3, 5})
    for (int64_t n : {0, 1, 2, 3, 7, 64, 1000}) run(n, threads, shares);
}

TEST(ParallelTasks, AThreadTakesItsOwnShareFromTheFrontInOrder) {
  // The tasks a thread runs from its own static share come in increasing order (the others
  // take from the back, so they never break that order).
  std::vector<TaskShare> shares;
  const int threads = 3;
  const int64_t n = 300;
  std::vector<std::vector<int64_t>> order(threads);
  const Threads team(threads);
  parallel_tasks_stealing(n, shares, [&](int64_t i) {
    order[static_cast<size_t>(omp_get_thread_num())].push_back(i);
  });
  for (int t = 0; t < threads; ++t) {
    const int64_t b = n * t / threads, e = n * (t + 1) / threads;
    const auto& o = order[static_cast<size_t>(t)];
    int64_t last = -1;
    for (int64_t i : o)
      if (i >= b && i < e) {
        EXPECT_GT(i, last) << "thread " << t;
        last = i;
      }
  }
}

TEST(ParallelTasks, TheOthersTakeASlowThreadsTasks) {
  // Thread 0 sleeps 2 ms a task: a static schedule would leave it its 20 tasks (40 ms);
  // here the other thread, done with its own in microseconds, takes its remaining ones.
  std::vector<TaskShare> shares;
  const std::vector<int> who = run(40, 2, shares, /*slow_thread=*/0);
  int by_zero = 0;
  for (int w : who) by_zero += w == 0;
  EXPECT_LT(by_zero, 20);
}

TEST(ParallelTasks, InsideAParallelRegionOneThreadTakesEveryShare) {
  // Nested: the inner team has one thread, which finds the other shares unowned.
  std::vector<TaskShare> shares;
  std::vector<std::atomic<int>> count(100);
  const Threads team(3);
#pragma omp parallel num_threads(1)
  parallel_tasks_stealing(100, shares, [&](int64_t i) { count[static_cast<size_t>(i)]++; });
  for (auto& c : count) EXPECT_EQ(c.load(), 1);
}

}  // namespace
}  // namespace moe::detail
