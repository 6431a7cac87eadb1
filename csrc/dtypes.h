// The dtype codes of the native modules' arguments, in one place: both pybind11 modules export them as
// DTYPES (name -> code), and the Python backends read them from there.
#pragma once

namespace fusedce {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Names as torch spells them (torch.float32, ...), in code order.
constexpr const char* kDTypeNames[] = {"float32", "float16", "bfloat16", "float64"};
constexpr int kDTypeCount = 4;

inline int element_size(int dtype) { return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2; }

}  // namespace fusedce
