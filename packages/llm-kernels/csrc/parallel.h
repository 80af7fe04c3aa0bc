// Minimal std::thread work sharing: tasks are claimed from an atomic counter, so uneven tasks
// (causal blocks) balance themselves. Threads are spawned per call; a call does enough work
// (milliseconds) that the ~50us spawn cost does not matter.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace llmk {

inline int num_threads() {
  if (const char* env = std::getenv("LLM_KERNELS_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

// Calls fn(task, worker) for task in [0, n_tasks); worker in [0, workers) indexes scratch space.
template <typename Fn>
void parallel_for(int64_t n_tasks, int workers, Fn&& fn) {
  if (n_tasks <= 0) return;
  workers = static_cast<int>(std::min<int64_t>(workers, n_tasks));
  std::atomic<int64_t> next{0};
  auto run = [&](int worker) {
    for (int64_t t = next.fetch_add(1); t < n_tasks; t = next.fetch_add(1)) fn(t, worker);
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) pool.emplace_back(run, w);
  run(0);
  for (auto& th : pool) th.join();
}

}  // namespace llmk
