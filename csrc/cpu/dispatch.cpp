// Host side of the CPU kernels: checks the targets, picks the instruction set once, and splits the
// rows over OpenMP threads (each row is independent; a row's blocks stay in one thread's cache).
#include "dispatch.h"

#include <omp.h>
#include <sys/mman.h>

#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string>

namespace fusedce {
namespace {

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// FUSEDCE_CPU_ISA=avx2|baseline forces a narrower instruction set than the CPU has (the tests use it to
// cover every variant on one machine). An unknown name, or one this CPU cannot run, raises ValueError
// at the first kernel call rather than being ignored.
const KernelTable& pick_table() {
  __builtin_cpu_init();
  if (const char* forced = std::getenv("FUSEDCE_CPU_ISA")) {
    const std::string isa = forced;
    if (isa == "baseline") return kTable_baseline;
    if (isa == "avx2" && cpu_has_avx2()) return kTable_avx2;
    if (isa == "avx512" && cpu_has_avx512()) return kTable_avx512;
    throw std::invalid_argument("FUSEDCE_CPU_ISA=" + isa +
                                ": expected avx512, avx2 or baseline, and one this CPU supports");
  }
  if (cpu_has_avx512()) return kTable_avx512;
  if (cpu_has_avx2()) return kTable_avx2;
  return kTable_baseline;
}

const KernelTable& table() {
  static const KernelTable& t = pick_table();
  return t;
}

// Raised before any row is computed, so a bad target never yields a number. std::out_of_range
// reaches Python as IndexError, as torch's "Target 7 is out of bounds." does.
void check_targets(const CrossEntropyArgs& a) {
  if (!a.target_index) return;
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t t = a.target_index[r];
    if (t != a.ignore_index && (t < 0 || t >= a.vocab))
      throw std::out_of_range("Target " + std::to_string(t) + " is out of bounds: expected a class index in [0, " +
                              std::to_string(a.vocab) + ") or ignore_index=" + std::to_string(a.ignore_index) +
                              " (row " + std::to_string(r) + ")");
  }
}

double weight_sum(const CrossEntropyArgs& a) {
  if (!a.weight) return double(a.vocab);
  double s = 0;
  for (int64_t j = 0; j < a.vocab; ++j)
    s += a.dtype == kFloat64 ? static_cast<const double*>(a.weight)[j] : static_cast<const float*>(a.weight)[j];
  return s;
}

// Streaming stores (stream_bytes in kernel_impl.h) pay off when the gradient overwrites the logits
// in place and is far larger than the caches: the pages are already mapped, and skipping the
// read-for-ownership saves a third of the traffic (measured 83 -> 66 ms for the fused kernel at
// 4096 x 32000 fp32 on the 2-core CI machine). Into a freshly allocated buffer they are slower
// (102 -> 129 ms): each first touch faults in a zeroed page, which the streaming store then evicts.
constexpr int64_t kStreamingMinBytes = int64_t(64) << 20;

BackwardIO with_store_mode(BackwardIO io, const CrossEntropyArgs& a) {
  const int64_t bytes = a.rows * a.vocab * (a.dtype == kFloat32 ? 4 : a.dtype == kFloat64 ? 8 : 2);
  io.streaming = bytes >= kStreamingMinBytes && io.dlogits == a.logits;
  return io;
}

// Static split of rows over threads: rows cost the same, and contiguous ranges keep streams sequential.
// An exception (std::bad_alloc of a row cache) must not leave the parallel region, where it would end
// the process: the first one is kept and rethrown after it.
template <typename Fn>
void parallel_rows(int64_t rows, int num_threads, Fn fn) {
  if (rows == 0) return;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, rows)));
  std::exception_ptr error;
#pragma omp parallel num_threads(nt)
  {
    const int64_t id = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t begin = rows * id / n, end = rows * (id + 1) / n;
    try {
      fn(begin, end);
    } catch (...) {
#pragma omp critical(fusedce_error)
      if (!error) error = std::current_exception();
    }
    _mm_sfence();  // order this thread's streaming stores before the caller reads the output
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

const char* cpu_isa() { return table().isa; }

void cross_entropy_forward(CrossEntropyArgs a, ForwardOut out, const BackwardIO* grad, int num_threads) {
  check_targets(a);
  a.weight_sum = weight_sum(a);
  const KernelTable& t = table();
  BackwardIO io = grad ? with_store_mode(*grad, a) : BackwardIO{};
  const BackwardIO* g = grad ? &io : nullptr;
  parallel_rows(a.rows, num_threads, [&](int64_t b, int64_t e) { t.forward_rows(a, out, g, b, e); });
}

void cross_entropy_backward(CrossEntropyArgs a, BackwardIO io, int num_threads) {
  check_targets(a);
  a.weight_sum = weight_sum(a);
  io = with_store_mode(io, a);
  const KernelTable& t = table();
  parallel_rows(a.rows, num_threads, [&](int64_t b, int64_t e) { t.backward_rows(a, io, b, e); });
}

// A fresh multi-megabyte gradient buffer costs a page fault per 4 KiB on first write; asking for
// transparent huge pages first halves the cost of that first touch (measured: 524 MB written in
// 67 ms instead of 140 ms on the 2-core CI machine). Only a hint: errors are ignored.
void advise_huge_pages(uintptr_t ptr, size_t nbytes) {
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t begin = (ptr + huge - 1) & ~(huge - 1), end = (ptr + nbytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

}  // namespace fusedce
