// Entry points of the CPU kernels, called by the pybind11 module.
#pragma once
#include <cstddef>

#include "kernel_table.h"

namespace fusedce {

const char* cpu_isa();
// grad: when not null, also writes dlogits (its lse is out.lse, or scratch when out.lse is null; its
// grad_loss may be null in a reduced forward: the gradient of the reduced loss)
void cross_entropy_forward(CrossEntropyArgs a, ForwardOut out, const BackwardIO* grad, int num_threads);
// io.target_mass: a shard's backward (see kernel_impl.h), whose targets are not checked
void cross_entropy_backward(CrossEntropyArgs a, BackwardIO io, int num_threads);
// A shard's softmax states, rows x 4 (m, s - 1, cx, k) in the accumulation type; class-index targets are not read.
void cross_entropy_shard_states(const CrossEntropyArgs& a, void* states, int num_threads);
// torch's "mean" divisor: the summed weight of the non-ignored targets (their count without a weight;
// the number of rows for probabilities)
double mean_denominator(const CrossEntropyArgs& a);

}  // namespace fusedce
