// hearthlm's own thread pool for its CPU kernels (threadpool.cpp has the protocol).
//
// OpenMP (and at::parallel_for on it) splits a loop statically and ends each region in a barrier that waits for
// every thread of the team: when another process takes a core, the descheduled thread holds the barrier for a
// scheduler quantum, and a decode step crosses ~10 of them per layer. Here the caller publishes a job of chunks
// and claims chunks itself from a shared counter, as the pool's workers do; it then waits only for chunks that
// were claimed and are still running, never for a worker that has not shown up. A slow core costs one chunk.
#pragma once

#include <algorithm>
#include <cstdint>

namespace hearth {

// Runs fn(ctx, chunk) once for each chunk in [0, n), on the calling thread and up to threads() - 1 pool workers;
// returns when all are done. The first exception a chunk throws is rethrown here, once every claimed chunk has
// finished (the other chunks still run). Inline on the caller, in order, when n <= 1, threads() is 1, the call
// is nested in a chunk, or another thread's job holds the pool. n must be below 65536.
void run_chunks(int64_t n, void (*fn)(void*, int64_t), void* ctx);

// The thread count the kernels use: PyTorch's (torch.set_num_threads, which kernels/cpu.py set_threads sets).
int threads();

// f(b0, b1) over consecutive pieces of [begin, end) of at least `grain` items each (the last may be shorter),
// like at::parallel_for, but with several pieces per thread (up to `max_pieces`, by default 4 x threads()) taken
// from the pool's counter, so a core that another process takes gives its share to the others. f must not depend
// on where the pieces split (every kernel here computes an output row, or a GEMM panel, in one piece).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f, int64_t max_pieces = 0) {
  const int64_t range = end - begin;
  if (range <= 0) return;
  const int64_t most = std::min<int64_t>(max_pieces > 0 ? max_pieces : 4 * static_cast<int64_t>(threads()), 65535);
  const int64_t pieces = std::min<int64_t>(range / std::max<int64_t>(grain, 1), most);
  if (pieces <= 1 || threads() == 1) return f(begin, end);  // one call: per-piece setup (scratch) once
  struct Job {
    const F& f;
    int64_t begin, end, step;
  } job{f, begin, end, (range + pieces - 1) / pieces};
  const int64_t n = (range + job.step - 1) / job.step;  // every piece non-empty
  run_chunks(n, [](void* p, int64_t c) {
    const Job& j = *static_cast<const Job*>(p);
    const int64_t b0 = j.begin + c * j.step;
    j.f(b0, std::min(j.end, b0 + j.step));
  }, &job);
}

}  // namespace hearth
