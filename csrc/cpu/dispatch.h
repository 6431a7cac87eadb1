// Entry points of the CPU kernels, called by the pybind11 module.
#pragma once
#include <cstddef>

#include "kernel_table.h"

namespace fusedce {

const char* cpu_isa();
// grad: when not null, also writes dlogits (grad->lse must be out.lse)
void cross_entropy_forward(CrossEntropyArgs a, ForwardOut out, const BackwardIO* grad, int num_threads);
void cross_entropy_backward(CrossEntropyArgs a, BackwardIO io, int num_threads);
void advise_huge_pages(uintptr_t ptr, size_t nbytes);

}  // namespace fusedce
