// When the engine's OpenMP loops may start a team of threads.
#pragma once

#include <cstdint>

namespace pyblend {

// False in a process forked from one that had started OpenMP threads (a DataLoader worker, a fork Pool):
// libgomp is not fork-safe, and the child's first team waited forever at a barrier for the parent's threads,
// which the child does not have. The loops then run on the calling thread (`#pragma omp ... if(...)`).
bool parallel_allowed();

// OpenMP threads the engine's loops use: 1 without OpenMP, and in a forked child.
int num_threads();

// Molecules per chunk of the engine's dynamic schedules: up to 16, amortising the scheduler over many small
// molecules, but small enough that a batch of a few large molecules still gives every thread work (a fixed
// chunk of 16 ran a batch of 16 or fewer on one thread).
int64_t molecule_chunk(int64_t batch);

// Registers the fork handler that clears parallel_allowed() in children; called once, at import.
void watch_forks();

}  // namespace pyblend
