#include "parallel.h"

#include <algorithm>
#include <atomic>

#ifdef PYBLEND_HAS_OPENMP
#include <omp.h>
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace pyblend {

namespace {
std::atomic<bool> forked{false};
}

bool parallel_allowed() { return !forked.load(std::memory_order_relaxed); }

int num_threads() {
#ifdef PYBLEND_HAS_OPENMP
  return parallel_allowed() ? omp_get_max_threads() : 1;
#else
  return 1;
#endif
}

int64_t molecule_chunk(int64_t batch) {
  // About four chunks a thread, so that a slow molecule near the end does not leave the others idle.
  return std::clamp<int64_t>(batch / (4 * static_cast<int64_t>(num_threads())), 1, 16);
}

void watch_forks() {
#if defined(__unix__) || defined(__APPLE__)
  // Any fork counts: the child cannot tell whether the parent's threads were started (torch shares the same
  // libgomp, and its own loops start them too).
  pthread_atfork(nullptr, nullptr, [] { forked.store(true, std::memory_order_relaxed); });
#endif
}

}  // namespace pyblend
