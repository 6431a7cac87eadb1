// The CUDA kernels' launch planning and launch checks: host code with no CUDA header, so that
// fusedce._cuda can plan (and its tests check plans) on a machine without a GPU.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "params.h"

namespace fusedce {
namespace cuda {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// Blocks of `threads` threads that one SM runs at once: as many as its threads and its registers allow
// (an underestimate for the scalar kernels of unaligned rows, which use fewer registers).
int64_t resident_blocks(const DeviceInfo& d, int threads, int registers) {
  return std::max<int64_t>(1, std::min<int64_t>(d.threads_per_sm, d.regs_per_sm / std::max(1, registers)) / threads);
}

// Threads for a block reading nbytes of a row: at least 4 packs of 16 bytes each.
int block_threads(int64_t nbytes) {
  return int(std::min<int64_t>(kBlockMaxThreads, std::max(128, pow2_at_least(ceil_div(nbytes, 64)))));
}

Launch make(int layout, int threads, int64_t blocks, int splits, bool vectorized) {
  Launch l;
  l.layout = layout, l.threads = threads, l.blocks = blocks, l.splits = splits, l.vectorized = vectorized;
  return l;
}

}  // namespace

bool is_general(const Params& p) {
  return p.target_prob != nullptr || p.weight != nullptr || p.label_smoothing > 0 || p.softcap > 0;
}

bool same_phase(const Params& p) {
  if (p.dlogits == nullptr) return true;
  const int64_t es = element_size(p.dtype);
  return (reinterpret_cast<uintptr_t>(p.logits) - reinterpret_cast<uintptr_t>(p.dlogits)) % 16 == 0 &&
         (p.rows <= 1 || (p.logits_row_stride - p.dlogits_row_stride) * es % 16 == 0);
}

// Untuned (written without a GPU): the rules follow from the traffic model, and benchmarks/ is the place
// to tune them.
// - Rows up to 4 KiB: a warp per row, 8 rows per block.
// - The fused mode, common options, rows up to 128 KiB and enough of them to fill the GPU: a block per
//   row, the row held in registers (kCachePacks x 16 bytes per thread), so the gradient pass reads no memory.
// - The same for rows up to 1 MiB on sm_90+: the row held by a cluster of 2, 4 or 8 blocks (even sizes
//   pack the SM pairs of a GPC), a segment each, their softmax states merged through distributed shared
//   memory. A block per (row, segment): the hardware schedules whole clusters as SMs free up, so no
//   persistent grid has to guess how many clusters fit at once.
// - Otherwise a block per row. Too few rows to fill the GPU: each row is split into segments (separate
//   blocks) whose softmax states merge in a second kernel. The fused mode re-reads each row for its
//   gradient, so the rows in flight are bounded to stay in L2 where that is possible. Probability targets'
//   rows are split only for a shard (its states, or its backward from the global K): otherwise K needs
//   the whole row.
// - A shard's states: a forward's layouts, never cached (there is no gradient); its rows' (or segments')
//   states merge in the split rows' second kernel, which stores the merged state.
Launch plan(const Params& p, bool fused, const DeviceInfo& d) {
  const int64_t rows = std::max<int64_t>(1, p.rows), vocab = p.vocab;
  const int es = element_size(p.dtype), per_pack = 16 / es;
  const int dtype = std::min(p.dtype, int(kBFloat16));
  const int64_t row_bytes = vocab * es;
  const bool vectorized = same_phase(p), general = is_general(p);
  const bool whole_row_k = p.target_prob != nullptr && !p.states && !p.target_mass;
  const int row_regs = d.row_registers[dtype], cached_regs = d.cached_registers[dtype];
  if (row_bytes <= kWarpRowMaxBytes)
    return make(kWarpPerRow, 256, std::min(ceil_div(rows, 8), d.sms * resident_blocks(d, 256, row_regs)), 1,
                vectorized);
  const bool cacheable = fused && !general && vectorized;
  const int64_t block_holds = int64_t(kCachePacks) * kCachedThreads * per_pack;
  if (cacheable && vocab <= block_holds && rows >= d.sms) {
    const int threads = int(std::min<int64_t>(kCachedThreads, std::max(64, pow2_at_least(ceil_div(vocab, per_pack * kCachePacks)))));
    return make(kBlockPerRowCached, threads, std::min(rows, d.sms * resident_blocks(d, threads, cached_regs)), 1,
                true);
  }
  if (cacheable && d.clusters) {
    for (int parts = 2; parts <= kMaxCluster; parts *= 2) {
      if (segment_length(int(vocab), parts) > block_holds) continue;
      if (rows * parts >= d.sms) return make(kClusterRowCached, kCachedThreads, std::min<int64_t>(rows, 0x7fffffff), parts, true);
      break;
    }
  }
  const int threads = block_threads(row_bytes);
  const int64_t resident = d.sms * resident_blocks(d, threads, row_regs);
  if (!whole_row_k && rows < resident) {
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({ceil_div(resident, rows), row_bytes / kSegmentMinBytes, 65535}));
    if (splits > 1) return make(kBlockPerRow, block_threads(ceil_div(row_bytes, splits)), rows, int(splits), vectorized);
  }
  int64_t blocks = std::min(rows, resident);
  if (fused) blocks = std::min(blocks, std::max<int64_t>(d.sms, (d.l2_bytes / 2) / row_bytes));
  return make(kBlockPerRow, threads, blocks, 1, vectorized);
}

int64_t workspace_floats(int64_t rows, bool states, const Launch& l) {
  return (l.layout == kBlockPerRow && l.splits > 1) || states ? rows * l.splits * kStateFloats : 0;
}

void check_dtype(int dtype) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument("fusedce CUDA kernels: unsupported dtype code " + std::to_string(dtype));
}

void check_launch(const Params& p, const Launch& l, bool forward, bool fused) {
  check_dtype(p.dtype);
  if (p.target_prob) check_dtype(p.target_dtype);
  // 32-bit column indices, with room for a grid's worth of threads past the end
  if (p.vocab >= (int64_t(1) << 30))
    throw std::invalid_argument("fusedce CUDA kernels: " + std::to_string(p.vocab) +
                                " classes; at most 2^30 - 1 are supported");
  const bool threads_ok = l.threads >= 32 && l.threads <= 1024 && l.threads % 32 == 0;
  // the cached layouts: the common case, 16-byte packs, and each block's segment within its registers
  const bool cached = l.layout == kBlockPerRowCached || l.layout == kClusterRowCached;
  const bool cached_ok = fused && !is_general(p) && l.vectorized && l.splits >= 1 && l.threads <= kCachedThreads &&
                         segment_length(int(p.vocab), l.splits) <=
                             int64_t(kCachePacks) * l.threads * (16 / element_size(p.dtype));
  const bool layout_ok = l.layout == kWarpPerRow || l.layout == kBlockPerRow || (cached && cached_ok);
  // a shard's states: the rows' states pass through the workspace, and there is no gradient
  const bool states_ok = !p.states || (forward && !fused && !cached && p.workspace);
  // the forward merges the segments' states in the workspace; the backward's segments are independent
  // (probability targets: where K is given)
  const bool splits_ok = l.splits == 1 ||
                         (l.layout == kBlockPerRow && l.splits > 1 && l.splits <= 65535 &&
                          (p.workspace || !forward) && (!p.target_prob || p.states || p.target_mass)) ||
                         (l.layout == kClusterRowCached && l.splits > 1 && l.splits <= kMaxCluster);
  if (l.vectorized && !same_phase(p))
    throw std::invalid_argument("fusedce CUDA kernels: vectorized launch with logits and dlogits rows at different "
                                "offsets from a 16-byte boundary");
  if (!threads_ok || !layout_ok || !splits_ok || !states_ok || l.blocks < 1 || l.blocks > 0x7fffffff)
    throw std::invalid_argument("fusedce CUDA kernels: invalid launch (layout " + std::to_string(l.layout) +
                                ", threads " + std::to_string(l.threads) + ", blocks " + std::to_string(l.blocks) +
                                ", splits " + std::to_string(l.splits) + ")");
}

}  // namespace cuda
}  // namespace fusedce
