// Work items over XLA's intra-op thread pool, for the CPU kernels (cpu_decode.cc, cpu_matmul.cc).
//
// run_items(pool, items, body) calls body(item) once for every item in [0, items): the calling
// thread and up to pool.num_threads() - 1 pool threads take items as they come free, and it returns
// once every item is done. Helpers that start after the last item was taken find none and leave;
// they share only the counters (kept alive by their own reference), never the caller's stack.

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace psynth {

struct PoolWork {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t items = 0;
  std::mutex mu;
  std::condition_variable cv;
};

template <class Body>
void run_items(xla::ffi::ThreadPool& pool, int64_t items, const Body& body) {
  if (items <= 0) return;
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

}  // namespace psynth
