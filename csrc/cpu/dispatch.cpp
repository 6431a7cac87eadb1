// Host side of the CPU kernels: checks the targets, picks the instruction set once, and spreads the
// rows over threads where the work pays for them (each row is independent; a row's blocks stay in one
// thread's cache).
#include "dispatch.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "row_pool.h"

namespace fusedce {
namespace {

#if FUSEDCE_X86
bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
constexpr const char* kCompiledIsas = "avx512, avx2 or baseline";
#else
constexpr const char* kCompiledIsas = "baseline (the only kernels of a build without x86-64 code)";
#endif

// FUSEDCE_CPU_ISA=avx2|baseline forces a narrower instruction set than the CPU has (the tests use it to
// cover every variant on one machine). An unknown name, or one this CPU or build cannot run, raises
// ValueError at the first kernel call rather than being ignored.
const KernelTable& pick_table() {
#if FUSEDCE_X86
  __builtin_cpu_init();
#endif
  if (const char* forced = std::getenv("FUSEDCE_CPU_ISA")) {
    const std::string isa = forced;
    if (isa == "baseline") return kTable_baseline;
#if FUSEDCE_X86
    if (isa == "avx2" && cpu_has_avx2()) return kTable_avx2;
    if (isa == "avx512" && cpu_has_avx512()) return kTable_avx512;
#endif
    throw std::invalid_argument("FUSEDCE_CPU_ISA=" + isa + ": expected " + kCompiledIsas +
                                ", and one this CPU supports");
  }
#if FUSEDCE_X86
  if (cpu_has_avx512()) return kTable_avx512;
  if (cpu_has_avx2()) return kTable_avx2;
#endif
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

template <typename Acc>
const Acc* weights(const CrossEntropyArgs& a) {
  return static_cast<const Acc*>(a.weight);
}

double weight_sum(const CrossEntropyArgs& a) {
  if (!a.weight) return double(a.vocab);
  double s = 0;
  for (int64_t j = 0; j < a.vocab; ++j) s += a.dtype == kFloat64 ? weights<double>(a)[j] : weights<float>(a)[j];
  return s;
}

// The scalar in `dtype` at p, rounded to nearest even.
void store_scalar(void* p, int dtype, double v) {
  switch (dtype) {
    case kFloat64: *static_cast<double*>(p) = v; return;
    case kFloat16: *static_cast<Half*>(p) = Half(float(v)); return;
    case kBFloat16: *static_cast<uint16_t*>(p) = float_to_bf16(float(v)); return;
    default: *static_cast<float*>(p) = float(v);
  }
}

// Streaming stores (stream_bytes in kernel_impl.h) pay off when the gradient overwrites the logits
// in place and is far larger than the caches: the pages are already mapped, and skipping the
// read-for-ownership saves a third of the traffic (measured 83 -> 66 ms for the fused kernel at
// 4096 x 32000 fp32 on the 2-core CI machine). Into a freshly allocated buffer they are slower
// (102 -> 129 ms): each first touch faults in a zeroed page, which the streaming store then evicts.
constexpr int64_t kStreamingMinBytes = int64_t(64) << 20;

// A fresh multi-megabyte gradient buffer costs a page fault per 4 KiB on first write; asking for
// transparent huge pages first halves the cost of that first touch (measured: 524 MB written in
// 67 ms instead of 140 ms on the 2-core CI machine). Only a hint: errors are ignored. Only Linux has
// transparent huge pages; elsewhere this does nothing.
constexpr int64_t kHugePagesMinBytes = int64_t(8) << 20;

void advise_huge_pages(void* ptr, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21, p = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t begin = (p + huge - 1) & ~(huge - 1), end = (p + uintptr_t(nbytes)) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr, (void)nbytes;
#endif
}

int64_t row_bytes(const CrossEntropyArgs& a) { return a.vocab * element_size(a.dtype); }

// How dlogits is written: streaming stores in place, huge pages for a fresh buffer (both for large ones).
BackwardIO with_store_mode(BackwardIO io, const CrossEntropyArgs& a) {
  const int64_t bytes = a.rows * row_bytes(a);
  io.streaming = bytes >= kStreamingMinBytes && io.dlogits == a.logits;
  if (io.dlogits != a.logits && bytes >= kHugePagesMinBytes) advise_huge_pages(io.dlogits, bytes);
  return io;
}

// How many threads a call gets, and the rows each claims at a time. Work is counted in elements
// passed over (a row costs about kRowElements more than its vocabulary: its target, logs, stores).
// A thread is added per kMinThreadWork of work, about 40 us of one thread's time on the 2-core CI
// machine (Zen 5, AVX-512): the pool's workers poll for a while after a call (row_pool.cpp), so one
// called back to back starts within a few microseconds, and the caller never waits for a worker that
// has not started. Measured there, 2 threads against 1, calls in a row: 1.9x at 256x1000 fp32 forward
// (83 -> 44 us), 1.8x at 1024x1000; with workers that slept between calls the second thread gave 1.2x
// at 256x1000, which is why the threshold was 8x higher before.
constexpr int64_t kRowElements = 64;
constexpr int64_t kMinThreadWork = int64_t(1) << 17;
// A chunk is at most kChunkBytes of logits and an eighth of a thread's share: long enough to keep
// the prefetchers streaming, short enough that the threads still running take over the rows of one
// the OS descheduled. (256 KiB chunks made the fused kernel slower: each chunk sets up its row caches.)
constexpr int64_t kChunkBytes = int64_t(2) << 20;
constexpr int64_t kChunksPerThread = 8;

void run_rows(const CrossEntropyArgs& a, int passes, int max_threads, const RowRange& fn) {
  const int64_t work = a.rows * (a.vocab + kRowElements) * passes;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(max_threads, work / kMinThreadWork)));
  const int64_t row = std::max<int64_t>(1, row_bytes(a));
  const int64_t chunk_rows = std::min((kChunkBytes + row - 1) / row,
                                      (a.rows + threads * kChunksPerThread - 1) / (threads * kChunksPerThread));
  parallel_rows(a.rows, chunk_rows, threads, fn);
}

}  // namespace

const char* cpu_isa() { return table().isa; }

double mean_denominator(const CrossEntropyArgs& a) {
  if (!a.target_index) return double(a.rows);  // probabilities: every row counts once
  double d = 0;
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t t = a.target_index[r];
    if (t == a.ignore_index || t < 0 || t >= a.vocab) continue;
    d += !a.weight ? 1.0 : a.dtype == kFloat64 ? weights<double>(a)[t] : weights<float>(a)[t];
  }
  return d;
}

void cross_entropy_forward(CrossEntropyArgs a, ForwardOut out, const BackwardIO* grad, int num_threads) {
  check_targets(a);
  a.weight_sum = weight_sum(a);
  const KernelTable& t = table();
  // A reduced loss (or a gradient without a caller's lse) needs rows of scratch: the per-row losses are
  // summed after the rows in row order, so the result does not depend on how the rows were split.
  const int64_t acc_size = a.dtype == kFloat64 ? 8 : 4;
  std::vector<char> scratch;
  ForwardOut rows_out = out;
  if (out.reduction != kNone || !out.lse) {
    scratch.resize(size_t(2 * a.rows * acc_size));
    if (out.reduction != kNone) rows_out.loss = scratch.data();
    if (!out.lse) rows_out.lse = scratch.data() + a.rows * acc_size;
  }
  const double denominator = out.reduction == kMean ? mean_denominator(a) : 1.0;
  // the gradient of the reduced loss: the same grad_loss for every row
  const double row_grad = 1.0 / denominator;
  const float row_grad_f = float(row_grad);
  BackwardIO io = grad ? with_store_mode(*grad, a) : BackwardIO{};
  if (grad) {
    io.lse = rows_out.lse;
    if (!io.grad_loss) {
      io.grad_loss = a.dtype == kFloat64 ? static_cast<const void*>(&row_grad) : &row_grad_f;
      io.grad_stride = 0;
    }
  }
  const BackwardIO* g = grad ? &io : nullptr;
  run_rows(a, grad ? 2 : 1, num_threads, [&](int64_t b, int64_t e) { t.forward_rows(a, rows_out, g, b, e); });
  if (out.reduction == kNone) return;
  double total = 0;
  for (int64_t r = 0; r < a.rows; ++r)
    total += a.dtype == kFloat64 ? static_cast<const double*>(rows_out.loss)[r] : static_cast<const float*>(rows_out.loss)[r];
  store_scalar(out.loss, out.loss_dtype, out.reduction == kMean ? total / denominator : total);
}

void cross_entropy_shard_states(const CrossEntropyArgs& a, void* states, int num_threads) {
  ForwardOut out{nullptr, nullptr};
  out.states = states;
  const KernelTable& t = table();
  run_rows(a, 1, num_threads, [&](int64_t b, int64_t e) { t.forward_rows(a, out, nullptr, b, e); });
}

void cross_entropy_backward(CrossEntropyArgs a, BackwardIO io, int num_threads) {
  if (!io.target_mass) {  // a shard's targets may be on other shards, and it is given K
    check_targets(a);
    a.weight_sum = weight_sum(a);
  }
  io = with_store_mode(io, a);
  const KernelTable& t = table();
  run_rows(a, 2, num_threads, [&](int64_t b, int64_t e) { t.backward_rows(a, io, b, e); });
}

}  // namespace fusedce
