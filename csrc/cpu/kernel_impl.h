// Row kernels of the CPU cross-entropy, compiled once per instruction set: each kernel_<isa>.cpp sets
// `#pragma GCC target(...)`, defines FUSEDCE_ISA and includes this file, so the same source becomes
// AVX-512, AVX2 and baseline x86-64 code and dispatch.cpp picks one at run time. The wheel then runs
// on any x86-64 CPU without -march=native.
//
// Math (per row, x' = softcap(x), p = softmax(x'), lse = log sum exp x'):
//   every option reduces to per-class target coefficients c_j:
//     class index t:  c_j = (1-eps) w_t [j == t] + (eps/V) w_j        (torch's label smoothing with weight)
//     probabilities:  c_j = w_j ((1-eps) q_j + eps/V)
//   loss = sum_j c_j (lse - x'_j) + z lse^2 = K log s - sum_j c_j (x'_j - m) + z lse^2,  K = sum_j c_j,
//   with lse = m + log s, so no term subtracts two large numbers
//   dloss/dx'_j = p_j (K + 2 z lse) - c_j
//   dloss/dx_j  = dloss/dx'_j * (1 - (x'_j / cap)^2)                     (d/dx cap tanh(x/cap))
// A vocabulary-parallel shard (CrossEntropyArgs::class_start, classes) holds some of the columns j: V in
// eps/V is the global class count, its forward stops at the state (m, s - 1, cx, k) of its columns (the
// caller merges the shards' states), and its backward takes the global lse and K.
// The online pass keeps the running max m and s = sum exp(x' - m) per block:
//   m' = max(m, max(x_blk)); s' = s exp(m - m') + sum exp(x_blk - m')
// and sum c (x' - m), shifted the same way, so the smoothing term never subtracts two large numbers.
#if !defined(FUSEDCE_ISA) || !defined(FUSEDCE_VEC_BYTES)
#error "define FUSEDCE_ISA and FUSEDCE_VEC_BYTES before including kernel_impl.h"
#endif

#define FUSEDCE_CAT_(a, b) a##b
#define FUSEDCE_CAT(a, b) FUSEDCE_CAT_(a, b)

namespace fusedce {
namespace FUSEDCE_CAT(isa_, FUSEDCE_ISA) {

constexpr int64_t kBlock = 2048;  // elements per block: a few KiB, stays in L1

// Vectors as wide as the target's registers (FUSEDCE_VEC_BYTES, set by kernel_<isa>.cpp): GCC splits
// wider generic vectors into scalar code, not into several registers.
typedef float vf32 __attribute__((vector_size(FUSEDCE_VEC_BYTES)));
typedef int32_t vi32 __attribute__((vector_size(FUSEDCE_VEC_BYTES)));
typedef double vf64 __attribute__((vector_size(FUSEDCE_VEC_BYTES)));

struct BF16 {
  uint16_t bits;
};

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
  static constexpr int kLanes = FUSEDCE_VEC_BYTES / 4;
  static V exp(V x) { return exp_nonpositive(x); }
};
template <>
struct Vec<double> {
  using V = vf64;
  static constexpr int kLanes = FUSEDCE_VEC_BYTES / 8;
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
    case kFloat16: return convert_in(static_cast<const Half*>(base), n, dst);
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

template <typename T, typename Acc>
inline void store_as(const Acc* src, int64_t n, void* dst, bool streaming) {
  if (!streaming) return convert_out(src, n, static_cast<T*>(dst));
  alignas(64) T tmp[kBlock];
  convert_out(src, n, tmp);
  stream_bytes(dst, tmp, n * int64_t(sizeof(T)));
}

template <typename Acc>
inline void store_block(void* base, int dtype, int64_t n, const Acc* src, bool streaming) {
  switch (dtype) {
    case kFloat32: return store_as<float>(src, n, base, streaming);
    case kFloat16: return store_as<Half>(src, n, base, streaming);
    case kBFloat16: return store_as<BF16>(src, n, base, streaming);
    default: return store_as<double>(src, n, base, streaming);
  }
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
  int64_t t;   // the target's column: -1 for probability targets, or a target not among these columns
  bool has_c;  // whether the per-class coefficients c_j are needed (smoothing or probabilities)
  Acc smooth;  // eps / V
};

// The fused mode keeps a row's softcapped logits x' and e = exp(x' - m_b) (m_b: the running max when
// block b was read) so that the gradient pass needs no second exp: p = e * exp(m_b - lse).
template <typename Acc>
struct RowCache {
  std::vector<Acc> x, e, m;
  explicit RowCache(int64_t vocab)
      : x(vocab + Vec<Acc>::kLanes), e(vocab + Vec<Acc>::kLanes), m((vocab + kBlock - 1) / kBlock) {}
};

// Logits [begin, begin + n) of the row, softcapped and padded with -inf to whole vectors (exp(-inf - m)
// = 0 for the finite running max m; loops over c stop at n). Points into the logits themselves when
// they are already in the accumulation type and need no padding or cap; otherwise into dst.
template <typename Acc>
inline const Acc* load_logits_block(const RowContext<Acc>& ctx, int64_t begin, int64_t n, Acc* dst) {
  const CrossEntropyArgs& a = ctx.a;
  const int64_t np = padded(n, Vec<Acc>::kLanes);
  const void* src = offset(a.logits, a.dtype, ctx.row * a.logits_row_stride + begin);
  if (a.dtype == (std::is_same_v<Acc, double> ? kFloat64 : kFloat32) && a.softcap == 0 && np == n)
    return static_cast<const Acc*>(src);
  load_block(src, a.dtype, n, dst);
  if (a.softcap > 0) {
    const Acc cap = Acc(a.softcap), inv = Acc(1) / cap;
    for (int64_t i = 0; i < n; ++i) dst[i] = cap * std::tanh(dst[i] * inv);
  }
  for (int64_t i = n; i < np; ++i) dst[i] = -std::numeric_limits<Acc>::infinity();
  return dst;
}

// Loads c_j for [begin, begin + n) into dst (zero padded), without the (1-eps) w_t [j == t] term.
template <typename Acc>
inline void load_coef_block(const RowContext<Acc>& ctx, int64_t begin, int64_t n, Acc* dst) {
  const CrossEntropyArgs& a = ctx.a;
  const Acc* w = a.weight ? static_cast<const Acc*>(a.weight) + begin : nullptr;
  if (!a.target_index) {  // probabilities: c = w ((1 - eps) q + eps / V)
    load_block(offset(a.target_prob, a.target_dtype, ctx.row * a.target_row_stride + begin), a.target_dtype, n,
               dst);
    const Acc keep = Acc(1 - a.label_smoothing);
    for (int64_t i = 0; i < n; ++i) dst[i] = dst[i] * keep + ctx.smooth;
    if (w)
      for (int64_t i = 0; i < n; ++i) dst[i] *= w[i];
  } else {  // class index with smoothing: c = (eps / V) w
    for (int64_t i = 0; i < n; ++i) dst[i] = w ? ctx.smooth * w[i] : ctx.smooth;
  }
  std::fill(dst + n, dst + padded(n, Vec<Acc>::kLanes), Acc(0));
}

template <typename Acc>
inline Acc horizontal_sum(typename Vec<Acc>::V v) {
  Acc s = 0;
  for (int i = 0; i < Vec<Acc>::kLanes; ++i) s += v[i];
  return s;
}

template <typename Acc>
inline Acc capped_logit(const CrossEntropyArgs& a, int64_t row, int64_t j) {
  Acc x;
  load_block(offset(a.logits, a.dtype, row * a.logits_row_stride + j), a.dtype, 1, &x);
  return a.softcap > 0 ? Acc(a.softcap) * std::tanh(x / Acc(a.softcap)) : x;
}

// ---- forward: loss and lse of one row --------------------------------------------------------

// A row's max m and log s, s = sum exp(x' - m): the fused gradient pass uses them as they are, since
// the rounded lse = m + log s would cost the small quantities (x'_t - lse ~ 0 for a confident
// prediction) their precision.
template <typename Acc>
struct RowStats {
  Acc m, log_s;
};

// log(n + r) for a count n of terms equal to 1 and the sum r of the others: exact when r << 1.
template <typename Acc>
inline Acc log_top_plus_rest(Acc n, Acc r) {
  return n > 0 ? std::log(n) + std::log1p(r / n) : std::log(r);
}

// after_block() runs after each block (the fused mode advances the previous row's gradient there).
// With out.states, the row's state (m, s - 1 = (top - 1) + rest, cx, k) instead of its loss and lse: c_j does
// not depend on a class-index target, which is then not read.
template <typename Acc, typename AfterBlock>
RowStats<Acc> forward_row(const CrossEntropyArgs& a, const ForwardOut& out, int64_t row, Acc* xbuf, Acc* cbuf,
                          RowCache<Acc>* cache, const AfterBlock& after_block) {
  using V = typename Vec<Acc>::V;
  const int lanes = Vec<Acc>::kLanes;
  const bool read_target = a.target_index && !out.states;
  const int64_t t = read_target ? a.target_index[row] : -1;
  const bool ignored = read_target && t == a.ignore_index;
  const bool has_c = (!a.target_index || a.label_smoothing > 0) && !ignored;
  const RowContext<Acc> ctx{a, row, t, has_c, Acc(a.label_smoothing / double(a.classes))};

  Acc m = std::numeric_limits<Acc>::lowest();  // finite, so (-inf) - m is -inf, never NaN
  // s = top + rest: `top` counts the terms exp(x' - m) = 1 (x' = m), `rest` sums the others, so the
  // tiny terms of a confident prediction are not rounded away against the 1 of its top logit
  Acc top = 0, rest = 0, k = 0, cx = 0;  // k = sum c, cx = sum c (x' - m)
  for (int64_t begin = 0; begin < a.vocab; begin += kBlock) {
    const int64_t n = std::min(kBlock, a.vocab - begin), np = padded(n, lanes);
    const Acc* x = load_logits_block(ctx, begin, n, cache ? cache->x.data() + begin : xbuf);
    V vmax = load_vec(x);
    for (int64_t i = lanes; i < np; i += lanes) {
      V v = load_vec(x + i);
      vmax = v > vmax ? v : vmax;
    }
    Acc m_new = m;
    for (int i = 0; i < lanes; ++i) m_new = vmax[i] > m_new ? vmax[i] : m_new;
    V vrest = {}, vtop = {};
    const V zero = {}, one = zero + Acc(1);
    Acc* e = cache ? cache->e.data() + begin : nullptr;
    for (int64_t i = 0; i < np; i += lanes) {
      const V xv = load_vec(x + i), ev = Vec<Acc>::exp(xv - m_new);
      if (e) store_vec(e + i, ev);
      vrest += xv == m_new ? zero : ev;
      vtop += xv == m_new ? one : zero;
    }
    if (cache) cache->m[begin / kBlock] = m_new;
    if (has_c) {
      load_coef_block(ctx, begin, n, cbuf);
      const int64_t n_vec = n / lanes * lanes;
      V vk = {}, vcx = {};
      for (int64_t i = 0; i < n_vec; i += lanes) {
        V c = load_vec(cbuf + i);
        vk += c;
        vcx += c * (load_vec(x + i) - m_new);
      }
      cx = k != 0 ? cx - k * (m_new - m) : cx;  // k == 0 before the first coefficients: m may be the sentinel
      cx += horizontal_sum<Acc>(vcx);
      k += horizontal_sum<Acc>(vk);
      for (int64_t i = n_vec; i < n; ++i) {
        k += cbuf[i];
        cx += cbuf[i] * (x[i] - m_new);
      }
    }
    if (m_new > m) {  // the old top terms become ordinary ones
      rest = (top + rest) * std::exp(m - m_new) + horizontal_sum<Acc>(vrest);
      top = horizontal_sum<Acc>(vtop);
    } else {
      rest += horizontal_sum<Acc>(vrest);
      top += horizontal_sum<Acc>(vtop);
    }
    m = m_new;
    after_block();
  }
  // lse - x_t as (m - x_t) + log s: exact for the confident predictions where lse ~ x_t
  const Acc log_s = log_top_plus_rest(top, rest), lse = m + log_s;
  if (out.states) {
    Acc* state = static_cast<Acc*>(out.states) + 4 * row;
    state[0] = m, state[1] = (top - 1) + rest, state[2] = cx, state[3] = k;  // s - 1: see backends/__init__.py
    return {m, log_s};
  }
  Acc loss = 0;
  if (!ignored) {
    loss = k * log_s - cx;
    if (t >= 0) {
      const Acc wt = a.weight ? static_cast<const Acc*>(a.weight)[t] : Acc(1);
      loss += Acc(1 - a.label_smoothing) * wt * ((m - capped_logit<Acc>(a, row, t)) + log_s);
    }
    loss += Acc(a.z_loss) * lse * lse;
  }
  static_cast<Acc*>(out.loss)[row] = loss;
  static_cast<Acc*>(out.lse)[row] = lse;
  return {m, log_s};
}

// ---- backward: dlogits of one row, a block at a time -------------------------------------------

// The gradient pass of one row, prepared once and then run a block at a time, so that the fused mode
// can interleave it with the next row's forward pass (reads and writes of memory then overlap).
// cache and stats come from the fused forward of the same row; without them p = exp(x' - lse). A shard's
// row (io.target_mass: the global K) has the target element only where the target is one of its columns.
template <typename Acc>
struct GradRow {
  const CrossEntropyArgs* a;
  const BackwardIO* io;
  RowContext<Acc> ctx;
  const RowCache<Acc>* cache;
  RowStats<Acc> stats;
  bool has_stats, ignored;
  Acc g, lse, keep, wt, coef;
  void* drow;
};

template <typename Acc>
GradRow<Acc> prepare_grad_row(const CrossEntropyArgs& a, const BackwardIO& io, int64_t row, Acc* cbuf,
                              const RowCache<Acc>* cache, const RowStats<Acc>* stats) {
  using V = typename Vec<Acc>::V;
  const int lanes = Vec<Acc>::kLanes;
  const int64_t target = a.target_index ? a.target_index[row] : -1;
  const bool ignored = a.target_index && target == a.ignore_index;
  const int64_t local = target - a.class_start;
  const int64_t t = a.target_index && !ignored && local >= 0 && local < a.vocab ? local : -1;
  const bool has_c = !a.target_index || a.label_smoothing > 0;
  GradRow<Acc> s{&a, &io, RowContext<Acc>{a, row, t, has_c, Acc(a.label_smoothing / double(a.classes))}, cache,
                 stats ? *stats : RowStats<Acc>{}, stats != nullptr, ignored,
                 static_cast<const Acc*>(io.grad_loss)[row * io.grad_stride], static_cast<const Acc*>(io.lse)[row],
                 Acc(1 - a.label_smoothing), Acc(0), Acc(0),
                 static_cast<char*>(io.dlogits) + row * io.dlogits_row_stride * element_size(a.dtype)};
  if (s.ignored) return s;
  if (t >= 0) s.wt = a.weight ? static_cast<const Acc*>(a.weight)[t] : Acc(1);
  Acc k = 0;  // sum c
  if (io.target_mass) {
    k = static_cast<const Acc*>(io.target_mass)[row];
  } else if (a.target_index) {  // the whole row: its target is one of the columns (dispatch.cpp checks)
    k = s.keep * s.wt + s.ctx.smooth * Acc(a.weight_sum);
  } else {  // probabilities: one extra pass over the targets for k
    for (int64_t begin = 0; begin < a.vocab; begin += kBlock) {
      const int64_t n = std::min(kBlock, a.vocab - begin);
      load_coef_block(s.ctx, begin, n, cbuf);
      V vk = {};
      for (int64_t i = 0; i < padded(n, lanes); i += lanes) vk += load_vec(cbuf + i);
      k += horizontal_sum<Acc>(vk);
    }
  }
  s.coef = k + Acc(2 * a.z_loss) * s.lse;  // dloss/dx'_j = g (p_j coef - c_j)
  return s;
}

template <typename Acc>
void grad_block(const GradRow<Acc>& s, int64_t begin, Acc* xbuf, Acc* cbuf) {
  using V = typename Vec<Acc>::V;
  const int lanes = Vec<Acc>::kLanes;
  const CrossEntropyArgs& a = *s.a;
  const int64_t n = std::min(kBlock, a.vocab - begin), np = padded(n, lanes), t = s.ctx.t;
  if (s.ignored) {
    std::fill(cbuf, cbuf + n, Acc(0));
    return store_block(offset(s.drow, a.dtype, begin), a.dtype, n, cbuf, s.io->streaming);
  }
  const Acc coef_g = s.coef * s.g;
  const Acc* x;
  if (s.cache) {
    x = s.cache->x.data() + begin;  // read only with a softcap, which always fills the cache
    const Acc* e = s.cache->e.data() + begin;
    // p = e exp(m_b - lse), with m_b - lse = (m_b - m) - log s
    const Acc scale = std::exp((s.cache->m[begin / kBlock] - s.stats.m) - s.stats.log_s) * coef_g;
    for (int64_t i = 0; i < np; i += lanes) store_vec(cbuf + i, load_vec(e + i) * scale);
  } else {
    x = load_logits_block(s.ctx, begin, n, xbuf);
    for (int64_t i = 0; i < np; i += lanes) store_vec(cbuf + i, Vec<Acc>::exp(load_vec(x + i) - s.lse) * coef_g);
  }
  if (s.ctx.has_c) {  // cbuf holds g p coef; subtract g c
    alignas(64) Acc c[kBlock];
    load_coef_block(s.ctx, begin, n, c);
    for (int64_t i = 0; i < np; i += lanes) store_vec(cbuf + i, load_vec(cbuf + i) - load_vec(c + i) * s.g);
  }
  if (t >= begin && t < begin + n) {
    // the target's (1-eps) w_t (p_t - 1) with expm1: p_t ~ 1 for a confident prediction
    const Acc x_t = capped_logit<Acc>(a, s.ctx.row, t);
    const Acc delta = s.has_stats ? (x_t - s.stats.m) - s.stats.log_s : x_t - s.lse;  // x'_t - lse
    const Acc w_t = a.weight ? static_cast<const Acc*>(a.weight)[t] : Acc(1);
    const Acc c_t = s.ctx.has_c ? s.ctx.smooth * w_t : Acc(0);
    cbuf[t - begin] = s.g * (s.keep * s.wt * std::expm1(delta) + std::exp(delta) * (s.coef - s.keep * s.wt) - c_t);
  }
  if (a.softcap > 0) {
    const Acc inv = Acc(1) / Acc(a.softcap);
    for (int64_t i = 0; i < np; i += lanes) {
      V y = load_vec(x + i) * inv;
      store_vec(cbuf + i, load_vec(cbuf + i) * (Acc(1) - y * y));
    }
  }
  store_block(offset(s.drow, a.dtype, begin), a.dtype, n, cbuf, s.io->streaming);
}

// Entry points called by dispatch.cpp, one thread's share of the rows at a time. With `grad` (the
// fused mode), the gradient of row r is written from its cache while row r + 1 is read, one block of
// each in turn: the row is read from memory once, and reading and writing overlap.
template <typename Acc>
void forward_rows_acc(const CrossEntropyArgs& a, const ForwardOut& out, const BackwardIO* grad, int64_t begin,
                      int64_t end) {
  alignas(64) Acc x[kBlock], c[kBlock], gx[kBlock], gc[kBlock];
  if (!grad) {
    for (int64_t r = begin; r < end; ++r) forward_row<Acc>(a, out, r, x, c, nullptr, [] {});
    return;
  }
  RowCache<Acc> caches[2] = {RowCache<Acc>(a.vocab), RowCache<Acc>(a.vocab)};
  std::optional<GradRow<Acc>> pending;
  int64_t pending_next = a.vocab;  // the next block of the pending row's gradient; vocab = none left
  const auto step = [&] {
    if (pending_next < a.vocab) {
      grad_block(*pending, pending_next, gx, gc);
      pending_next += kBlock;
    }
  };
  for (int64_t r = begin; r < end; ++r) {
    RowCache<Acc>& cache = caches[r & 1];
    const RowStats<Acc> stats = forward_row<Acc>(a, out, r, x, c, &cache, step);
    while (pending_next < a.vocab) step();
    pending.emplace(prepare_grad_row<Acc>(a, *grad, r, gc, &cache, &stats));
    pending_next = 0;
  }
  while (pending_next < a.vocab) step();
}

inline void forward_rows(const CrossEntropyArgs& a, const ForwardOut& out, const BackwardIO* grad, int64_t begin,
                         int64_t end) {
  if (a.dtype == kFloat64)
    forward_rows_acc<double>(a, out, grad, begin, end);
  else
    forward_rows_acc<float>(a, out, grad, begin, end);
}

template <typename Acc>
void backward_rows_acc(const CrossEntropyArgs& a, const BackwardIO& io, int64_t begin, int64_t end) {
  alignas(64) Acc x[kBlock], c[kBlock];
  for (int64_t r = begin; r < end; ++r) {
    const GradRow<Acc> s = prepare_grad_row<Acc>(a, io, r, c, nullptr, nullptr);
    for (int64_t b = 0; b < a.vocab; b += kBlock) grad_block(s, b, x, c);
  }
}

inline void backward_rows(const CrossEntropyArgs& a, const BackwardIO& io, int64_t begin, int64_t end) {
  if (a.dtype == kFloat64)
    backward_rows_acc<double>(a, io, begin, end);
  else
    backward_rows_acc<float>(a, io, begin, end);
}

}  // namespace isa_<FUSEDCE_ISA>

#define FUSEDCE_STR_(a) #a
#define FUSEDCE_STR(a) FUSEDCE_STR_(a)
extern const KernelTable FUSEDCE_CAT(kTable_, FUSEDCE_ISA) = {
    FUSEDCE_STR(FUSEDCE_ISA), FUSEDCE_CAT(isa_, FUSEDCE_ISA)::forward_rows,
    FUSEDCE_CAT(isa_, FUSEDCE_ISA)::backward_rows};

}  // namespace fusedce
