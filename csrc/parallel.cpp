#include "parallel.h"

#include <atomic>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace pyblend {

namespace {
std::atomic<bool> forked{false};
}

bool parallel_allowed() { return !forked.load(std::memory_order_relaxed); }

void watch_forks() {
#if defined(__unix__) || defined(__APPLE__)
  // Any fork counts: the child cannot tell whether the parent's threads were started (torch shares the same
  // libgomp, and its own loops start them too).
  pthread_atfork(nullptr, nullptr, [] { forked.store(true, std::memory_order_relaxed); });
#endif
}

}  // namespace pyblend
