// Row kernels of the CPU cross-entropy, compiled once per instruction set: each kernel_<isa>.cpp sets
// `#pragma GCC target(...)`, defines FUSEDCE_ISA and includes this file, so the same source becomes
// AVX-512, AVX2 and baseline x86-64 code and dispatch.cpp picks one at run time. The wheel then runs
// on any x86-64 CPU without -march=native.
//
// Math (per row, x' = softcap(x), p = softmax(x'), lse = log sum exp x'):
//   every option reduces to per-class target coefficients c_j:
//     class index t:  c_j = (1-eps) w_t [j == t] + (eps/V) w_j        (torch's label smoothing with weight)
//     probabilities:  c_j = w_j ((1-eps) q_j + eps/V)
//   loss = sum_j c_j (lse - x'_j) + z lse^2 = K (lse - m) - sum_j c_j (x'_j - m) + z lse^2,  K = sum_j c_j
//   dloss/dx'_j = p_j (K + 2 z lse) - c_j
//   dloss/dx_j  = dloss/dx'_j * (1 - (x'_j / cap)^2)                     (d/dx cap tanh(x/cap))
// The online pass keeps the running max m and s = sum exp(x' - m) per block:
//   m' = max(m, max(x_blk)); s' = s exp(m - m') + sum exp(x_blk - m')
// and sum c (x' - m), shifted the same way, so the smoothing term never subtracts two large numbers.
#ifndef FUSEDCE_ISA
#error "define FUSEDCE_ISA before including kernel_impl.h"
#endif

#define FUSEDCE_CAT_(a, b) a##b
#define FUSEDCE_CAT(a, b) FUSEDCE_CAT_(a, b)

namespace fusedce {
namespace FUSEDCE_CAT(isa_, FUSEDCE_ISA) {

constexpr int64_t kBlock = 2048;  // elements per block: a few KiB, stays in L1

// 64-byte vectors; the compiler lowers them to zmm, 2 x ymm or 4 x xmm registers per target.
typedef float vf32 __attribute__((vector_size(64)));
typedef int32_t vi32 __attribute__((vector_size(64)));
typedef double vf64 __attribute__((vector_size(64)));

struct BF16 {
  uint16_t bits;
};

inline float bf16_to_float(uint16_t b) { return __builtin_bit_cast(float, uint32_t(b) << 16); }
inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t((u >> 16) | 0x40u) : uint16_t(rounded);
}

// exp(x) for x <= 0, the only range the kernels need (x - max, x - lse). Cody-Waite range reduction and
// the Cephes polynomial (about 1 ulp); exactly 0 below the float range; NaN propagates.
inline vf32 exp_nonpositive(vf32 x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  vf32 t = x * 1.44269504088896341f + magic;
  vf32 n = t - magic;
  vf32 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf32 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3333452e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi32 n_int = (vi32)t - (vi32)(vf32{} + magic);
  vf32 scale = (vf32)((n_int + 127) << 23);
  vf32 zero = {};
  return x < -87.33f ? zero : p * scale;
}

// Per-accumulation-type vector helpers: float uses the polynomial exp, double (fp64 logits, a
// reference-precision path) uses libm per lane.
template <typename Acc>
struct Vec;
template <>
struct Vec<float> {
  using V = vf32;
  static constexpr int kLanes = 16;
  static V exp(V x) { return exp_nonpositive(x); }
};
template <>
struct Vec<double> {
  using V = vf64;
  static constexpr int kLanes = 8;
  static V exp(V x) {
    for (int i = 0; i < kLanes; ++i) x[i] = std::exp(x[i]);
    return x;
  }
};

template <typename Acc>
inline typename Vec<Acc>::V load_vec(const Acc* p) {
  typename Vec<Acc>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename Acc>
inline void store_vec(Acc* p, typename Vec<Acc>::V v) {
  std::memcpy(p, &v, sizeof(v));
}

inline int64_t padded(int64_t n, int lanes) { return (n + lanes - 1) / lanes * lanes; }

// ---- loading and storing blocks in any dtype -------------------------------------------------

template <typename T, typename Acc>
inline void convert_in(const T* src, int64_t n, Acc* dst) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, BF16>)
      dst[i] = Acc(bf16_to_float(src[i].bits));
    else
      dst[i] = Acc(src[i]);
  }
}

template <typename Acc>
inline void load_block(const void* base, int dtype, int64_t n, Acc* dst) {
  switch (dtype) {
    case kFloat32: return convert_in(static_cast<const float*>(base), n, dst);
    case kFloat16: return convert_in(static_cast<const _Float16*>(base), n, dst);
    case kBFloat16: return convert_in(static_cast<const BF16*>(base), n, dst);
    default: return convert_in(static_cast<const double*>(base), n, dst);
  }
}

template <typename T, typename Acc>
inline void convert_out(const Acc* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, BF16>)
      dst[i].bits = float_to_bf16(float(src[i]));
    else
      dst[i] = T(src[i]);
  }
}

template <typename Acc>
inline void store_block(void* base, int dtype, int64_t n, const Acc* src) {
  switch (dtype) {
    case kFloat32: return convert_out(src, n, static_cast<float*>(base));
    case kFloat16: return convert_out(src, n, static_cast<_Float16*>(base));
    case kBFloat16: return convert_out(src, n, static_cast<BF16*>(base));
    default: return convert_out(src, n, static_cast<double*>(base));
  }
}

inline int64_t element_size(int dtype) {
  return dtype == kFloat32 ? 4 : dtype == kFloat64 ? 8 : 2;
}
inline const void* offset(const void* p, int dtype, int64_t elements) {
  return static_cast<const char*>(p) + elements * element_size(dtype);
}
inline void* offset(void* p, int dtype, int64_t elements) {
  return static_cast<char*>(p) + elements * element_size(dtype);
}

// ---- one block of one row ----------------------------------------------------------------------

template <typename Acc>
struct RowContext {
  const CrossEntropyArgs& a;
  int64_t row;
  int64_t t;        // class index, or -1 for probability targets
  bool has_c;       // whether the per-class coefficients c_j are needed (smoothing or probabilities)
  Acc smooth;       // eps / V
  Acc* x;           // block of softcapped logits, padded with -inf
  Acc* c;           // block of c_j without the (1-eps) w_t [j == t] term, padded with 0
};

// Loads logits [begin, begin + n) of the row into ctx.x (softcapped) and, when needed, the
// coefficients into ctx.c. Returns n rounded up to whole vectors.
template <typename Acc>
inline int64_t load_row_block(const RowContext<Acc>& ctx, int64_t begin, int64_t n) {
  const CrossEntropyArgs& a = ctx.a;
  const int lanes = Vec<Acc>::kLanes;
  const int64_t np = padded(n, lanes);
  load_block(offset(a.logits, a.dtype, ctx.row * a.logits_row_stride + begin), a.dtype, n, ctx.x);
  if (a.softcap > 0) {
    const Acc cap = Acc(a.softcap), inv = Acc(1) / cap;
    for (int64_t i = 0; i < n; ++i) ctx.x[i] = cap * std::tanh(ctx.x[i] * inv);
  }
  // -inf padding adds exp(-inf - m) = 0 to the sum (m is finite); the c loops stop at n instead
  for (int64_t i = n; i < np; ++i) ctx.x[i] = -std::numeric_limits<Acc>::infinity();
  if (ctx.has_c) {
    const Acc* w = a.weight ? static_cast<const Acc*>(a.weight) + begin : nullptr;
    if (ctx.t < 0) {  // probabilities: c = w ((1 - eps) q + eps / V)
      load_block(offset(a.target_prob, a.target_dtype, ctx.row * a.target_row_stride + begin),
                 a.target_dtype, n, ctx.c);
      const Acc keep = Acc(1 - a.label_smoothing);
      for (int64_t i = 0; i < n; ++i) ctx.c[i] = ctx.c[i] * keep + ctx.smooth;
      if (w)
        for (int64_t i = 0; i < n; ++i) ctx.c[i] *= w[i];
    } else {  // class index with smoothing: c = (eps / V) w
      for (int64_t i = 0; i < n; ++i) ctx.c[i] = w ? ctx.smooth * w[i] : ctx.smooth;
    }
    for (int64_t i = n; i < np; ++i) ctx.c[i] = 0;
  }
  return np;
}

template <typename Acc>
inline Acc horizontal_sum(typename Vec<Acc>::V v) {
  Acc s = 0;
  for (int i = 0; i < Vec<Acc>::kLanes; ++i) s += v[i];
  return s;
}

// ---- forward: loss and lse of one row --------------------------------------------------------

template <typename Acc>
void forward_row(const CrossEntropyArgs& a, const ForwardOut& out, int64_t row, Acc* xbuf, Acc* cbuf) {
  using V = typename Vec<Acc>::V;
  const int lanes = Vec<Acc>::kLanes;
  const int64_t t = a.target_index ? a.target_index[row] : -1;
  const bool ignored = a.target_index && t == a.ignore_index;
  const bool has_c = !a.target_index || a.label_smoothing > 0;
  RowContext<Acc> ctx{a, row, t, has_c && !ignored, Acc(a.label_smoothing / double(a.vocab)), xbuf, cbuf};

  Acc m = std::numeric_limits<Acc>::lowest();  // finite, so (-inf) - m is -inf, never NaN
  Acc s = 0, k = 0, cx = 0;                     // k = sum c, cx = sum c (x' - m)
  for (int64_t begin = 0; begin < a.vocab; begin += kBlock) {
    const int64_t np = load_row_block(ctx, begin, std::min(kBlock, a.vocab - begin));
    V vmax = load_vec(xbuf);
    for (int64_t i = lanes; i < np; i += lanes) {
      V v = load_vec(xbuf + i);
      vmax = v > vmax ? v : vmax;
    }
    Acc m_new = m;
    for (int i = 0; i < lanes; ++i) m_new = vmax[i] > m_new ? vmax[i] : m_new;
    V vs = {}, vk = {}, vcx = {};
    for (int64_t i = 0; i < np; i += lanes) vs += Vec<Acc>::exp(load_vec(xbuf + i) - m_new);
    if (ctx.has_c) {
      const int64_t n = std::min(kBlock, a.vocab - begin), n_vec = n / lanes * lanes;
      for (int64_t i = 0; i < n_vec; i += lanes) {
        V c = load_vec(cbuf + i);
        vk += c;
        vcx += c * (load_vec(xbuf + i) - m_new);
      }
      cx = k > 0 ? cx - k * (m_new - m) : cx;
      cx += horizontal_sum<Acc>(vcx);
      k += horizontal_sum<Acc>(vk);
      for (int64_t i = n_vec; i < n; ++i) {
        k += cbuf[i];
        cx += cbuf[i] * (xbuf[i] - m_new);
      }
    }
    s = s * std::exp(m - m_new) + horizontal_sum<Acc>(vs);
    m = m_new;
  }
  const Acc lse = m + std::log(s);
  Acc loss = 0;
  if (!ignored) {
    loss = k * (lse - m) - cx;
    if (t >= 0) {
      Acc xt;
      load_block(offset(a.logits, a.dtype, row * a.logits_row_stride + t), a.dtype, 1, &xt);
      if (a.softcap > 0) xt = Acc(a.softcap) * std::tanh(xt / Acc(a.softcap));
      const Acc wt = a.weight ? static_cast<const Acc*>(a.weight)[t] : Acc(1);
      loss += Acc(1 - a.label_smoothing) * wt * (lse - xt);
    }
    loss += Acc(a.z_loss) * lse * lse;
  }
  static_cast<Acc*>(out.loss)[row] = loss;
  static_cast<Acc*>(out.lse)[row] = lse;
}

// ---- backward: dlogits of one row ---------------------------------------------------------------

template <typename Acc>
void backward_row(const CrossEntropyArgs& a, const BackwardIO& io, int64_t row, Acc* xbuf, Acc* cbuf) {
  using V = typename Vec<Acc>::V;
  const int lanes = Vec<Acc>::kLanes;
  const int64_t t = a.target_index ? a.target_index[row] : -1;
  const bool has_c = !a.target_index || a.label_smoothing > 0;
  RowContext<Acc> ctx{a, row, t, has_c, Acc(a.label_smoothing / double(a.vocab)), xbuf, cbuf};
  void* drow = static_cast<char*>(io.dlogits) + row * io.dlogits_row_stride * element_size(a.dtype);

  if (a.target_index && t == a.ignore_index) {
    std::fill(xbuf, xbuf + kBlock, Acc(0));
    for (int64_t begin = 0; begin < a.vocab; begin += kBlock)
      store_block(offset(drow, a.dtype, begin), a.dtype, std::min(kBlock, a.vocab - begin), xbuf);
    return;
  }
  const Acc g = static_cast<const Acc*>(io.grad_loss)[row * io.grad_stride];
  const Acc lse = static_cast<const Acc*>(io.lse)[row];
  const Acc keep = Acc(1 - a.label_smoothing);
  Acc wt = 0, k;  // k = sum c
  if (t >= 0) {
    wt = a.weight ? static_cast<const Acc*>(a.weight)[t] : Acc(1);
    k = keep * wt + ctx.smooth * Acc(a.weight_sum);
  } else {  // probabilities: one extra pass over the targets for k
    k = 0;
    for (int64_t begin = 0; begin < a.vocab; begin += kBlock) {
      const int64_t np = load_row_block(ctx, begin, std::min(kBlock, a.vocab - begin));
      V vk = {};
      for (int64_t i = 0; i < np; i += lanes) vk += load_vec(cbuf + i);
      k += horizontal_sum<Acc>(vk);
    }
  }
  const Acc coef = k + Acc(2 * a.z_loss) * lse;
  const Acc cap = Acc(a.softcap);
  for (int64_t begin = 0; begin < a.vocab; begin += kBlock) {
    const int64_t n = std::min(kBlock, a.vocab - begin);
    const int64_t np = load_row_block(ctx, begin, n);
    for (int64_t i = 0; i < np; i += lanes) {
      V x = load_vec(xbuf + i);
      V d = Vec<Acc>::exp(x - lse) * coef;
      if (has_c) d -= load_vec(cbuf + i);
      store_vec(cbuf + i, d);  // cbuf now holds dloss/dx'
    }
    if (t >= begin && t < begin + n) cbuf[t - begin] -= keep * wt;
    if (cap > 0) {
      const Acc inv = Acc(1) / cap;
      for (int64_t i = 0; i < np; i += lanes) {
        V y = load_vec(xbuf + i) * inv;
        store_vec(cbuf + i, load_vec(cbuf + i) * (Acc(1) - y * y));
      }
    }
    for (int64_t i = 0; i < np; i += lanes) store_vec(cbuf + i, load_vec(cbuf + i) * g);
    store_block(offset(drow, a.dtype, begin), a.dtype, n, cbuf);
  }
}

// Entry points called by dispatch.cpp, one thread's share of the rows at a time.
inline void forward_rows(const CrossEntropyArgs& a, const ForwardOut& out, int64_t begin, int64_t end) {
  if (a.dtype == kFloat64) {
    alignas(64) double x[kBlock], c[kBlock];
    for (int64_t r = begin; r < end; ++r) forward_row<double>(a, out, r, x, c);
  } else {
    alignas(64) float x[kBlock], c[kBlock];
    for (int64_t r = begin; r < end; ++r) forward_row<float>(a, out, r, x, c);
  }
}

inline void backward_rows(const CrossEntropyArgs& a, const BackwardIO& io, int64_t begin, int64_t end) {
  if (a.dtype == kFloat64) {
    alignas(64) double x[kBlock], c[kBlock];
    for (int64_t r = begin; r < end; ++r) backward_row<double>(a, io, r, x, c);
  } else {
    alignas(64) float x[kBlock], c[kBlock];
    for (int64_t r = begin; r < end; ++r) backward_row<float>(a, io, r, x, c);
  }
}

}  // namespace isa_<FUSEDCE_ISA>

#define FUSEDCE_STR_(a) #a
#define FUSEDCE_STR(a) FUSEDCE_STR_(a)
extern const KernelTable FUSEDCE_CAT(kTable_, FUSEDCE_ISA) = {
    FUSEDCE_STR(FUSEDCE_ISA), FUSEDCE_CAT(isa_, FUSEDCE_ISA)::forward_rows,
    FUSEDCE_CAT(isa_, FUSEDCE_ISA)::backward_rows};

}  // namespace fusedce
