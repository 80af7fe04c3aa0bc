// Work sharing on XLA's intra-op thread pool (ffi::ThreadPool): tasks are claimed from an atomic
// counter by the calling thread and by helpers scheduled on the pool, so no threads are spawned per
// call (a decode step makes dozens of calls, each tens of microseconds). A helper that starts after
// every task was claimed returns at once, and the call waits only for tasks already claimed, so it
// never waits on a helper still queued behind other work. The shared state outlives the call for
// such late helpers; they never touch `fn` once the tasks are gone.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace llmk {

// Calls fn(task) for task in [0, tasks) on up to `workers` threads (the caller included).
template <typename Fn>
void pool_for(xla::ffi::ThreadPool& pool, int64_t tasks, int64_t workers, Fn fn) {
  struct Work {
    explicit Work(Fn f, int64_t n) : fn(std::move(f)), tasks(n) {}
    Fn fn;
    int64_t tasks;
    std::atomic<int64_t> next{0}, done{0};
    void run() {
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
        fn(t);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  if (tasks <= 0) return;
  auto work = std::make_shared<Work>(std::move(fn), tasks);
  workers = std::min<int64_t>(std::max<int64_t>(workers, 1), tasks);
  for (int64_t i = 1; i < workers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

}  // namespace llmk
