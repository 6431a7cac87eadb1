// The CPU kernels without Python, for a target CI cannot run Python on: .ci/cross_check builds this with
// the kernels for aarch64 and runs it under qemu. Forward (loss, lse), backward and the fused forward
// of a few problems against float64 computed here, on 1 and 3 threads; exits non-zero on a mismatch.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../csrc/cpu/dispatch.h"

using namespace fusedce;

namespace {

int failures = 0;

void expect_close(double got, double want, double tol, const char* what, int64_t rows, int64_t vocab, int threads) {
  if (!(std::fabs(got - want) <= tol)) {
    if (failures++ < 10)
      std::printf("%s %lldx%lld on %d threads: %.9g, expected %.9g\n", what, (long long)rows, (long long)vocab,
                  threads, got, want);
  }
}

void check(int64_t rows, int64_t vocab, double label_smoothing, int threads, bool fused) {
  std::mt19937 rng(unsigned(rows * 7919 + vocab));
  std::normal_distribution<float> normal(0.f, 3.f);
  std::vector<float> logits(rows * vocab), loss(rows, NAN), lse(rows, NAN), grad_loss(rows, 0.5f),
      dlogits(rows * vocab, NAN);
  std::vector<int64_t> target(rows);
  for (auto& x : logits) x = normal(rng);
  for (int64_t r = 0; r < rows; ++r) target[r] = r % 5 == 3 ? -100 : int64_t(rng() % vocab);

  CrossEntropyArgs a;
  a.logits = logits.data();
  a.logits_row_stride = vocab;
  a.rows = rows;
  a.vocab = vocab;
  a.classes = vocab;  // a whole row: the global classes are the columns
  a.target_index = target.data();
  a.label_smoothing = label_smoothing;
  BackwardIO io{grad_loss.data(), 1, lse.data(), dlogits.data(), vocab};
  cross_entropy_forward(a, ForwardOut{loss.data(), lse.data()}, fused ? &io : nullptr, threads);
  if (!fused) cross_entropy_backward(a, io, threads);

  for (int64_t r = 0; r < rows; ++r) {
    const float* x = &logits[r * vocab];
    double m = x[0], s = 0, mean = 0;
    for (int64_t j = 0; j < vocab; ++j) m = std::max(m, double(x[j]));
    for (int64_t j = 0; j < vocab; ++j) s += std::exp(x[j] - m), mean += x[j];
    const double ref_lse = m + std::log(s), eps = label_smoothing;
    const int64_t t = target[r];
    // torch's label smoothing: (1 - eps) (lse - x_t) + eps (lse - mean x)
    const double ref_loss = t < 0 ? 0 : (1 - eps) * (ref_lse - x[t]) + eps * (ref_lse - mean / vocab);
    expect_close(lse[r], ref_lse, 1e-4 * std::fabs(ref_lse) + 1e-5, "lse", rows, vocab, threads);
    expect_close(loss[r], ref_loss, 1e-4 * std::fabs(ref_loss) + 1e-5, "loss", rows, vocab, threads);
    for (int64_t j = 0; j < vocab; ++j) {
      const double ref = t < 0 ? 0 : 0.5 * (std::exp(x[j] - ref_lse) - (1 - eps) * (j == t) - eps / vocab);
      expect_close(dlogits[r * vocab + j], ref, 1e-6, fused ? "fused dlogits" : "dlogits", rows, vocab, threads);
    }
  }
}

}  // namespace

int main() {
  std::printf("isa %s\n", cpu_isa());
  for (int threads : {1, 3})
    for (bool fused : {false, true}) {
      check(9, 7, 0.0, threads, fused);         // shorter than one vector
      check(33, 4099, 0.1, threads, fused);     // blocks of 2048 and a tail
      check(700, 3001, 0.0, threads, fused);    // enough work for several threads and chunks
    }
  if (failures) {
    std::printf("%d mismatches\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
