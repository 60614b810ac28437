// The only place in libmoe that calls MPI. Every collective of the expert-parallel layer goes
// through Comm, which (a) counts bytes and time for docs/scaling.md and moe_dist_bench, and
// (b) agrees on errors before each exchange, so that a failure on one rank ends every rank
// with the same message instead of leaving the others blocked in a collective.
#pragma once
#include <mpi.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "moe/dist.hpp"

namespace moe::dist::detail {

class Comm {
 public:
  Comm() = default;
  explicit Comm(MPI_Comm comm);

  MPI_Comm handle() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  CommStats& stats() { return stats_; }
  const CommStats& stats() const { return stats_; }

  // One MPI_Allreduce (MIN of the failing ranks); when some rank failed, the lowest failing
  // rank broadcasts its message and every rank throws moe::Error("rank R: <message>").
  // err empty means this rank is fine. Every rank must reach the same agree() call.
  void agree(const std::string& err);

  // Runs f and agrees on whether it threw, on every rank.
  template <typename F>
  void guarded(F&& f) {
    std::string err;
    try {
      f();
    } catch (const std::exception& e) {
      err = e.what();
      if (err.empty()) err = "unknown error";
    }
    agree(err);
  }

  // Integer reductions (exact, so their order does not matter).
  void allreduce_sum(int64_t* data, int64_t n);
  void exscan_sum(int64_t* out, const int64_t* in, int64_t n);  // rank 0 gets zeros
  void allgather(int64_t* out, const int64_t* in, int64_t n);   // out is (P, n)
  void allgather(int32_t* out, const int32_t* in, int64_t n);
  void allgather(float* out, const float* in, int64_t n);
  void allgather(double* out, const double* in, int64_t n);

  // Variable-size gathers: this rank contributes n items; out receives everyone's in rank
  // order. counts (P) are known to every rank beforehand.
  void allgatherv(int32_t* out, const int32_t* in, const std::vector<int64_t>& counts);
  void allgatherv(float* out, const float* in, const std::vector<int64_t>& counts);

  // out[p·n + i] = what rank p sent to us as its block for this rank: in is (P, n).
  void alltoall(int64_t* out, const int64_t* in, int64_t n);

  // Rows of `width` floats: send_rows[p] rows to rank p, taken consecutively from send;
  // recv_rows[p] rows from rank p, stored consecutively in recv.
  void alltoallv_rows(float* recv, const std::vector<int64_t>& recv_rows, const float* send,
                      const std::vector<int64_t>& send_rows, int64_t width);

  // Sum of an (n) float array over the ranks, added in rank order 0, 1, …, P−1 on every rank,
  // so the result has the same bits on every rank and from run to run whatever algorithm MPI
  // picks. Costs an allgather of P·n floats: meant for the router's small gradients.
  void sum_in_rank_order(float* data, int64_t n);
  void sum_in_rank_order(double* data, int64_t n);

 private:
  void count(int64_t bytes_out, int64_t bytes_in, double seconds);

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  CommStats stats_;
  std::vector<float> fscratch_;
  std::vector<double> dscratch_;
};

}  // namespace moe::dist::detail
