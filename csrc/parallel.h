// When the engine's OpenMP loops may start a team of threads.
#pragma once

namespace pyblend {

// False in a process forked from one that had started OpenMP threads (a DataLoader worker, a fork Pool):
// libgomp is not fork-safe, and the child's first team waited forever at a barrier for the parent's threads,
// which the child does not have. The loops then run on the calling thread (`#pragma omp ... if(...)`).
bool parallel_allowed();

// Registers the fork handler that clears parallel_allowed() in children; called once, at import.
void watch_forks();

}  // namespace pyblend
