// hearthlm's thread pool (threadpool.h says why). The protocol:
//
// - One 64-bit word holds the job: generation (32 bits) | chunk count n (16) | next chunk to claim (16). The
//   caller publishes a job by storing a new generation with next = 0; anyone claims a chunk by compare-exchange
//   of next -> next + 1 under the generation it saw. A claim for an old generation, or past n, fails, so a worker
//   that shows up late finds the job gone and does nothing.
// - The job's function and context are written before its word and read only after a successful claim. The caller
//   keeps them (and writes the next job's) only once `done` reaches n, which needs every claimed chunk finished, so
//   whoever holds a claim reads this job's function, never the next one's.
// - The caller claims chunks itself like a worker, then waits for `done` == n: only for chunks that were claimed.
// - Idle workers spin on the word for kSpin (a decode step's kernels follow each other within microseconds), then
//   sleep on a futex; the caller makes the wake-up syscall only when some worker sleeps. A caller whose wait for
//   claimed chunks outlasts the spin sleeps too, and the last chunk wakes it.
// - Threads are created on first need and never joined: they sleep in the kernel at process exit, which ends
//   them. A forked child (which has none of them) drops the pool and builds a new one on its first job.
#include "threadpool.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>

namespace hearth {
namespace {

constexpr int kMaxWorkers = 255;
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex words are plain 32-bit integers");

// How long idle threads spin before they sleep: HEARTHLM_POOL_SPIN_US, default 50 us (docs/cpu-kernels.md).
std::chrono::nanoseconds spin_time() {
  static const std::chrono::nanoseconds t{[] {
    const char* s = std::getenv("HEARTHLM_POOL_SPIN_US");
    return s ? std::max(0L, std::atol(s)) * 1000 : 50'000L;
  }()};
  return t;
}

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>* word, int count) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
}

inline uint32_t generation(uint64_t word) { return static_cast<uint32_t>(word >> 32); }

struct Pool {
  alignas(64) std::atomic<uint64_t> word{0};  // generation | n | next
  std::atomic<void (*)(void*, int64_t)> fn{nullptr};
  std::atomic<void*> ctx{nullptr};
  std::atomic<int> active{0};  // workers (by id) that the current job may use
  alignas(64) std::atomic<uint32_t> done{0};  // chunks of the current job finished; a futex for a sleeping caller
  std::atomic<uint32_t> caller_sleeps{0};
  alignas(64) std::atomic<uint32_t> wake{0};  // futex the idle workers sleep on
  std::atomic<int> sleepers{0};
  std::mutex busy;  // one job at a time: a second caller runs its job inline
  std::mutex error_lock;
  std::exception_ptr error;  // the first exception of the current job
  uint32_t last_generation = 0;  // the caller's, under `busy`
  int workers = 0;  // started, under `busy`
};

thread_local bool in_pool = false;  // a pool worker, or a caller running its chunks: nested jobs run inline

// Claims the next chunk of generation `gen` into `chunk` (and the job's chunk count into `n`); false once that
// job is exhausted or replaced.
bool claim(Pool& p, uint32_t gen, int64_t& chunk, uint32_t& n) {
  uint64_t w = p.word.load(std::memory_order_acquire);
  while (generation(w) == gen && (w & 0xffff) < ((w >> 16) & 0xffff)) {
    if (p.word.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      chunk = static_cast<int64_t>(w & 0xffff);
      n = static_cast<uint32_t>((w >> 16) & 0xffff);
      return true;
    }
  }
  return false;
}

// Runs one claimed chunk, keeps its exception, counts it done and wakes a sleeping caller after the last one.
void run_claimed(Pool& p, int64_t chunk, uint32_t n) {
  try {
    p.fn.load(std::memory_order_relaxed)(p.ctx.load(std::memory_order_relaxed), chunk);
  } catch (...) {
    std::lock_guard<std::mutex> hold(p.error_lock);
    if (!p.error) p.error = std::current_exception();
  }
  if (p.done.fetch_add(1) + 1 == n && p.caller_sleeps.load()) futex_wake(&p.done, 1);
}

// Claims and runs chunks of generation `gen` until none are left.
void drain(Pool& p, uint32_t gen) {
  int64_t chunk;
  uint32_t n;
  while (claim(p, gen, chunk, n)) run_claimed(p, chunk, n);
}

// Spins, then sleeps, until the word's generation is no longer `seen` (or a spurious wake-up).
void wait_for_job(Pool& p, uint32_t seen) {
  const auto until = std::chrono::steady_clock::now() + spin_time();
  for (int i = 0;; ++i) {
    if (generation(p.word.load(std::memory_order_relaxed)) != seen) return;
    _mm_pause();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
  }
  // Read the ticket, then announce the sleep, then look once more: a caller that publishes after that look
  // sees the sleeper and bumps the ticket, so the futex does not sleep on a stale one (all seq_cst).
  const uint32_t ticket = p.wake.load();
  p.sleepers.fetch_add(1);
  if (generation(p.word.load()) == seen) futex_wait(&p.wake, ticket);
  p.sleepers.fetch_sub(1);
}

void worker(Pool* p, int id) {
  in_pool = true;
  uint32_t seen = generation(p->word.load());
  for (;;) {
    const uint32_t gen = generation(p->word.load(std::memory_order_acquire));
    if (gen == seen) {
      wait_for_job(*p, seen);
      continue;
    }
    seen = gen;
    if (id < p->active.load(std::memory_order_relaxed)) drain(*p, gen);
  }
}

// The pool; a new one in a forked child (the parent's threads do not exist there; the old one is left behind).
std::atomic<Pool*> the_pool{nullptr};
std::mutex create_lock;

Pool& pool() {
  Pool* p = the_pool.load(std::memory_order_acquire);
  if (p) return *p;
  std::lock_guard<std::mutex> hold(create_lock);
  static const bool fork_handler = [] {
    pthread_atfork([] { create_lock.lock(); }, [] { create_lock.unlock(); },
                   [] {
                     create_lock.unlock();
                     the_pool.store(nullptr);
                   });
    return true;
  }();
  (void)fork_handler;
  if (!the_pool.load()) the_pool.store(new Pool());
  return *the_pool.load();
}

// Waits until all n chunks of the current job are done: spins for the spin time, then sleeps.
void wait_done(Pool& p, uint32_t n) {
  const auto until = std::chrono::steady_clock::now() + spin_time();
  for (int i = 0; p.done.load(std::memory_order_acquire) != n; ++i) {
    _mm_pause();
    if ((i & 63) != 63 || std::chrono::steady_clock::now() < until) continue;
    p.caller_sleeps.store(1);
    const uint32_t d = p.done.load();
    if (d != n) futex_wait(&p.done, d);
  }
}

// Publishes job (n, fn, ctx) for `workers` workers, wakes sleepers if any, runs chunks, waits for the rest.
void run_job(Pool& p, int64_t n, void (*fn)(void*, int64_t), void* ctx, int workers) {
  while (p.workers < workers) std::thread(worker, &p, p.workers++).detach();
  p.fn.store(fn, std::memory_order_relaxed);
  p.ctx.store(ctx, std::memory_order_relaxed);
  p.active.store(workers, std::memory_order_relaxed);
  p.done.store(0, std::memory_order_relaxed);
  p.caller_sleeps.store(0, std::memory_order_relaxed);
  p.error = nullptr;
  const uint32_t gen = ++p.last_generation;
  p.word.store(static_cast<uint64_t>(gen) << 32 | static_cast<uint64_t>(n) << 16);  // seq_cst: see wait_for_job
  if (p.sleepers.load() > 0) {
    p.wake.fetch_add(1);
    futex_wake(&p.wake, INT_MAX);
  }
  in_pool = true;
  drain(p, gen);
  in_pool = false;
  wait_done(p, static_cast<uint32_t>(n));
  if (p.error) std::rethrow_exception(p.error);
}

}  // namespace

int threads() { return std::max(1, at::get_num_threads()); }

void run_chunks(int64_t n, void (*fn)(void*, int64_t), void* ctx) {
  TORCH_CHECK(n >= 0 && n < 65536, "run_chunks: ", n, " chunks (at most 65535)");
  const int workers = static_cast<int>(std::min<int64_t>({int64_t{threads()} - 1, n - 1, int64_t{kMaxWorkers}}));
  if (workers <= 0 || in_pool) {
    for (int64_t c = 0; c < n; ++c) fn(ctx, c);
    return;
  }
  Pool& p = pool();
  std::unique_lock<std::mutex> hold(p.busy, std::try_to_lock);
  if (!hold.owns_lock()) {  // another thread's job has the pool: do this one here
    for (int64_t c = 0; c < n; ++c) fn(ctx, c);
    return;
  }
  run_job(p, n, fn, ctx, workers);
}

}  // namespace hearth
