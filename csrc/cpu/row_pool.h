// Threads for the rows of one kernel call. The caller works too, and every thread claims chunks of
// rows through one atomic counter until none is left; the caller returns when the chunks are done.
// A thread the OS has not scheduled yet is not waited for (it finds nothing left when it wakes),
// and one that is descheduled holds back only the chunk it is on: the others take the rest. An
// OpenMP region waits at its closing barrier for every thread of its team, so a busy core used to
// stall the whole call (issue 14: 7.5x slower with one core busy, where torch slowed 2x).
#pragma once
#include <cstdint>
#include <functional>

namespace fusedce {

using RowRange = std::function<void(int64_t begin, int64_t end)>;

// Runs fn over [0, rows) in chunks of chunk_rows, on the caller and up to threads - 1 pool workers.
// The first exception thrown by fn is rethrown here, after every claimed chunk has finished.
void parallel_rows(int64_t rows, int64_t chunk_rows, int threads, const RowRange& fn);

}  // namespace fusedce
