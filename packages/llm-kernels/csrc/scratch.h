// Scratch buffers whose bytes are counted (current and peak, process-wide), so the benchmark
// can report the kernels' own memory next to what XLA allocates around them.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace llmk {

struct ScratchStats {
  static std::atomic<int64_t>& current() {
    static std::atomic<int64_t> bytes{0};
    return bytes;
  }
  static std::atomic<int64_t>& peak() {
    static std::atomic<int64_t> bytes{0};
    return bytes;
  }
  static void add(int64_t n) {
    const int64_t now = current().fetch_add(n) + n;
    int64_t old = peak().load();
    while (now > old && !peak().compare_exchange_weak(old, now)) {
    }
  }
};

template <typename T>
struct CountingAllocator {
  using value_type = T;
  CountingAllocator() = default;
  template <typename U>
  CountingAllocator(const CountingAllocator<U>&) {}
  T* allocate(size_t n) {
    ScratchStats::add(static_cast<int64_t>(n * sizeof(T)));
    return static_cast<T*>(::operator new(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) {
    ScratchStats::add(-static_cast<int64_t>(n * sizeof(T)));
    ::operator delete(p);
  }
  template <typename U>
  bool operator==(const CountingAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CountingAllocator<U>&) const { return false; }
};

using Scratch = std::vector<float, CountingAllocator<float>>;

}  // namespace llmk
