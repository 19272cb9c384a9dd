// Work items over threads, for the CPU kernels (cpu_decode.cc, cpu_matmul.cc).
//
// run_items(pool, items, body, handoff) calls body(item) once for every item in [0, items): the
// calling thread and up to pool.num_threads() - 1 helpers take items as they come free, and it
// returns once every item is done. The helpers are, by `handoff`:
// - kPool: XLA's intra-op pool. For long calls (a prefill's matmuls), between which XLA's own
//   parallel ops (its attention) use that pool.
// - kSpin: threads of ours, which spin for a short while after each call, waiting for the next,
//   before they sleep; the caller spins for them the same way. For a decode step's calls: ~150 of
//   20-300 us each, a few microseconds apart. Through XLA's pool a helper started ~25 us after the
//   call (its threads had parked in between) and the caller, done with its share first, slept
//   until the helper woke it: measured in a SmolLM2 decode step on a 2-core VM, 27 us of start
//   latency plus 23 us of caller wait per call, a tenth of the step (docs/PERFORMANCE.md, issue
//   #27). Not for prefills: a helper of ours spinning beside XLA's pool threads during XLA's ops
//   made a 481-token prefill 24% slower on that VM.
// Our helpers serve one call at a time; a call made while they are busy (another thread's kernel)
// goes through XLA's pool, so calls never wait on each other. Either way items are only
// distributed, never reordered within one: results do not depend on who ran what.

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace psynth {

// How long a helper (or a caller waiting for helpers) spins before it sleeps.
constexpr std::chrono::microseconds kSpinFor{100};

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#else
  std::this_thread::yield();
#endif
}

// Spin while `busy()` holds, for at most kSpinFor; true if it stopped holding.
template <class Busy>
bool spin_while(const Busy& busy) {
  const auto until = std::chrono::steady_clock::now() + kSpinFor;
  for (int i = 0; busy(); ++i) {
    relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) return false;
  }
  return true;
}

// The helpers' side of one call at a time. A call is an epoch: the caller publishes its items and
// opens the epoch (odd), runs items itself, waits for every item, then closes it (even) and waits
// until no helper is still inside, so nothing touches this call's state once run() returns.
class Helpers {
 public:
  explicit Helpers(int64_t threads) {
    for (int64_t t = 0; t < threads; ++t) std::thread([this] { loop(); }).detach();
  }

  // body(item) for every item, with the helpers; false (nothing run) if another call has them.
  template <class Body>
  bool run(int64_t items, const Body& body) {
    std::unique_lock<std::mutex> mine(call_, std::try_to_lock);
    if (!mine.owns_lock()) return false;
    fn_ = [](const void* b, int64_t item) { (*static_cast<const Body*>(b))(item); };
    ctx_ = &body;
    items_ = items;
    next_.store(0);
    done_.store(0);
    const uint64_t open = epoch_.load() + 1;
    epoch_.store(open);  // seq_cst: a helper that registers as a sleeper after this sees it
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    take();
    if (!spin_while([&] { return done_.load() < items; })) {
      std::unique_lock<std::mutex> lock(mu_);
      finished_cv_.wait(lock, [&] { return done_.load() == items; });
    }
    epoch_.store(open + 1);  // closed: a helper that enters from here on leaves at once
    while (inside_.load() > 0) relax();
    return true;
  }

 private:
  // Items of the open call until none is left; the last one done wakes a sleeping caller.
  void take() {
    int64_t mine = 0;
    for (int64_t item; (item = next_.fetch_add(1)) < items_; ++mine) fn_(ctx_, item);
    if (mine > 0 && done_.fetch_add(mine) + mine == items_) {
      std::lock_guard<std::mutex> lock(mu_);
      finished_cv_.notify_all();
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto fresh = [&] {
        const uint64_t e = epoch_.load();
        return e != seen && (e & 1);
      };
      if (!spin_while([&] { return !fresh(); })) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);
        cv_.wait(lock, fresh);
        sleepers_.fetch_sub(1);
      }
      const uint64_t e = epoch_.load();
      inside_.fetch_add(1);
      if (epoch_.load() == e && (e & 1)) take();  // still open: its items are the ones published
      inside_.fetch_sub(1);
      seen = e;
    }
  }

  std::mutex call_;  // held by the call that has the helpers
  void (*fn_)(const void*, int64_t) = nullptr;
  const void* ctx_ = nullptr;
  int64_t items_ = 0;
  std::atomic<int64_t> next_{0}, done_{0}, inside_{0}, sleepers_{0};
  std::atomic<uint64_t> epoch_{0};
  std::mutex mu_;
  std::condition_variable cv_, finished_cv_;
};

// The process's helpers, started on first use with one thread fewer than XLA's pool has (never
// stopped: they sleep when idle).
inline Helpers& helpers(int64_t pool_threads) {
  static Helpers* h = new Helpers(std::max<int64_t>(pool_threads - 1, 0));
  return *h;
}

struct PoolWork {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t items = 0;
  std::mutex mu;
  std::condition_variable cv;
};

// Through XLA's pool: helpers that start after the last item was taken find none and leave; they
// share only the counters (kept alive by their own reference), never the caller's stack.
template <class Body>
void run_items_on_pool(xla::ffi::ThreadPool& pool, int64_t items, const Body& body) {
  auto work = std::make_shared<PoolWork>();
  work->items = items;
  auto run = [work, body]() {
    int64_t mine = 0;
    for (int64_t item; (item = work->next.fetch_add(1)) < work->items; ++mine) body(item);
    if (mine > 0 && work->done.fetch_add(mine) + mine == work->items) {
      std::lock_guard<std::mutex> lock(work->mu);
      work->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([run] { run(); });
  run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->items; });
}

enum class Handoff { kPool, kSpin };

template <class Body>
void run_items(xla::ffi::ThreadPool& pool, int64_t items, const Body& body, Handoff handoff) {
  if (items <= 0) return;
  if (items == 1 || pool.num_threads() <= 1) {
    for (int64_t i = 0; i < items; ++i) body(i);
    return;
  }
  if (handoff == Handoff::kPool || !helpers(pool.num_threads()).run(items, body))
    run_items_on_pool(pool, items, body);
}

}  // namespace psynth
