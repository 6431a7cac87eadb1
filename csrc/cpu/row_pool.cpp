#include "row_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <chrono>
#include <mutex>
#include <thread>

#include "platform.h"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define FUSEDCE_HAS_FORK 1
#endif

namespace fusedce {
namespace {

// After a call a worker, and a caller waiting for the last chunks, poll for this long before they
// block: calls come back to back in a training loop, and a futex wake-up costs about as much as
// a 256x1000 row block (measured: the second thread gave 1.2x at 256x1000 when it slept between calls).
constexpr std::chrono::microseconds kSpin{50};

template <class Ready>
bool spin_until(Ready ready) {
  const auto stop = std::chrono::steady_clock::now() + kSpin;
  do {
    for (int i = 0; i < 64; ++i) {
      if (ready()) return true;
      cpu_relax();
    }
  } while (std::chrono::steady_clock::now() < stop);
  return false;
}

// One call's rows. Shared with the workers that were woken for it: one that wakes after the call
// returned still holds it, finds no chunk left, and never touches fn (which lives on the caller's stack).
struct Job {
  const RowRange* fn;
  int64_t rows, chunk_rows, chunks;
  std::atomic<int64_t> next{0};  // the next chunk to claim
  std::atomic<int64_t> done{0};
  std::atomic<int> helpers;      // workers that may still join
  std::mutex mu;
  std::condition_variable finished;
  std::exception_ptr error;

  Job(const RowRange& f, int64_t r, int64_t c, int h)
      : fn(&f), rows(r), chunk_rows(c), chunks((r + c - 1) / c), helpers(h) {}

  void work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      try {
        (*fn)(c * chunk_rows, std::min(rows, (c + 1) * chunk_rows));
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
      }
      streaming_store_fence();
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);  // the caller checks `done` under it: no lost wake-up
        finished.notify_one();
      }
    }
  }

  void wait() {
    if (spin_until([&] { return done.load(std::memory_order_acquire) == chunks; })) return;
    std::unique_lock<std::mutex> lock(mu);
    finished.wait(lock, [&] { return done.load(std::memory_order_acquire) == chunks; });
  }
};

// Workers sleep on a condition variable between calls, after polling for kSpin (longer spinning would
// take the core from torch's own threads and from other processes). They are never joined: the pool lives as long as
// the process.
class Pool {
 public:
  void run(const std::shared_ptr<Job>& job, int workers) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (; started_ < workers; ++started_) std::thread([this] { serve(); }).detach();
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
  }

 private:
  void serve() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (job->helpers.fetch_sub(1, std::memory_order_relaxed) > 0) job->work();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;  // the latest call's; a worker busy with an older one takes the latest next
  std::atomic<uint64_t> generation_{0};  // written under mu_, polled without it
  int started_ = 0;
};

Pool* g_pool = nullptr;
std::once_flag g_pool_once;

// A forked child has none of the parent's workers (and maybe a mutex a parent thread held): it gets
// a pool of its own, and the parent's is left alone.
Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool;
#ifdef FUSEDCE_HAS_FORK
    pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool; });
#endif
  });
  return *g_pool;
}

}  // namespace

void parallel_rows(int64_t rows, int64_t chunk_rows, int threads, const RowRange& fn) {
  if (rows <= 0) return;
  chunk_rows = std::max<int64_t>(1, chunk_rows);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  const int workers = int(std::min<int64_t>(threads, chunks)) - 1;
  if (workers <= 0) {
    fn(0, rows);
    streaming_store_fence();
    return;
  }
  auto job = std::make_shared<Job>(fn, rows, chunk_rows, workers);
  pool().run(job, workers);
  job->work();
  job->wait();
  if (job->error) std::rethrow_exception(job->error);
}

}  // namespace fusedce
