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
// A vocabulary-parallel shard (Params::states, target_mass) holds some of a row's columns: V in eps/V is
// the global class count, its forward stops at the merged state of its columns (the split rows' path, with
// the merged state stored instead of the loss), and its backward takes the global lse and K.
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
// Segment `part` of a row cut into `parts` (blocks of a split row or of a cluster): [c0, c1).
struct Segment {
  int c0, c1;
  __device__ Segment(int vocab, int parts, int part) {
    c0 = min(vocab, part * segment_length(vocab, parts));
    c1 = min(vocab, c0 + segment_length(vocab, parts));
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
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    // a bf16 is the upper half of the float it widens to: a shift or a mask per element, not a conversion
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&raw);
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      x[2 * k] = __uint_as_float(w[k] << 16);
      x[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  } else {
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = to_float(v[i]);
  }
}

// Two floats rounded to nearest even into the 32-bit word of two 16-bit elements (one conversion for both).
template <typename T>
__device__ __forceinline__ uint32_t pair(float lo, float hi) {
  uint32_t w;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&w, &h, 4);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&w, &h, 4);
  }
  return w;
}

// A 16-byte pack goes out in one 16-byte store. Written in PTX because nvcc 13.0 splits the plain C++
// store of a uint4 into four 4-byte stores in these kernels (SASS: STG.E, not STG.E.128), four times the
// store instructions and L2 write requests for the same bytes.
template <typename T, int N>
__device__ __forceinline__ void store(T* dst, const float* d) {
  if constexpr (N * sizeof(T) == 16) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (sizeof(T) == 4)
        w[k] = __float_as_uint(d[k]);
      else
        w[k] = pair<T>(d[2 * k], d[2 * k + 1]);
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

// __fdividef: 2 ulp, without the IEEE division's operand checks and slow path; both quotients here are of
// moderate operands (r / (u - 1) ~ 1, rest / top with top a count >= 1)
__device__ __forceinline__ float log1p_exact(float r) {
  const float u = 1.f + r;
  return u == 1.f ? r : logf(u) * __fdividef(r, u - 1.f);  // Goldberg: exact to a few ulp for small r
}

__device__ __forceinline__ float expm1_exact(float d) {
  const float u = expf(d);
  if (fabsf(d) >= 0.5f) return u - 1.f;
  return u == 1.f ? d : (u - 1.f) * d / logf(u);  // Kahan's trick
}

// exp(x) = exp2(x * kLog2e): ex2.approx.ftz is one MUFU instruction (exp2f and __expf add a fix-up for
// denormal results; a term below 2^-126 of the row's max, or such a probability, is 0 to fp32 accuracy anyway)
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
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

  // Re-expresses the state relative to a max m_new >= m, without a branch: where the max stayed, the
  // scale is exp2(0) = 1 and top and rest keep their values exactly.
  __device__ __forceinline__ void rebase(float m_new) {
    const float scale = exp2_ftz((m - m_new) * kLog2e);
    const bool grew = m_new > m;
    rest = fmaf(rest, scale, grew ? top * scale : 0.f);
    top = grew ? 0.f : top;
    cx = k != 0.f ? cx - k * (m_new - m) : cx;
    m = m_new;
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

// The states of a warp merged, in two steps: the max of their maxima, then every state re-expressed relative
// to it (one rebase a thread; a butterfly over whole states would rebase two states per step) and the sums
// of top and rest, and of cx and k where the row has coefficients (WITH_C). Every lane gets the result.
template <bool WITH_C>
__device__ __forceinline__ State warp_merge(State s) {
  float m = s.m;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  s.rebase(m);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    s.top += __shfl_xor_sync(0xffffffffu, s.top, offset);
    s.rest += __shfl_xor_sync(0xffffffffu, s.rest, offset);
    if (WITH_C) {
      s.cx += __shfl_xor_sync(0xffffffffu, s.cx, offset);
      s.k += __shfl_xor_sync(0xffffffffu, s.k, offset);
    }
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

  // Every thread of the group gets the merged state (cx and k merged too where WITH_C).
  template <bool WITH_C>
  __device__ static State reduce(State s) {
    s = warp_merge<WITH_C>(s);
    if constexpr (GROUP == 0) {
      __shared__ float partial[32][kStateFloats];
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      __syncthreads();  // the previous row's readers are done with `partial`
      if (lane == 0) s.store_to(partial[warp]);
      __syncthreads();
      s = lane < int(blockDim.x / 32) ? State::load_from(partial[lane]) : State();
      s = warp_merge<WITH_C>(s);
    } else {
      __syncwarp();  // shuffles are no memory fence: order the lanes' reads before any lane's writes
    }
    return s;
  }

  // Orders the group's loads and stores before it against those after it.
  __device__ static void sync() {
    if constexpr (GROUP == 0)
      __syncthreads();
    else
      __syncwarp();
  }
};

// ---- one row's targets and options ----------------------------------------------------------------

__device__ __forceinline__ float rsqrt_ftz(float x) {
  float y;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh to a few ulp without a division (as triton_kernels/cross_entropy.py's _tanh): a Taylor polynomial
// where |y| < 0.3, where 1 - 2 / (exp(2|y|) + 1) would lose relative accuracy; above, 1 - 2 r^2 with
// r = rsqrt(exp(2|y|) + 1). Exact at both ends (exp2 overflows to inf -> 1).
__device__ __forceinline__ float tanh_accurate(float y) {
  const float z = y * y;
  float poly = fmaf(0.021869488536155203f, z, -0.053968253968253971f);  // 62/2835 z - 17/315
  poly = fmaf(poly, z, 0.13333333333333333f);                           // 2/15
  poly = fmaf(poly, z, -0.33333333333333333f);
  const float small = fmaf(y * z, poly - 0.0088632355299021966f * (z * z * z), y);  // - 1382/155925 y^11
  const float r = rsqrt_ftz(exp2_ftz(fabsf(y) * (2.f * kLog2e)) + 1.f);
  const float large = copysignf(fmaf(-2.f * r, r, 1.f), y);
  return fabsf(y) < 0.3f ? small : large;
}

// GENERAL = false compiles the common case (class-index targets, no weight, no smoothing, no softcap)
// without the code of the others; z_loss costs a few flops per row and is always handled.
// SHARDS = false: whole rows only (the cached layouts), without the per-row code of a shard's rows.
template <bool GENERAL, bool SHARDS = true>
struct RowMath {
  const Params& p;
  bool soft = false, has_c = false, ignored = false;
  // the target is not one of these columns: out of range (a NaN loss and gradient instead of a
  // host-synchronising check), or on another shard (no term here, and no error)
  bool elsewhere = false;
  int t = 0;
  const char* prob = nullptr;  // this row's probabilities (soft)
  float eps = 0.f, smooth = 0.f, w_t = 1.f;
  // backward
  float coef = 0.f, g = 0.f, gc = 0.f;  // gc = g * coef

  __device__ RowMath(const Params& params, int64_t row) : p(params) {
    if (GENERAL) {
      soft = p.target_prob != nullptr;
      eps = p.label_smoothing;
      smooth = eps / float(p.classes);
      has_c = soft || eps > 0.f;
    }
    if (soft) {
      const int es = p.target_dtype == kFloat32 ? 4 : 2;
      prob = static_cast<const char*>(p.target_prob) + row * p.target_row_stride * es;
    } else {
      const int64_t target = p.target_index[row], local = SHARDS ? target - p.class_start : target;
      ignored = target == p.ignore_index;
      elsewhere = !ignored && (local < 0 || local >= p.vocab);
      t = ignored || elsewhere ? 0 : int(local);
      if (GENERAL && p.weight) w_t = p.weight[t];
    }
  }

  __device__ __forceinline__ float cap(float x) const {
    if (GENERAL && p.softcap > 0.f) return p.softcap * tanh_accurate(x * (1.f / p.softcap));
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

  // Adds N elements (x: raw logits, capped here in place; column(i): the column of x[i]) with one rebase.
  template <int N, typename Column>
  __device__ __forceinline__ void accumulate(State& s, float (&x)[N], Column column) const {
    float batch_max = kLowest;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      x[i] = cap(x[i]);
      batch_max = fmaxf(batch_max, x[i]);
    }
    s.rebase(fmaxf(s.m, batch_max));
    add(s, x, column);
  }

  // Adds N capped elements no larger than s.m: per element a subtraction, exp2 and the top/rest split,
  // without a branch: an element equal to the max adds 1 to top, any other (NaN too, which propagates) its
  // exp to rest.
  template <int N, typename Column>
  __device__ __forceinline__ void add(State& s, const float (&x)[N], Column column) const {
    float others = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float d = x[i] - s.m;
      const float other = d != 0.f ? 1.f : 0.f;
      s.rest = fmaf(exp2_ftz(d * kLog2e), other, s.rest);
      others += other;
    }
    s.top += float(N) - others;
    if (GENERAL && has_c) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float c = coefficient(column(i));
        s.cx = fmaf(c, x[i] - s.m, s.cx);
        s.k += c;
      }
    }
  }

  // Per-row loss of the merged state; also lse and log s. x_t: the capped target logit.
  __device__ float finish(const State& s, float x_t, float& lse, float& log_s) const {
    log_s = s.top > 0.f ? logf(s.top) + log1p_exact(__fdividef(s.rest, s.top)) : logf(s.rest);
    lse = s.m + log_s;
    float loss = GENERAL && has_c ? s.k * log_s - s.cx : 0.f;
    // lse - x_t as (m - x_t) + log s: exact for confident predictions, where lse ~ x_t
    if (!soft) loss += (1.f - eps) * w_t * ((s.m - x_t) + log_s);
    loss += p.z_loss * lse * lse;
    if (ignored) loss = 0.f;
    if (elsewhere) loss = __int_as_float(0x7fc00000);  // NaN (a shard's forward stops at its states)
    return loss;
  }

  // k_soft: sum_j c_j of probability targets (K of class-index targets follows from the weights).
  __device__ void begin_gradient(int64_t row, float lse, float k_soft) {
    g = p.grad_loss[row * p.grad_stride];
    float k = k_soft;
    if (SHARDS && p.target_mass) {  // a shard's row: the global K
      k = p.target_mass[row];
    } else if (!soft) {
      const float w_sum = GENERAL && p.weight ? *p.weight_sum : float(p.vocab);
      k = (1.f - eps) * w_t + smooth * w_sum;
      if (elsewhere) g = __int_as_float(0x7fc00000);
    }
    coef = k + 2.f * p.z_loss * lse;
    gc = g * coef;
  }

  // d = dloss/dx of N elements, but the target column's (1 - eps) w_t [j == t] term, which target_gradient
  // adds once per row; p_j = exp(x'_j - shift - log_s) from the unrounded max and log s where this launch
  // has them (else shift = lse, log_s = 0). Ignored rows store zeros instead (see zeros()).
  template <int N, typename Column>
  __device__ __forceinline__ void gradient(const float (&x)[N], Column column, float shift, float log_s,
                                           float (&d)[N]) const {
    const float log_s2 = log_s * kLog2e;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float xc = cap(x[i]);
      float dj = exp2_ftz(fmaf(xc - shift, kLog2e, -log_s2)) * gc;
      if (GENERAL && has_c) dj = fmaf(-coefficient(column(i)), g, dj);
      if (GENERAL && p.softcap > 0.f) {
        const float y = xc * (1.f / p.softcap);
        dj *= fmaf(-y, y, 1.f);
      }
      d[i] = dj;
    }
  }

  // The target's gradient, exact for a confident prediction (p_t ~ 1): what gradient() leaves out is
  // -(1-eps) w_t g, and (1-eps) w_t (p_t - 1) = (1-eps) w_t expm1(delta) with delta = x'_t - lse, so
  //   d_t = g [(1-eps) w_t expm1(delta) + p_t (coef - (1-eps) w_t) - c_t]  (times the softcap's derivative)
  // x_t: the raw target logit.
  __device__ float target_gradient(float x_t, float shift, float log_s) const {
    const float xc = cap(x_t);
    const float delta = (xc - shift) - log_s;
    const float keep = (1.f - eps) * w_t;
    float d = keep * expm1_exact(delta) + expf(delta) * (coef - keep) - (GENERAL && has_c ? coefficient(t) : 0.f);
    if (GENERAL && p.softcap > 0.f) {
      const float y = xc / p.softcap;
      d *= 1.f - y * y;
    }
    return d * g;
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

  // f(column, x) on this thread's share of the row: x holds N logits as floats and column(i) is the column
  // of x[i]. N = 1 for the elements before the first and after the last 16-byte pack (fewer than VEC each
  // side, so at most one per thread), BATCH * VEC for a batch of packs, VEC for the packs after the last
  // whole batch. A batch's packs are loaded before any is used, so that many loads are in flight even where
  // f stores (the compiler may not move a load above a store that could alias it: dlogits may be the
  // logits). The loop over whole batches has no branch but its own.
  template <int BATCH, typename F>
  __device__ __forceinline__ void for_each(const T* row, int rank, int size, F&& f) const {
    constexpr int kBatch = BATCH;
    auto element = [&](int j) {
      float x[1] = {to_float(row[j])};
      f([j](int) { return j; }, x);
    };
    if constexpr (VEC == 1) {
      for (int j = c0 + rank; j < c1; j += size) element(j);
    } else {
      if (c0 + rank < body) element(c0 + rank);
      if (tail + rank < c1) element(tail + rank);
      const T* packs_row = row + body;
      int v0 = rank;
      for (; v0 + (kBatch - 1) * size < packs; v0 += kBatch * size) {
        uint4 raw[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) raw[b] = *reinterpret_cast<const uint4*>(packs_row + (v0 + b * size) * VEC);
        float x[kBatch * VEC];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) unpack<T>(raw[b], *reinterpret_cast<float(*)[VEC]>(x + b * VEC));
        const int first = body + v0 * VEC, stride = size * VEC;
        f([first, stride](int i) { return first + (i / VEC) * stride + i % VEC; }, x);
      }
#pragma unroll
      for (int b = 0; b < kBatch - 1; ++b) {
        const int v = v0 + b * size;
        if (v < packs) {
          float x[VEC];
          unpack<T>(*reinterpret_cast<const uint4*>(packs_row + v * VEC), x);
          const int first = body + v * VEC;
          f([first](int i) { return first + i; }, x);
        }
      }
    }
  }
};

// ---- kernels ------------------------------------------------------------------------------------------

// The gradient of the elements f got from Span::for_each, stored: single elements, or 16-byte packs.
template <typename T, int VEC, bool GENERAL, bool SHARDS, typename Column, int N>
__device__ __forceinline__ void store_gradient(const RowMath<GENERAL, SHARDS>& r, T* d_row, Column column,
                                               const float (&x)[N], float shift, float log_s) {
  float d[N];
  r.gradient(x, column, shift, log_s, d);
  if constexpr (N == 1) {
    d_row[column(0)] = from_float<T>(d[0]);
  } else {
#pragma unroll
    for (int b = 0; b < N / VEC; ++b) store<T, VEC>(d_row + column(b * VEC), d + b * VEC);
  }
}

// Zeros over this thread's share of a segment (the gradient of an ignored row: exact, whatever the row holds).
template <typename T, int VEC>
__device__ __forceinline__ void store_zeros(const Span<T, VEC>& span, T* d_row, int rank, int size) {
  for (int j = span.c0 + rank; j < span.body; j += size) d_row[j] = from_float<T>(0.f);
  for (int j = span.tail + rank; j < span.c1; j += size) d_row[j] = from_float<T>(0.f);
  const float zero[VEC] = {};
  for (int v = rank; v < span.packs; v += size) store<T, VEC>(d_row + span.body + v * VEC, zero);
}

// Rows (or, with gridDim.y > 1, segments of rows) in one or more passes (see Pass): PASSES as a compile-time
// constant, so that the 16-byte kernels of each mode hold only that mode's loops, or 0 for the `passes`
// argument (the scalar kernels of unaligned rows). A forward over segments (gridDim.y > 1) stores each
// segment's state (kPartial) for finalize_kernel.
template <typename T, int VEC, int GROUP, bool GENERAL, int PASSES>
__global__ void __launch_bounds__(1024) row_kernel(Params p, int runtime_passes) {
  using G = Group<GROUP>;
  // 16-byte packs in flight per thread; the general kernels' per-element work needs the registers
  constexpr int kBatch = GENERAL ? 1 : 4;
  const int passes = PASSES ? PASSES : runtime_passes;
  // partial: the forward of a split row, or a shard's forward (its states merge in finalize_kernel too)
  const bool forward = passes & (kForward | kPartial), partial = forward && (gridDim.y > 1 || p.states);
  const int rank = G::rank(), size = G::size();
  const Segment seg(int(p.vocab), int(gridDim.y), int(blockIdx.y));

  for (int64_t row = G::first_row(); row < p.rows; row += G::row_step()) {
    const T* x_row = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    RowMath<GENERAL> r(p, row);
    const Span<T, VEC> span(x_row, seg.c0, seg.c1);
    // the raw target logit (loss, target gradient); read before any thread of the row stores: before the
    // reduction, or the sync of the backward (dlogits may be the logits)
    const float x_t = r.soft ? 0.f : to_float(x_row[r.t]);
    float shift, log_s = 0.f, k_soft = 0.f;
    if (forward) {
      State s;
      span.template for_each<kBatch>(x_row, rank, size, [&](auto column, auto& x) { r.accumulate(s, x, column); });
      s = G::template reduce<GENERAL>(s);
      if (partial) {
        if (rank == 0) s.store_to(p.workspace + (row * gridDim.y + blockIdx.y) * kStateFloats);
        continue;
      }
      float lse;
      const float loss = r.finish(s, r.cap(x_t), lse, log_s);
      if (rank == 0) p.loss[row] = loss, p.lse[row] = lse;
      shift = s.m;
      k_soft = s.k;
    } else {
      shift = p.lse[row];
      if (GENERAL && r.soft && !p.target_mass) {
        State s;
        s.k = r.k_sum(rank, size);
        k_soft = G::template reduce<true>(s).k;
      }
      G::sync();
    }
    if (!(passes & kBackward)) continue;
    r.begin_gradient(row, shift + log_s, k_soft);
    T* d_row = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
    if (r.ignored) {
      store_zeros(span, d_row, rank, size);
      continue;
    }
    span.template for_each<kBatch>(
        x_row, rank, size, [&](auto column, auto& x) { store_gradient<T, VEC>(r, d_row, column, x, shift, log_s); });
    if (!r.soft && !r.elsewhere && seg.c0 <= r.t && r.t < seg.c1) {
      G::sync();  // after the store of the target's column by whichever thread had it
      if (rank == 0) d_row[r.t] = from_float<T>(r.target_gradient(x_t, shift, log_s));
    }
  }
}

// The states of one row's segments, held by the blocks of a thread-block cluster, merged through
// distributed shared memory: every block gets the same state (same inputs, same order). `parity`
// alternates by row, so a block can store its next row's state while the others still read this one's.
// The common case only (no coefficients: the cached layouts' rows).
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
    o = warp_merge<false>(o);
    if (threadIdx.x == 0) o.store_to(merged);  // the last row's readers passed this row's reduce barrier
  }
  __syncthreads();
  return State::load_from(merged);
#else
  __trap();  // the host launches clusters only where this code was built for sm_90+ (launch.cu checks)
  return s;
#endif
}

// The largest of m and a 16-byte pack's elements, without unpacking bf16 (two elements per max).
template <typename T>
__device__ __forceinline__ float pack_max(const uint4& raw, float m) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162* v = reinterpret_cast<const __nv_bfloat162*>(&raw);
    const __nv_bfloat162 h = __hmax2(__hmax2(v[0], v[1]), __hmax2(v[2], v[3]));
    return fmaxf(m, fmaxf(__low2float(h), __high2float(h)));
  } else {
    float x[16 / sizeof(T)];
    unpack<T>(raw, x);
#pragma unroll
    for (int i = 0; i < int(16 / sizeof(T)); ++i) m = fmaxf(m, x[i]);
    return m;
  }
}

// The fused mode for rows held in registers (CACHE packs of 16 bytes per thread): each row is read
// from memory once, then its gradient computed from the registers. CLUSTER: the row is cut into
// gridDim.y segments, one per block of a cluster (sm_90+), whose states merge in cluster_merge. The row
// is all in registers, so each thread finds its max first and rebases once, instead of once per pack.
template <typename T, bool GENERAL, int CACHE, bool CLUSTER>
__global__ void __launch_bounds__(kCachedThreads) cached_row_kernel(Params p) {
  static_assert(!GENERAL, "the cached layouts serve the common case: the general one would spill its cache");
  constexpr int VEC = 16 / sizeof(T);
  const int rank = threadIdx.x, size = blockDim.x;
  const Segment seg(int(p.vocab), int(gridDim.y), int(blockIdx.y));
  int parity = 0;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x, parity ^= 1) {
    const T* x_row = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* d_row = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
    RowMath<GENERAL, false> r(p, row);
    const Span<T, VEC> span(x_row, seg.c0, seg.c1);
    // for the loss (the first block) and the target's gradient (the block whose segment holds it); read
    // before any thread stores (in place), in a cluster before the barrier that precedes every block's stores
    const float x_t = r.soft ? 0.f : to_float(x_row[r.t]);
    uint4 cache[CACHE];
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int v = rank + i * size;
      if (v < span.packs) cache[i] = *reinterpret_cast<const uint4*>(x_row + span.body + v * VEC);
    }
    // the element before the first pack and the one after the last, where this thread has them (-inf: none)
    const int edge_column[2] = {span.c0 + rank, span.tail + rank};
    const bool has_edge[2] = {edge_column[0] < span.body, edge_column[1] < span.c1};
    float edge[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (has_edge[e]) edge[e] = to_float(x_row[edge_column[e]]);
    float m = fmaxf(kLowest, fmaxf(edge[0], edge[1]));
#pragma unroll
    for (int i = 0; i < CACHE; ++i)
      if (rank + i * size < span.packs) m = pack_max<T>(cache[i], m);
    State s;
    s.rebase(m);
    r.add(s, edge, [&](int e) { return edge_column[e]; });
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int v = rank + i * size;
      if (v < span.packs) {
        float x[VEC];
        unpack<T>(cache[i], x);
        const int first = span.body + v * VEC;
        r.add(s, x, [first](int k) { return first + k; });
      }
    }
    s = Group<0>::reduce<false>(s);
    if constexpr (CLUSTER) s = cluster_merge(s, parity);
    float lse, log_s;
    const float loss = r.finish(s, r.cap(x_t), lse, log_s);
    if (rank == 0 && blockIdx.y == 0) p.loss[row] = loss, p.lse[row] = lse;

    r.begin_gradient(row, lse, s.k);
    if (r.ignored) {
      store_zeros(span, d_row, rank, size);
      continue;
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (has_edge[e]) {
        const float x[1] = {edge[e]};
        store_gradient<T, VEC>(r, d_row, [&](int) { return edge_column[e]; }, x, s.m, log_s);
      }
    }
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int v = rank + i * size;
      if (v < span.packs) {
        float x[VEC];
        unpack<T>(cache[i], x);
        const int first = span.body + v * VEC;
        store_gradient<T, VEC>(r, d_row, [first](int k) { return first + k; }, x, s.m, log_s);
      }
    }
    if (!r.soft && seg.c0 <= r.t && r.t < seg.c1) {
      __syncthreads();  // after the store of the target's column by whichever thread had it
      if (rank == 0) d_row[r.t] = from_float<T>(r.target_gradient(x_t, s.m, log_s));
    }
  }
#if __CUDA_ARCH__ >= 900
  // no block leaves while another may still read its shared memory
  if constexpr (CLUSTER) cooperative_groups::this_cluster().sync();
#endif
}

// Split rows: merges the segments' states of each row (a warp per row) into its loss and lse, or a shard's
// into its state (m, s - 1, cx, k), s - 1 without cancellation (see backends/__init__.py).
template <typename T, bool GENERAL>
__global__ void finalize_kernel(Params p, int splits) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= p.rows) return;
  State s;
  for (int i = lane; i < splits; i += 32) s.merge(State::load_from(p.workspace + (row * splits + i) * kStateFloats));
  s = warp_merge<GENERAL>(s);
  if (p.states) {
    if (lane == 0) {
      float* state = p.states + row * 4;
      state[0] = s.m, state[1] = (s.top - 1.f) + s.rest, state[2] = s.cx, state[3] = s.k;  // s - 1
    }
    return;
  }
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

template <typename T, int VEC, int GROUP, int PASSES>
void launch_row_kernel(const Params& p, const Launch& l, int passes, cudaStream_t stream, bool general) {
  const dim3 grid(unsigned(l.blocks), unsigned(l.splits));
  if (general)
    row_kernel<T, VEC, GROUP, true, PASSES><<<grid, l.threads, 0, stream>>>(p, passes);
  else
    row_kernel<T, VEC, GROUP, false, PASSES><<<grid, l.threads, 0, stream>>>(p, passes);
}

// The 16-byte kernels get one instantiation per mode (their passes a compile-time constant), the scalar
// kernels of unaligned rows one for all (passes read at run time).
template <typename T, int GROUP>
void launch_mode(const Params& p, const Launch& l, int passes, cudaStream_t stream, bool general) {
  constexpr int kVec = 16 / sizeof(T);
  if (!l.vectorized)
    launch_row_kernel<T, 1, GROUP, 0>(p, l, passes, stream, general);
  else if (passes & kBackward)
    if (passes & kForward)
      launch_row_kernel<T, kVec, GROUP, kForward | kBackward>(p, l, passes, stream, general);
    else
      launch_row_kernel<T, kVec, GROUP, kBackward>(p, l, passes, stream, general);
  else  // kForward, or kPartial: the forward of a split row
    launch_row_kernel<T, kVec, GROUP, kForward>(p, l, passes, stream, general);
}

template <typename T>
void launch_rows(const Params& p, const Launch& l, int passes, cudaStream_t stream, bool general) {
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
    launch_mode<T, 32>(p, l, passes, stream, general);
  } else {
    launch_mode<T, 0>(p, l, passes, stream, general);
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

// Registers a thread of the 16-byte row kernels (the most of their variants: every layout and mode that
// plan() picks for 16-byte rows) and of the cached layouts' kernel use, as the runtime reports them for the
// current device's code; plan() counts the blocks an SM holds with them.
template <typename T>
cudaError_t kernel_registers(int* row, int* cached) {
  constexpr int kVec = 16 / sizeof(T);
  const void* rows[] = {
      reinterpret_cast<const void*>(row_kernel<T, kVec, 0, false, kForward>),
      reinterpret_cast<const void*>(row_kernel<T, kVec, 0, false, kBackward>),
      reinterpret_cast<const void*>(row_kernel<T, kVec, 0, false, kForward | kBackward>),
      reinterpret_cast<const void*>(row_kernel<T, kVec, 0, true, kForward | kBackward>),
      reinterpret_cast<const void*>(row_kernel<T, kVec, 32, false, kForward | kBackward>),
      reinterpret_cast<const void*>(row_kernel<T, kVec, 32, true, kForward | kBackward>)};
  cudaFuncAttributes attributes;
  *row = 0;
  for (const void* kernel : rows) {
    if (const cudaError_t status = cudaFuncGetAttributes(&attributes, kernel)) return status;
    *row = std::max(*row, attributes.numRegs);
  }
  const cudaError_t status = cudaFuncGetAttributes(&attributes, cached_row_kernel<T, false, kCachePacks, false>);
  *cached = attributes.numRegs;
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
  prefix template cudaError_t kernel_registers<T>(int*, int*);                                             \
  prefix template void launch_scale<T>(void*, int64_t, int64_t, int64_t, const float*, cudaStream_t);
#define FUSEDCE_INSTANTIATE(T) FUSEDCE_TEMPLATES(, T)
#define FUSEDCE_DECLARE(T) FUSEDCE_TEMPLATES(extern, T)

}  // namespace cuda
}  // namespace fusedce
