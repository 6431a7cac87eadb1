"""The issue budget: how many SASS instructions per element a kernel may issue and still run at the GPU's
copy bandwidth.

An SM issues `issue` warp-instructions per clock (32 threads each), MUFU (ex2, lg2, rcp, ...) at 16
threads per clock. At copy bandwidth a kernel moving b bytes per element handles copy/b elements per
second, so

    budget (instructions per element) = sms * issue * 32 * clock / (copy / b)

and the MUFU budget is the same with 16 in place of issue * 32. The counts are per element of the row, the
per-row work (reductions, finishing the loss) included, amortised over the row."""
from __future__ import annotations

from typing import NamedTuple


class Gpu(NamedTuple):
    name: str
    sms: int
    clock_hz: float
    copy_bytes_per_s: float  # bytes read plus bytes written, as measured by a device copy
    issue_per_clock: int = 4  # warp-instructions per clock per SM
    mufu_per_clock: int = 16  # MUFU results (threads) per clock per SM

    def elements_per_s(self, bytes_per_element: float) -> float:
        return self.copy_bytes_per_s / bytes_per_element

    def budget(self, bytes_per_element: float) -> float:
        """Thread-instructions per element at copy bandwidth."""
        return self.sms * self.issue_per_clock * 32 * self.clock_hz / self.elements_per_s(bytes_per_element)

    def mufu_budget(self, bytes_per_element: float) -> float:
        return self.sms * self.mufu_per_clock * self.clock_hz / self.elements_per_s(bytes_per_element)


H200 = Gpu("H200 SXM", sms=132, clock_hz=1.98e9, copy_bytes_per_s=4.3e12)
H100 = Gpu("H100 SXM", sms=132, clock_hz=1.98e9, copy_bytes_per_s=3.0e12)
GPUS = (H200, H100)
LIMIT = 0.8  # the CI test's bound: instructions per element within 0.8 of the H200 budget


def bytes_per_element(mode: str, element_size: int, target_size: int = 0) -> int:
    """The minimal traffic per element of the logits: the forward reads them (S), the backward and the fused
    mode read them and write the gradient (2S); probability targets add their own read. Class weights are
    [V], shared by every row and served by L2, so they add nothing per row."""
    return (element_size if mode == "fwd" else 2 * element_size) + target_size
