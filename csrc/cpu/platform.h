// What the CPU kernels take from the platform, decided in one place. x86-64 gets kernels for several
// instruction sets picked at run time, and non-temporal stores; any other target gets one kernel of
// generic 16-byte vectors (NEON on aarch64) and plain stores. FUSEDCE_PORTABLE (setup.py:
// FUSEDCE_CPU_PORTABLE=1) switches the x86-specific code off on x86-64 too, so CI tests that path.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(FUSEDCE_PORTABLE)
#define FUSEDCE_X86 1
#include <emmintrin.h>
#else
#define FUSEDCE_X86 0
#endif

namespace fusedce {

// Half precision in a type the compiler converts to and from float: ARM's __fp16 on ARM (GCC 12 for
// aarch64 has no _Float16 in C++), else _Float16 (GCC 12+ on x86-64, clang 15+). A compiler with
// neither cannot build the CPU module; setup.py then leaves it out and fusedce uses its pure-PyTorch
// backend.
#if defined(__ARM_FP16_FORMAT_IEEE)
using Half = __fp16;
#elif defined(__FLT16_MAX__)
using Half = _Float16;
#else
#error "no half-precision type: the CPU kernels need _Float16 (GCC 12+, clang 15+) or __fp16 (ARM)"
#endif

inline float bf16_to_float(uint16_t b) { return __builtin_bit_cast(float, uint32_t(b) << 16); }
inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t((u >> 16) | 0x40u) : uint16_t(rounded);
}

// Copies nbytes; on x86-64 with non-temporal 16-byte stores (SSE2, so every x86-64 has them): a
// gradient far larger than the caches is not read back soon, and streaming stores skip the
// read-for-ownership of each destination line, which otherwise costs as much memory traffic as the
// write itself.
inline void stream_bytes(void* dst, const void* src, int64_t nbytes) {
#if FUSEDCE_X86
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(int64_t(-reinterpret_cast<uintptr_t>(d) & 15), nbytes);
  std::memcpy(d, s, size_t(head));
  d += head, s += head, nbytes -= head;
  const int64_t body = nbytes & ~int64_t(15);
  for (int64_t i = 0; i < body; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  std::memcpy(d + body, s + body, size_t(nbytes - body));
#else
  std::memcpy(dst, src, size_t(nbytes));
#endif
}

// One iteration of a spin-wait: tells the core (and a sibling hyperthread) that this thread waits.
inline void cpu_relax() {
#if FUSEDCE_X86
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Orders this thread's streaming stores before the stores that tell another thread its rows are done.
inline void streaming_store_fence() {
#if FUSEDCE_X86
  _mm_sfence();
#endif
}

}  // namespace fusedce
