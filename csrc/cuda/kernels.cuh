// CUDA kernels of fusedce: online log-softmax cross-entropy, forward, backward and the fused
// forward-with-gradient. Included by one .cu file per logits dtype (kernels_<dtype>.cu), which
// instantiates launch_rows<T>; launch.cu holds the host side.
//
// Math (per row; x' = softcap(x), p = softmax(x'), lse = log sum exp x'), as in csrc/cpu/kernel_impl.h
// and triton_kernels/cross_entropy.py:
//   per-class target coefficients c_j:
//     class index t:  c_j = (1-eps) w_t [j == t] + (eps/V) w_j
//     probabilities:  c_j = w_j ((1-eps) q_j + eps/V)
//   loss = K log s - sum_j c_j (x'_j - m) + z lse^2,  K = sum_j c_j, lse = m + log s (m: running max)
//   dloss/dx'_j = p_j (K + 2 z lse) - c_j;  dloss/dx_j = dloss/dx'_j (1 - (x'_j / cap)^2) with a softcap
// Online update: m' = max(m, max(x_pack)); s' = s exp(m - m') + sum exp(x_pack - m'). Each thread keeps
// its own (m, s) over the elements it reads; the states merge by the same rule across the row.
//
// Traffic: the forward reads the logits once (S); the backward reads them once and writes dlogits once
// (2S); the fused mode does both in one launch, its second read of a row served by the registers
// (cached_row_kernel: of one block, or of a cluster of blocks on sm_90+) or by L2 (row_kernel, with few
// enough rows in flight to stay in L2).
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "params.h"

namespace fusedce {
namespace cuda {

constexpr float kLowest = -3.4028234663852886e38f;  // finite, so (-inf) - m is -inf, never NaN
constexpr int kStateFloats = 5;                      // a State in the split-row workspace
constexpr int kCachePacks = 8;  // 16-byte packs per thread in cached_row_kernel: 128 KiB per 1024 threads
constexpr int kMaxCluster = 8;  // blocks per cluster: the portable limit (more needs an opt-in per kernel)

// Segment `part` of a row cut into `parts` (blocks of a split row or of a cluster): [c0, c1). Segments
// are a multiple of 8 elements long, so each keeps its row's 16-byte phase.
struct Segment {
  int c0, c1;
  __host__ __device__ static int length(int vocab, int parts) { return ((vocab + parts - 1) / parts + 7) / 8 * 8; }
  __device__ Segment(int vocab, int parts, int part) {
    c0 = min(vocab, part * length(vocab, parts));
    c1 = min(vocab, c0 + length(vocab, parts));
  }
};

// Passes of row_kernel, combined as bits.
enum Pass : int {
  kForward = 1,   // loss and lse of whole rows
  kPartial = 2,   // the softmax state of one segment of a row, into the workspace (split rows)
  kBackward = 4,  // dlogits, from the lse of this launch (kForward) or of an earlier one
};

// ---- element types --------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int N>
__device__ __forceinline__ void unpack(const uint4& raw, float (&x)[N]) {
  static_assert(N * sizeof(T) == 16, "a pack is 16 bytes");
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = to_float(v[i]);
}

// A 16-byte pack goes out in one 16-byte store. Written in PTX because nvcc 13.0 splits the plain C++
// store of a uint4 into four 4-byte stores in these kernels (SASS: STG.E, not STG.E.128), four times the
// store instructions and L2 write requests for the same bytes.
template <typename T, int N>
__device__ __forceinline__ void store(T* dst, const float (&d)[N]) {
  if constexpr (N * sizeof(T) == 16) {
    constexpr int kPerWord = 4 / sizeof(T);
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      T e[kPerWord];
#pragma unroll
      for (int i = 0; i < kPerWord; ++i) e[i] = from_float<T>(d[k * kPerWord + i]);
      memcpy(&w[k], e, 4);
    }
    // "memory": the stores stay after the loads before them (dst may be the logits: the in-place mode)
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = from_float<T>(d[i]);
  }
}

// ---- exact scalar helpers (once per row, or for the target element) ------------------------------

__device__ __forceinline__ float log1p_exact(float r) {
  const float u = 1.f + r;
  return u == 1.f ? r : logf(u) * r / (u - 1.f);  // Goldberg: exact to a few ulp for small r
}

__device__ __forceinline__ float expm1_exact(float d) {
  const float u = expf(d);
  if (fabsf(d) >= 0.5f) return u - 1.f;
  return u == 1.f ? d : (u - 1.f) * d / logf(u);  // Kahan's trick
}

// ---- the online softmax state ---------------------------------------------------------------------

struct State {
  float m = kLowest;  // running max
  // s = top + rest: top counts the terms exp(x - m) = 1, rest sums the others, so the tiny terms of a
  // confident prediction are not rounded away against the 1 of its top logit
  float top = 0.f;
  float rest = 0.f;
  float cx = 0.f;  // sum_j c_j (x'_j - m)
  float k = 0.f;   // sum_j c_j

  // Re-expresses the state relative to a larger max.
  __device__ __forceinline__ void rebase(float m_new) {
    if (m_new > m) {
      rest = (top + rest) * __expf(m - m_new);
      top = 0.f;
      if (k != 0.f) cx -= k * (m_new - m);
      m = m_new;
    }
  }

  __device__ __forceinline__ void merge(State o) {
    const float m_new = fmaxf(m, o.m);
    rebase(m_new);
    o.rebase(m_new);
    top += o.top;
    rest += o.rest;
    cx += o.cx;
    k += o.k;
  }

  __device__ __forceinline__ void store_to(float* dst) const {
    dst[0] = m, dst[1] = top, dst[2] = rest, dst[3] = cx, dst[4] = k;
  }
  __device__ __forceinline__ static State load_from(const float* src) {
    State s;
    s.m = src[0], s.top = src[1], s.rest = src[2], s.cx = src[3], s.k = src[4];
    return s;
  }
};

__device__ __forceinline__ State warp_reduce(State s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    State o;
    o.m = __shfl_xor_sync(0xffffffffu, s.m, offset);
    o.top = __shfl_xor_sync(0xffffffffu, s.top, offset);
    o.rest = __shfl_xor_sync(0xffffffffu, s.rest, offset);
    o.cx = __shfl_xor_sync(0xffffffffu, s.cx, offset);
    o.k = __shfl_xor_sync(0xffffffffu, s.k, offset);
    s.merge(o);
  }
  return s;
}

// ---- who owns which row ------------------------------------------------------------------------------

// GROUP = 32: a warp per row, blockDim.x / 32 rows per block. GROUP = 0: the whole block per row.
// Either way the grid loops over the rows, so the host can bound the rows in flight.
template <int GROUP>
struct Group {
  __device__ static int size() { return GROUP ? GROUP : blockDim.x; }
  __device__ static int rank() { return GROUP ? threadIdx.x % 32 : threadIdx.x; }
  __device__ static int64_t first_row() {
    return GROUP ? int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32 : int64_t(blockIdx.x);
  }
  __device__ static int64_t row_step() { return GROUP ? int64_t(gridDim.x) * (blockDim.x / 32) : gridDim.x; }

  // Every thread of the group gets the merged state.
  __device__ static State reduce(State s) {
    s = warp_reduce(s);
    if constexpr (GROUP == 0) {
      __shared__ float partial[32][kStateFloats];
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      __syncthreads();  // the previous row's readers are done with `partial`
      if (lane == 0) s.store_to(partial[warp]);
      __syncthreads();
      s = lane < int(blockDim.x / 32) ? State::load_from(partial[lane]) : State();
      s = warp_reduce(s);
    } else {
      __syncwarp();  // shuffles are no memory fence: order the lanes' reads before any lane's writes
    }
    return s;
  }
};

// ---- one row's targets and options ----------------------------------------------------------------

// GENERAL = false compiles the common case (class-index targets, no weight, no smoothing, no softcap)
// without the code of the others; z_loss costs a few flops per row and is always handled.
template <bool GENERAL>
struct RowMath {
  const Params& p;
  bool soft = false, has_c = false, ignored = false, bad = false;
  int t = 0;
  const char* prob = nullptr;  // this row's probabilities (soft)
  float eps = 0.f, smooth = 0.f, w_t = 1.f;
  // backward
  float coef = 0.f, g = 0.f;

  __device__ RowMath(const Params& params, int64_t row) : p(params) {
    if (GENERAL) {
      soft = p.target_prob != nullptr;
      eps = p.label_smoothing;
      smooth = eps / float(p.vocab);
      has_c = soft || eps > 0.f;
    }
    if (soft) {
      const int es = p.target_dtype == kFloat32 ? 4 : 2;
      prob = static_cast<const char*>(p.target_prob) + row * p.target_row_stride * es;
    } else {
      const int64_t target = p.target_index[row];
      ignored = target == p.ignore_index;
      bad = !ignored && (target < 0 || target >= p.vocab);  // NaN instead of a host-synchronising check
      t = ignored || bad ? 0 : int(target);
      if (GENERAL && p.weight) w_t = p.weight[t];
    }
  }

  __device__ __forceinline__ float cap(float x) const {
    if (GENERAL && p.softcap > 0.f) {
      // tanh(y) = 1 - 2 / (exp(2y) + 1), exact at both ends (exp overflows to inf -> 1, underflows -> -1)
      const float y = x / p.softcap;
      return p.softcap * (1.f - 2.f / (__expf(2.f * y) + 1.f));
    }
    return x;
  }

  __device__ __forceinline__ float probability(int j) const {
    switch (p.target_dtype) {
      case kFloat16: return __half2float(reinterpret_cast<const __half*>(prob)[j]);
      case kBFloat16: return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(prob)[j]);
      default: return reinterpret_cast<const float*>(prob)[j];
    }
  }

  // c_j without the (1 - eps) w_t [j == t] term of class-index targets.
  __device__ __forceinline__ float coefficient(int j) const {
    float c = soft ? probability(j) * (1.f - eps) + smooth : smooth;
    if (p.weight) c *= p.weight[j];
    return c;
  }

  // Adds the N elements starting at column j0 (x: raw logits, capped here in place).
  template <int N>
  __device__ __forceinline__ void accumulate(State& s, float (&x)[N], int j0) const {
    float pack_max = kLowest;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      x[i] = cap(x[i]);
      pack_max = fmaxf(pack_max, x[i]);
    }
    s.rebase(pack_max);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (x[i] == s.m)
        s.top += 1.f;
      else
        s.rest += __expf(x[i] - s.m);  // NaN logits land here and propagate
    }
    if (GENERAL && has_c) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float c = coefficient(j0 + i);
        s.cx += c * (x[i] - s.m);
        s.k += c;
      }
    }
  }

  // Per-row loss of the merged state; also lse and log s. x_t: the capped target logit.
  __device__ float finish(const State& s, float x_t, float& lse, float& log_s) const {
    log_s = s.top > 0.f ? logf(s.top) + log1p_exact(s.rest / s.top) : logf(s.rest);
    lse = s.m + log_s;
    float loss = GENERAL && has_c ? s.k * log_s - s.cx : 0.f;
    // lse - x_t as (m - x_t) + log s: exact for confident predictions, where lse ~ x_t
    if (!soft) loss += (1.f - eps) * w_t * ((s.m - x_t) + log_s);
    loss += p.z_loss * lse * lse;
    if (ignored) loss = 0.f;
    if (bad) loss = __int_as_float(0x7fc00000);  // NaN
    return loss;
  }

  // k_soft: sum_j c_j of probability targets (K of class-index targets follows from the weights).
  __device__ void begin_gradient(int64_t row, float lse, float k_soft) {
    g = p.grad_loss[row * p.grad_stride];
    float k = k_soft;
    if (!soft) {
      const float w_sum = GENERAL && p.weight ? *p.weight_sum : float(p.vocab);
      k = (1.f - eps) * w_t + smooth * w_sum;
      if (ignored) g = 0.f;
      if (bad) g = __int_as_float(0x7fc00000);
    }
    coef = k + 2.f * p.z_loss * lse;
  }

  // d = dloss/dx of N elements from column j0; x - shift - log_s is x' - lse, computed from the
  // unrounded m and log s where this launch has them.
  template <int N>
  __device__ __forceinline__ void gradient(const float (&x)[N], int j0, float shift, float log_s,
                                           float (&d)[N]) const {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float xc = cap(x[i]);
      const float delta = (xc - shift) - log_s;
      const float pj = __expf(delta);
      float dj = pj * coef;
      float c = 0.f;
      if (GENERAL && has_c) {
        c = coefficient(j0 + i);
        dj -= c;
      }
      if (!soft && j0 + i == t) {
        // the target's (1-eps) w_t (p_t - 1) with expm1: p_t ~ 1 for a confident prediction
        const float keep = (1.f - eps) * w_t;
        dj = keep * expm1_exact(delta) + pj * (coef - keep) - c;
      }
      if (GENERAL && p.softcap > 0.f) {
        const float y = xc / p.softcap;
        dj *= 1.f - y * y;
      }
      dj *= g;
      d[i] = ignored ? 0.f : dj;  // exact zeros, even where the row holds inf or NaN
    }
  }

  // This thread's share of sum_j c_j over the whole row (probability targets, backward without the
  // forward; the caller reduces it over the group).
  __device__ float k_sum(int rank, int size) const {
    float k = 0.f;
    for (int j = rank; j < int(p.vocab); j += size) k += coefficient(j);
    return k;
  }
};

// ---- the columns a thread visits ------------------------------------------------------------------

// A segment [c0, c1) of a row as: head elements up to the first 16-byte boundary, whole 16-byte packs,
// tail elements. VEC = 1 (rows whose logits and dlogits are aligned differently): all head.
// Columns are 32-bit (the host checks vocab < 2^30), row offsets 64-bit: it saves registers.
template <typename T, int VEC>
struct Span {
  int c0, body, packs, tail, c1;
  __device__ Span(const T* row, int begin, int end) : c0(begin), c1(end) {
    int head = end - begin;
    if (VEC > 1) {
      const int misaligned = int(reinterpret_cast<uintptr_t>(row + begin) % 16) / int(sizeof(T));
      head = min(head, (VEC - misaligned) % VEC);
    }
    body = begin + head;
    packs = VEC > 1 ? (end - body) / VEC : 0;
    tail = body + packs * VEC;
  }

  // f(column, x) on this thread's share of the row, x holding the 1 or VEC logits from that column as
  // floats: single elements, then packs. kBatch packs are loaded before any is used, so that many
  // loads are in flight even where f stores (the compiler may not move a load above a store that
  // could alias it: dlogits may be the logits).
  template <typename F>
  __device__ __forceinline__ void for_each(const T* row, int rank, int size, F&& f) const {
    for (int j = c0 + rank; j < body; j += size) {
      float x[1] = {to_float(row[j])};
      f(j, x);
    }
    for (int j = tail + rank; j < c1; j += size) {
      float x[1] = {to_float(row[j])};
      f(j, x);
    }
    if constexpr (VEC > 1) {
      constexpr int kBatch = 4;
      for (int v0 = rank; v0 < packs; v0 += kBatch * size) {
        uint4 raw[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b)
          if (v0 + b * size < packs) raw[b] = *reinterpret_cast<const uint4*>(row + body + (v0 + b * size) * VEC);
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (v0 + b * size < packs) {
            float x[VEC];
            unpack<T>(raw[b], x);
            f(body + (v0 + b * size) * VEC, x);
          }
        }
      }
    }
  }
};

// ---- kernels ------------------------------------------------------------------------------------------

// Rows (or, with gridDim.y > 1, segments of rows) in one or more passes; see Pass.
template <typename T, int VEC, int GROUP, bool GENERAL>
__global__ void __launch_bounds__(1024) row_kernel(Params p, int passes) {
  using G = Group<GROUP>;
  const int rank = G::rank(), size = G::size();
  const Segment seg(int(p.vocab), int(gridDim.y), int(blockIdx.y));

  for (int64_t row = G::first_row(); row < p.rows; row += G::row_step()) {
    const T* x_row = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    RowMath<GENERAL> r(p, row);
    const Span<T, VEC> span(x_row, seg.c0, seg.c1);
    float shift, log_s = 0.f, k_soft = 0.f;
    if (passes & (kForward | kPartial)) {
      // read before any thread of the row writes its gradient (dlogits may be the logits)
      const float x_t = r.soft ? 0.f : r.cap(to_float(x_row[r.t]));
      State s;
      span.for_each(x_row, rank, size, [&](int j, auto& x) { r.accumulate(s, x, j); });
      s = G::reduce(s);
      if (passes & kPartial) {
        if (rank == 0) s.store_to(p.workspace + (row * gridDim.y + blockIdx.y) * kStateFloats);
        continue;
      }
      float lse;
      const float loss = r.finish(s, x_t, lse, log_s);
      if (rank == 0) p.loss[row] = loss, p.lse[row] = lse;
      shift = s.m;
      k_soft = s.k;
    } else {
      shift = p.lse[row];
      if (GENERAL && r.soft) {
        State s;
        s.k = r.k_sum(rank, size);
        k_soft = G::reduce(s).k;
      }
    }
    if (!(passes & kBackward)) continue;
    r.begin_gradient(row, shift + log_s, k_soft);
    T* d_row = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
    span.for_each(x_row, rank, size, [&](int j, auto& x) {
      float d[std::extent_v<std::remove_reference_t<decltype(x)>>];
      r.gradient(x, j, shift, log_s, d);
      store<T>(d_row + j, d);
    });
  }
}

// The states of one row's segments, held by the blocks of a thread-block cluster, merged through
// distributed shared memory: every block gets the same state (same inputs, same order). `parity`
// alternates by row, so a block can store its next row's state while the others still read this one's.
__device__ __forceinline__ State cluster_merge(State s, int parity) {
#if __CUDA_ARCH__ >= 900
  __shared__ float slots[2][kStateFloats];
  __shared__ float merged[kStateFloats];
  auto cluster = cooperative_groups::this_cluster();
  if (threadIdx.x == 0) s.store_to(slots[parity]);
  cluster.sync();  // release / acquire: every block's state is visible to the cluster
  if (threadIdx.x < 32) {
    State o;
    if (threadIdx.x < cluster.num_blocks()) o = State::load_from(cluster.map_shared_rank(slots[parity], threadIdx.x));
    o = warp_reduce(o);
    if (threadIdx.x == 0) o.store_to(merged);  // the last row's readers passed this row's reduce barrier
  }
  __syncthreads();
  return State::load_from(merged);
#else
  __trap();  // the host launches clusters only where this code was built for sm_90+ (launch.cu checks)
  return s;
#endif
}

// The fused mode for rows held in registers (CACHE packs of 16 bytes per thread): each row is read
// from memory once, then its gradient computed from the registers. CLUSTER: the row is cut into
// gridDim.y segments, one per block of a cluster (sm_90+), whose states merge in cluster_merge.
template <typename T, bool GENERAL, int CACHE, bool CLUSTER>
__global__ void __launch_bounds__(1024) cached_row_kernel(Params p) {
  constexpr int VEC = 16 / sizeof(T);
  const int rank = threadIdx.x, size = blockDim.x;
  const Segment seg(int(p.vocab), int(gridDim.y), int(blockIdx.y));
  int parity = 0;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x, parity ^= 1) {
    const T* x_row = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* d_row = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
    RowMath<GENERAL> r(p, row);
    const Span<T, VEC> span(x_row, seg.c0, seg.c1);
    // for the loss, which the first block writes; read before any thread stores (in place), in a
    // cluster before the barrier that precedes every block's stores
    const float x_t = r.soft || blockIdx.y != 0 ? 0.f : r.cap(to_float(x_row[r.t]));
    uint4 cache[CACHE];
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int v = rank + i * size;
      if (v < span.packs) cache[i] = *reinterpret_cast<const uint4*>(x_row + span.body + v * VEC);
    }
    State s;
    for (int j = span.c0 + rank; j < span.body; j += size) {
      float x[1] = {to_float(x_row[j])};
      r.accumulate(s, x, j);
    }
    for (int j = span.tail + rank; j < span.c1; j += size) {
      float x[1] = {to_float(x_row[j])};
      r.accumulate(s, x, j);
    }
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int v = rank + i * size;
      if (v < span.packs) {
        float x[VEC];
        unpack<T>(cache[i], x);
        r.accumulate(s, x, span.body + v * VEC);
      }
    }
    s = Group<0>::reduce(s);
    if constexpr (CLUSTER) s = cluster_merge(s, parity);
    float lse, log_s;
    const float loss = r.finish(s, x_t, lse, log_s);
    if (rank == 0 && blockIdx.y == 0) p.loss[row] = loss, p.lse[row] = lse;

    r.begin_gradient(row, lse, s.k);
    auto single = [&](int j) {
      float x[1] = {to_float(x_row[j])}, d[1];
      r.gradient(x, j, s.m, log_s, d);
      d_row[j] = from_float<T>(d[0]);
    };
    for (int j = span.c0 + rank; j < span.body; j += size) single(j);
    for (int j = span.tail + rank; j < span.c1; j += size) single(j);
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int v = rank + i * size;
      if (v < span.packs) {
        float x[VEC], d[VEC];
        unpack<T>(cache[i], x);
        r.gradient(x, span.body + v * VEC, s.m, log_s, d);
        store<T>(d_row + span.body + v * VEC, d);
      }
    }
  }
#if __CUDA_ARCH__ >= 900
  // no block leaves while another may still read its shared memory
  if constexpr (CLUSTER) cooperative_groups::this_cluster().sync();
#endif
}

// Split rows: merges the segments' states of each row (a warp per row) into its loss and lse.
template <typename T, bool GENERAL>
__global__ void finalize_kernel(Params p, int splits) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= p.rows) return;
  State s;
  for (int i = lane; i < splits; i += 32) s.merge(State::load_from(p.workspace + (row * splits + i) * kStateFloats));
  s = warp_reduce(s);
  const RowMath<GENERAL> r(p, row);
  const T* x_row = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  const float x_t = r.soft ? 0.f : r.cap(to_float(x_row[r.t]));
  float lse, log_s;
  const float loss = r.finish(s, x_t, lse, log_s);
  if (lane == 0) p.loss[row] = loss, p.lse[row] = lse;
}

// grad[row, :] *= *scale, returning at once when the scale is 1: the check happens on the device, so
// the fused mode's backward costs nothing in the common case and never syncs the host.
template <typename T>
__global__ void scale_kernel(T* grad, int64_t rows, int64_t vocab, int64_t row_stride, const float* scale_ptr) {
  const float scale = *scale_ptr;
  if (scale == 1.f) return;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // grid.x is capped: rows may exceed 2^31
    T* row = grad + r * row_stride;
    for (int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; j < vocab; j += int64_t(gridDim.y) * blockDim.x)
      row[j] = from_float<T>(to_float(row[j]) * scale);
  }
}

// ---- host side of one dtype (instantiated in kernels_<dtype>.cu) ----------------------------------

template <typename T, int VEC, int GROUP>
void launch_row_kernel(const Params& p, const Launch& l, int passes, cudaStream_t stream, bool general) {
  const dim3 grid(unsigned(l.blocks), unsigned(l.splits));
  if (general)
    row_kernel<T, VEC, GROUP, true><<<grid, l.threads, 0, stream>>>(p, passes);
  else
    row_kernel<T, VEC, GROUP, false><<<grid, l.threads, 0, stream>>>(p, passes);
}

template <typename T>
void launch_rows(const Params& p, const Launch& l, int passes, cudaStream_t stream, bool general) {
  constexpr int kVec = 16 / sizeof(T);
  // the cached layouts serve the common case only: the general one would spill its cache
  if (l.layout == kBlockPerRowCached) {
    cached_row_kernel<T, false, kCachePacks, false><<<unsigned(l.blocks), l.threads, 0, stream>>>(p);
  } else if (l.layout == kClusterRowCached) {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(unsigned(l.blocks), unsigned(l.splits));
    config.blockDim = dim3(unsigned(l.threads));
    config.stream = stream;
    cudaLaunchAttribute cluster = {};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 1, cluster.val.clusterDim.y = unsigned(l.splits), cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
    // its error, like a <<<>>> launch's, reaches the caller's cudaGetLastError
    cudaLaunchKernelEx(&config, cached_row_kernel<T, false, kCachePacks, true>, p);
  } else if (l.layout == kWarpPerRow) {
    if (l.vectorized)
      launch_row_kernel<T, kVec, 32>(p, l, passes, stream, general);
    else
      launch_row_kernel<T, 1, 32>(p, l, passes, stream, general);
  } else {
    if (l.vectorized)
      launch_row_kernel<T, kVec, 0>(p, l, passes, stream, general);
    else
      launch_row_kernel<T, 1, 0>(p, l, passes, stream, general);
  }
}

// Whether cached_row_kernel's cluster code runs on the current device: the code the driver picks for it
// must come from sm_90+ (an sm_80 build JIT-compiled for a Hopper GPU has only the trap).
template <typename T>
cudaError_t cluster_code_runs(bool* runs) {
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, cached_row_kernel<T, false, kCachePacks, true>);
  *runs = status == cudaSuccess && attributes.ptxVersion >= 90;
  return status;
}

template <typename T>
void launch_finalize(const Params& p, int splits, cudaStream_t stream, bool general) {
  constexpr int kThreads = 256, kRowsPerBlock = kThreads / 32;
  const unsigned blocks = unsigned((p.rows + kRowsPerBlock - 1) / kRowsPerBlock);
  if (general)
    finalize_kernel<T, true><<<blocks, kThreads, 0, stream>>>(p, splits);
  else
    finalize_kernel<T, false><<<blocks, kThreads, 0, stream>>>(p, splits);
}

template <typename T>
void launch_scale(void* grad, int64_t rows, int64_t vocab, int64_t row_stride, const float* scale,
                  cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t col_blocks = std::min<int64_t>((vocab + kThreads * 8 - 1) / (kThreads * 8), 65535);
  const int64_t row_blocks = std::min<int64_t>(rows, 0x7fffffff);
  scale_kernel<T><<<dim3(unsigned(row_blocks), unsigned(col_blocks)), kThreads, 0, stream>>>(
      static_cast<T*>(grad), rows, vocab, row_stride, scale);
}

// One instantiation per logits dtype, in kernels_<dtype>.cu; launch.cu declares them and picks by dtype code.
#define FUSEDCE_TEMPLATES(prefix, T)                                                                      \
  prefix template void launch_rows<T>(const Params&, const Launch&, int, cudaStream_t, bool);             \
  prefix template void launch_finalize<T>(const Params&, int, cudaStream_t, bool);                        \
  prefix template cudaError_t cluster_code_runs<T>(bool*);                                                 \
  prefix template void launch_scale<T>(void*, int64_t, int64_t, int64_t, const float*, cudaStream_t);
#define FUSEDCE_INSTANTIATE(T) FUSEDCE_TEMPLATES(, T)
#define FUSEDCE_DECLARE(T) FUSEDCE_TEMPLATES(extern, T)

}  // namespace cuda
}  // namespace fusedce
