#include "dist/comm.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <limits>

#include "common/check.hpp"

namespace moe::dist {

int64_t ExpertShard::begin(int p) const {
  const int64_t base = n_experts / n_ranks, extra = n_experts % n_ranks;
  return p * base + std::min<int64_t>(p, extra);
}
int64_t ExpertShard::end(int p) const { return begin(p + 1); }
int ExpertShard::owner(int64_t e) const {
  const int64_t base = n_experts / n_ranks, extra = n_experts % n_ranks;
  // The first `extra` ranks own base + 1 experts each.
  const int64_t big = extra * (base + 1);
  if (e < big) return static_cast<int>(e / (base + 1));
  return static_cast<int>(extra + (e - big) / base);
}

[[noreturn]] void abort_all(MPI_Comm comm, const std::string& message, int code) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  std::fprintf(stderr, "rank %d: %s\n", rank, message.c_str());
  std::fflush(stderr);
  MPI_Abort(comm, code);
  std::abort();  // MPI_Abort does not return; this keeps [[noreturn]] honest
}

namespace detail {

using ::moe::detail::cat;

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int to_int(int64_t v, const char* what) {
  MOE_REQUIRE(v >= 0 && v <= std::numeric_limits<int>::max(), what,
              ": too large for one MPI message, got ", v);
  return static_cast<int>(v);
}

void check(int rc) { MOE_ASSERT(rc == MPI_SUCCESS); }

}  // namespace

Comm::Comm(MPI_Comm comm) : comm_(comm) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
}

void Comm::count(int64_t bytes_out, int64_t bytes_in, double seconds) {
  (void)bytes_in;
  stats_.control_bytes += bytes_out;
  stats_.calls += 1;
  stats_.seconds += seconds;
}

void Comm::agree(const std::string& err) {
  const auto t0 = Clock::now();
  int mine = err.empty() ? size_ : rank_, first = size_;
  check(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm_));
  if (first == size_) {
    count(sizeof(int), sizeof(int), since(t0));
    return;
  }
  // Someone failed: the lowest failing rank tells everyone what happened.
  int len = rank_ == first ? static_cast<int>(err.size()) : 0;
  check(MPI_Bcast(&len, 1, MPI_INT, first, comm_));
  std::string msg = rank_ == first ? err : std::string(static_cast<size_t>(len), ' ');
  check(MPI_Bcast(msg.data(), len, MPI_CHAR, first, comm_));
  count(sizeof(int) + len, sizeof(int) + len, since(t0));
  throw Error(cat("rank ", first, ": ", msg));
}

void Comm::allreduce_sum(int64_t* data, int64_t n) {
  const auto t0 = Clock::now();
  check(MPI_Allreduce(MPI_IN_PLACE, data, to_int(n, "allreduce"), MPI_INT64_T, MPI_SUM, comm_));
  count(n * 8, n * 8, since(t0));
}

void Comm::exscan_sum(int64_t* out, const int64_t* in, int64_t n) {
  const auto t0 = Clock::now();
  check(MPI_Exscan(in, out, to_int(n, "exscan"), MPI_INT64_T, MPI_SUM, comm_));
  if (rank_ == 0) std::fill(out, out + n, 0);  // MPI leaves rank 0's result undefined
  count(n * 8, n * 8, since(t0));
}

template <typename V>
static void allgather_impl(Comm& c, V* out, const V* in, int64_t n, MPI_Datatype type,
                           double& secs) {
  const auto t0 = Clock::now();
  check(MPI_Allgather(in, to_int(n, "allgather"), type, out, static_cast<int>(n), type,
                      c.handle()));
  secs = since(t0);
}

void Comm::allgather(int64_t* out, const int64_t* in, int64_t n) {
  double s = 0;
  allgather_impl(*this, out, in, n, MPI_INT64_T, s);
  count(n * 8 * (size_ - 1), n * 8 * (size_ - 1), s);
}
void Comm::allgather(int32_t* out, const int32_t* in, int64_t n) {
  double s = 0;
  allgather_impl(*this, out, in, n, MPI_INT32_T, s);
  count(n * 4 * (size_ - 1), n * 4 * (size_ - 1), s);
}
void Comm::allgather(float* out, const float* in, int64_t n) {
  double s = 0;
  allgather_impl(*this, out, in, n, MPI_FLOAT, s);
  count(n * 4 * (size_ - 1), n * 4 * (size_ - 1), s);
}
void Comm::allgather(double* out, const double* in, int64_t n) {
  double s = 0;
  allgather_impl(*this, out, in, n, MPI_DOUBLE, s);
  count(n * 8 * (size_ - 1), n * 8 * (size_ - 1), s);
}

template <typename V>
static double allgatherv_impl(Comm& c, V* out, const V* in, const std::vector<int64_t>& counts,
                              MPI_Datatype type) {
  const int P = c.size();
  std::vector<int> cnt(static_cast<size_t>(P)), dsp(static_cast<size_t>(P));
  int64_t off = 0;
  for (int p = 0; p < P; ++p) {
    cnt[p] = to_int(counts[p], "allgatherv count");
    dsp[p] = to_int(off, "allgatherv displacement");
    off += counts[p];
  }
  const auto t0 = Clock::now();
  check(MPI_Allgatherv(in, cnt[c.rank()], type, out, cnt.data(), dsp.data(), type, c.handle()));
  return since(t0);
}

void Comm::allgatherv(int32_t* out, const int32_t* in, const std::vector<int64_t>& counts) {
  const double s = allgatherv_impl(*this, out, in, counts, MPI_INT32_T);
  count(counts[rank_] * 4 * (size_ - 1), 0, s);
}
void Comm::allgatherv(float* out, const float* in, const std::vector<int64_t>& counts) {
  const double s = allgatherv_impl(*this, out, in, counts, MPI_FLOAT);
  count(counts[rank_] * 4 * (size_ - 1), 0, s);
}

void Comm::alltoall(int64_t* out, const int64_t* in, int64_t n) {
  const auto t0 = Clock::now();
  const int c = to_int(n, "alltoall");
  check(MPI_Alltoall(in, c, MPI_INT64_T, out, c, MPI_INT64_T, comm_));
  count(n * 8 * (size_ - 1), n * 8 * (size_ - 1), since(t0));
}

void Comm::alltoallv_rows(float* recv, const std::vector<int64_t>& recv_rows, const float* send,
                          const std::vector<int64_t>& send_rows, int64_t width) {
  const int P = size_;
  std::vector<int> sc(static_cast<size_t>(P)), sd(sc), rc(sc), rd(sc);
  int64_t so = 0, ro = 0;
  for (int p = 0; p < P; ++p) {
    sc[p] = to_int(send_rows[p], "rows to send");
    sd[p] = to_int(so, "send displacement (rows)");
    rc[p] = to_int(recv_rows[p], "rows to receive");
    rd[p] = to_int(ro, "receive displacement (rows)");
    so += send_rows[p];
    ro += recv_rows[p];
  }
  // One row is one element of a contiguous type, so counts are in rows and 2^31 rows (not
  // 2^31 floats) is the limit.
  MPI_Datatype row;
  check(MPI_Type_contiguous(to_int(std::max<int64_t>(width, 1), "row width"), MPI_FLOAT, &row));
  check(MPI_Type_commit(&row));
  const auto t0 = Clock::now();
  // A zero-width row (d_out == 0 never happens, but T == 0 does) still takes part.
  check(MPI_Alltoallv(send, sc.data(), sd.data(), row, recv, rc.data(), rd.data(), row, comm_));
  stats_.seconds += since(t0);
  stats_.calls += 1;
  MPI_Type_free(&row);
  const int64_t rb = width * 4;
  for (int p = 0; p < P; ++p) {
    if (p == rank_) {
      stats_.row_bytes_local += send_rows[p] * rb;
    } else {
      stats_.row_bytes_sent += send_rows[p] * rb;
      stats_.row_bytes_received += recv_rows[p] * rb;
    }
  }
}

template <typename V>
static void sum_in_rank_order_impl(Comm& c, std::vector<V>& scratch, V* data, int64_t n) {
  const int P = c.size();
  scratch.resize(static_cast<size_t>(n * P));
  c.allgather(scratch.data(), data, n);
  for (int64_t i = 0; i < n; ++i) {
    V acc = scratch[i];
    for (int p = 1; p < P; ++p) acc += scratch[p * n + i];
    data[i] = acc;
  }
}

void Comm::sum_in_rank_order(float* data, int64_t n) {
  sum_in_rank_order_impl(*this, fscratch_, data, n);
}
void Comm::sum_in_rank_order(double* data, int64_t n) {
  sum_in_rank_order_impl(*this, dscratch_, data, n);
}

}  // namespace detail
}  // namespace moe::dist
