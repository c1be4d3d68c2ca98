// parallel_chunks (cpu_common.h): the thread pool of the CPU kernels' parallel loops.
//
// Why not at::parallel_for: with the OpenMP backend it splits [0, n) into one fixed range per
// thread, and the region ends at a barrier that every thread of the team must reach. When
// another process holds one of the cores, the thread the OS parks there holds its whole range
// (and, even with none, the barrier) until it next gets a time slice, a few milliseconds later:
// a decode step of tens of short regions then waits a slice in most of them. Here the calling
// thread and the workers take chunks from one shared counter, and the call returns once every
// chunk is done: a worker that was not running leaves its chunks to the others and is not
// waited for. The calling thread starts at once (no wake-up on the critical path).
//
// The protocol. One job at a time (a mutex; a second caller runs its loop inline). The claim
// word packs the job's epoch (24 bits), its chunk count (20 bits) and the next chunk (20 bits):
// a thread claims chunk c of epoch e with one compare-exchange on it, so a late worker that
// saw an older epoch can never claim a chunk of a newer job, nor one past its count. The
// caller publishes the job's fields before the claim word (release) and returns only when
// `done` equals the count: a job's fields stay valid while any of its chunks is claimed.
// Workers spin briefly after a job (back-to-back calls of a decode step find them awake), then
// sleep on a futex.
//
// Two pools on two cores: the team first. torch runs its own operators (norms, activations,
// attention, dense GEMMs) on its OpenMP team, and libgomp's idle worker spins after each
// region (about 4 ms of CPU here with the default OMP_WAIT_POLICY, on the core the pool's
// worker then needs). A sparse layer that follows such an operator ran its pool job on one
// core and a half: 1.5x slower in ViT-B and the Llama prefill than alone
// (bench/results/cpu-models-20261206e). So a job runs on torch's OpenMP team, with the same
// chunks from one shared counter (the spinning worker takes them at once, no core is
// contended), while the team's workers join it promptly. A worker that joins late (kLateJoinNs)
// was not running: another process holds its core, and the region's end barrier would wait
// for it in every job; after a second late join within kLateRepeatNs (one alone is a hiccup of
// a quiet machine) the jobs of the next kPoolForNs run on the pool, which does not wait for a
// parked worker, and the team is tried again after that. While other processes use the cores
// torch's threads need (machine_contended, contention.cpp: from the machine's CPU time against
// this process's, sampled every 200 ms), every job runs on the pool, and libgomp's idle workers
// are kept from spinning there. SPARSEKERN_POOL=pool|omp
// (read once, a benchmarking switch) fixes one of the two; SPARSEKERN_POOL=inline runs every
// job on the calling thread alone.
#include "cpu_common.h"

#include <c10/util/ParallelGuard.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sparsekern {
namespace cpu {
namespace {

constexpr int kEpochBits = 24, kCountBits = 20;
constexpr uint64_t kCountMask = (uint64_t(1) << kCountBits) - 1;

inline uint64_t claim_word(uint64_t epoch, uint64_t count, uint64_t next) {
  return (epoch << (2 * kCountBits)) | (count << kCountBits) | next;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// How long a worker spins for the next job before it sleeps. SPARSEKERN_POOL_SPIN_US (read
// once, a benchmarking switch) overrides it.
int64_t spin_ns() {
  static const int64_t ns = [] {
    const char* s = std::getenv("SPARSEKERN_POOL_SPIN_US");
    return s ? std::max<int64_t>(0, std::atoll(s)) * 1000 : int64_t(200) * 1000;
  }();
  return ns;
}

thread_local bool t_in_pool_job = false;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A futex wake of a sleeping OpenMP worker takes tens of microseconds; a worker that joins a
// millisecond late waited for a time slice (shorter than the few milliseconds of a slice).
constexpr int64_t kLateJoinNs = 1000 * 1000;
// How long the pool runs the jobs after a late join before the team is tried again (a late
// join costs up to a slice: tried a few times a second, that is a few percent on a busy machine).
constexpr int64_t kPoolForNs = 200 * 1000 * 1000;
// A late join sends the jobs to the pool only when another came less than this before it. With
// libgomp's default policy its idle worker spins on the core the pool's worker needs, so the
// pool runs a job at about half speed on a quiet machine: one late join there (a page fault, a
// host preemption) then slowed every sparse layer for kPoolForNs. ResNet-50 bf16's pruned
// convolutions, timed inside the model: in total 1.22x their dense copies' time on the pool,
// 0.94x on the team (bench/results/cpu-resnet-inmodel-20261207, SPARSEKERN_POOL=pool|omp). A
// machine where another process holds a core makes a worker late in job after job, and still
// switches.
constexpr int64_t kLateRepeatNs = 100 * 1000 * 1000;

enum class Threads { kAuto, kPool, kTeam, kInline };

// With OMP_WAIT_POLICY=PASSIVE libgomp's idle workers sleep at once instead of spinning: a job
// on the team would then pay a futex wake of each worker, and the pool's worker no longer
// competes with a spinning one for its core, so the pool runs every job. (libgomp reads the
// variable when it loads, with torch: the environment of the process decides, as here.)
bool omp_waits_passively() {
  const char* s = std::getenv("OMP_WAIT_POLICY");
  if (!s) return false;
  std::string v(s);
  for (auto& c : v) c = char(std::tolower(static_cast<unsigned char>(c)));
  return v == "passive";
}

Threads threads_mode() {
  static const Threads mode = [] {
    const char* s = std::getenv("SPARSEKERN_POOL");
    if (s && std::string(s) == "pool") return Threads::kPool;
    if (s && std::string(s) == "omp") return Threads::kTeam;
    if (s && std::string(s) == "inline") return Threads::kInline;
    return omp_waits_passively() ? Threads::kPool : Threads::kAuto;
  }();
  return mode;
}

// steady-clock ns until which jobs run on the pool (a team worker joined late before it).
std::atomic<int64_t> g_pool_until_ns{0};
// steady-clock ns of the last late join (team_job; kLateRepeatNs); far in the past at first.
std::atomic<int64_t> g_last_late_ns{INT64_MIN / 2};

// The job on torch's OpenMP team: every thread takes chunks from one counter. Returns the
// latest join of a thread after the region started, in ns.
int64_t run_on_team(int64_t n, int64_t chunk, int64_t count, int64_t threads,
                    const std::function<void(int64_t, int64_t)>& fn) {
  std::atomic<int64_t> next{0}, latest_join{0};
  std::atomic<bool> failed{false};
  const int64_t t0 = now_ns();
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int64_t joined = now_ns() - t0;
    int64_t seen = latest_join.load(std::memory_order_relaxed);
    while (joined > seen && !latest_join.compare_exchange_weak(seen, joined, std::memory_order_relaxed)) {
    }
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < count && !failed.load(std::memory_order_relaxed);
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      try {
        fn(c * chunk, std::min(n, (c + 1) * chunk));
      } catch (...) {
        failed.store(true, std::memory_order_relaxed);  // the others stop; parallel_for rethrows this
        throw;
      }
    }
  });
  return latest_join.load(std::memory_order_relaxed);
}

// Chunks of parallel_out_rows jobs a calling thread took over from a worker that had begun
// them (cpu_pool_takeovers).
std::atomic<int64_t> g_takeovers{0};

// A test switch (read once): a worker sleeps this long in the first block of each
// parallel_out_rows chunk it claims (after checking the chunk is still its own, before it reads
// anything), as one the OS parked there would. SPARSEKERN_POOL_WORKER_PAUSE_US; 0: none.
int64_t worker_pause_us() {
  static const int64_t us = [] {
    const char* s = std::getenv("SPARSEKERN_POOL_WORKER_PAUSE_US");
    return s ? std::max<int64_t>(0, std::atoll(s)) : int64_t(0);
  }();
  return us;
}

// A benchmarking switch (read once): SPARSEKERN_POOL_TAKEOVER=0 makes the calling thread wait
// for a worker's parallel_out_rows chunks, as parallel_chunks does, instead of taking them over.
bool takeover_on() {
  static const bool on = [] {
    const char* s = std::getenv("SPARSEKERN_POOL_TAKEOVER");
    return !(s && std::string(s) == "0");
  }();
  return on;
}

// A job of parallel_out_rows (cpu_common.h). The calling thread and each worker that takes part
// hold it by shared_ptr, so a worker the OS parked in the middle of a chunk finishes that chunk
// after the call returned, reading what the job keeps alive and writing only its own buffer.
// A chunk's state: kFree (not claimed, or claimed by a worker that has not marked it yet),
// kWorker (a worker runs it into its buffer), kCommitting (that worker copies it into out),
// kDone (in out), kTaken (the calling thread took it over from a worker, or closed it).
enum : uint8_t { kFree, kWorker, kCommitting, kDone, kTaken };

// Rows a worker runs between two checks that its chunk is still its own (kWorkerRows).
constexpr int64_t kWorkerRows = 64;

// Storages a parked worker may still read after the call returned (its chunk was taken over):
// not resizable until every such job has ended. A resize_ that grows a storage moves its bytes
// and frees the old ones, which the worker would then read; with the flag off torch raises
// "Trying to resize storage that is not resizable" instead (shrinking needs no new bytes and
// stays allowed). Counted per storage, as overlapping jobs may hold the same one (a decode
// step calls the layer again while the last call's abandoned chunk still runs); the flag it
// had comes back when the count drops to zero. The flag is a plain bool that resize_ reads
// unsynchronized: only its value before or after a write can be seen, and both are safe.
std::mutex g_pinned_lock;
std::unordered_map<c10::StorageImpl*, std::pair<int, bool>> g_pinned;  // count, resizable before

int64_t pinned_storages() {
  std::lock_guard<std::mutex> g(g_pinned_lock);
  return int64_t(g_pinned.size());
}

struct OutRowsJob {
  OutRows rows;
  // The storages of the tensors `rows` reads (parallel_out_rows' `keep`): its captures are raw
  // pointers into their bytes, so the storages, not the tensors, are what must outlive the call
  // (a tensor's set_() after it would otherwise free the bytes a parked worker still reads;
  // pin() keeps a resize_ from moving them).
  std::vector<c10::Storage> storages;
  bool pinned = false;  // storages counted in g_pinned (only the calling thread sets it)
  float* out = nullptr;
  int64_t B = 0, O = 0, chunk = 1, count = 0;
  bool abandonable = false;  // the calling thread may take over a chunk a worker is running
  std::atomic<int64_t> next{0};
  std::unique_ptr<std::atomic<uint8_t>[]> state;

  int64_t end(int64_t c) const { return std::min(O, (c + 1) * chunk); }

  // Called by the calling thread when it abandons a chunk a worker is running, before it
  // returns: the job's storages stay where they are until the job ends (g_pinned).
  void pin() {
    if (pinned) return;
    pinned = true;
    std::lock_guard<std::mutex> g(g_pinned_lock);
    for (const auto& st : storages) {
      c10::StorageImpl* impl = st.unsafeGetStorageImpl();
      auto& entry = g_pinned[impl];
      if (entry.first++ == 0) {
        entry.second = impl->resizable();
        impl->set_resizable(false);
      }
    }
  }

  // The last holder (the worker that finished the abandoned chunk, or the calling thread)
  // gives the storages their flag back; they are still held here (members outlive this body).
  ~OutRowsJob() {
    if (!pinned) return;
    std::lock_guard<std::mutex> g(g_pinned_lock);
    for (const auto& st : storages) {
      auto it = g_pinned.find(st.unsafeGetStorageImpl());
      if (it == g_pinned.end() || --it->second.first > 0) continue;
      if (it->second.second) it->first->set_resizable(true);
      g_pinned.erase(it);
    }
  }

  // Whether the worker that runs chunk c should drop it: the calling thread took it over.
  bool dropped(int64_t c) const { return state[c].load(std::memory_order_acquire) == kTaken; }

  // A worker's part: claims chunks, runs each into its own [B, O] buffer, kWorkerRows at a time
  // while the chunk is not dropped, and copies it into out unless the calling thread took it
  // over meanwhile. A chunk that raises goes back to kFree: the calling thread takes it over
  // and raises the error itself.
  void run_as_worker() {
    thread_local std::vector<float> buffer;
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < count;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      uint8_t s = kFree;
      if (!state[c].compare_exchange_strong(s, kWorker, std::memory_order_acq_rel)) continue;
      if (buffer.size() < size_t(B * O)) buffer.resize(size_t(B * O));
      const int64_t r0 = c * chunk, r1 = end(c);
      bool finished = true;
      try {
        for (int64_t r = r0; r < r1 && (finished = !dropped(c)); r += kWorkerRows) {
          // the test pause: inside the first block, where the OS parking the worker costs most
          if (r == r0 && worker_pause_us() > 0) std::this_thread::sleep_for(std::chrono::microseconds(worker_pause_us()));
          rows(buffer.data(), r, std::min(r1, r + kWorkerRows));
        }
      } catch (...) {
        s = kWorker;
        state[c].compare_exchange_strong(s, kFree, std::memory_order_acq_rel);
        continue;
      }
      if (!finished) continue;
      s = kWorker;
      if (!state[c].compare_exchange_strong(s, kCommitting, std::memory_order_acq_rel)) continue;
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(out + b * O + r0, buffer.data() + b * O + r0, size_t(r1 - r0) * sizeof(float));
      state[c].store(kDone, std::memory_order_release);
    }
  }

  // After an error on the calling thread: no worker may write into out once the call returns
  // (a chunk not yet begun, or an abandonable one, is taken; a worker's other chunk is waited for).
  void close() {
    for (int64_t c = 0; c < count; ++c) {
      for (uint8_t s = state[c].load(std::memory_order_acquire); s != kDone && s != kTaken;
           s = state[c].load(std::memory_order_acquire)) {
        if ((s == kFree || (s == kWorker && abandonable)) &&
            state[c].compare_exchange_weak(s, kTaken, std::memory_order_acq_rel)) {
          if (s == kWorker) pin();
          break;
        }
        cpu_relax();
      }
    }
  }
};

struct ChunkPool {
  std::mutex job_lock;                     // one job at a time
  std::atomic<uint64_t> claim{0};          // epoch | count | next (claim_word)
  std::atomic<int64_t> done{0};            // chunks finished in the current job
  std::atomic<uint32_t> wake{0};           // futex word: bumped at every job
  std::atomic<int> sleepers{0};
  std::atomic<int> participants{0};        // workers asked to take part (a hint: see worker_loop)
  uint64_t epoch = 0;
  // The current job (valid while one of its chunks is claimed and not done).
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0, chunk = 1;
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_lock;
  int workers = 0;  // started (guarded by job_lock)
  // The current parallel_out_rows job, or null (set and cleared by the calling thread).
  std::mutex out_job_lock;
  std::shared_ptr<OutRowsJob> out_job;

  std::shared_ptr<OutRowsJob> current_out_job() {
    std::lock_guard<std::mutex> g(out_job_lock);
    return out_job;
  }

  // Claims and runs chunks of `epoch` until none is left; true when it ran one.
  void run_chunks(uint64_t e) {
    uint64_t w = claim.load(std::memory_order_acquire);
    for (;;) {
      if ((w >> (2 * kCountBits)) != (e & ((uint64_t(1) << kEpochBits) - 1))) return;
      const uint64_t next = w & kCountMask, count = (w >> kCountBits) & kCountMask;
      if (next >= count) return;
      if (!claim.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      const int64_t b = int64_t(next) * chunk, end = std::min(n, b + chunk);
      if (!failed.load(std::memory_order_relaxed)) {
        try {
          (*fn)(b, end);
        } catch (...) {
          std::lock_guard<std::mutex> g(error_lock);
          if (!failed.exchange(true)) error = std::current_exception();
        }
      }
      done.fetch_add(1, std::memory_order_acq_rel);
      w = claim.load(std::memory_order_acquire);
    }
  }

  void worker_loop(int index) {
    t_in_pool_job = true;
    c10::ParallelGuard guard(true);  // ATen ops called from a chunk run inline, as in at::parallel_for
    uint32_t seen = wake.load(std::memory_order_acquire);
    for (;;) {
      uint32_t now = wake.load(std::memory_order_acquire);
      if (now == seen) {
        const auto t0 = std::chrono::steady_clock::now();
        const auto limit = std::chrono::nanoseconds(spin_ns());
        int spins = 0;
        while ((now = wake.load(std::memory_order_acquire)) == seen) {
          cpu_relax();
          if (++spins % 64 == 0 && std::chrono::steady_clock::now() - t0 > limit) {
            sleepers.fetch_add(1, std::memory_order_seq_cst);
            if (wake.load(std::memory_order_seq_cst) == seen)
              syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
            sleepers.fetch_sub(1, std::memory_order_seq_cst);
            spins = 0;
          }
        }
      }
      seen = now;
      // The epoch is read from the claim word itself; a stale one claims nothing.
      if (index >= participants.load(std::memory_order_relaxed)) continue;
      if (auto job = current_out_job()) job->run_as_worker();
      run_chunks(claim.load(std::memory_order_acquire) >> (2 * kCountBits));
    }
  }

  void start_workers(int wanted) {
    for (; workers < wanted; ++workers) {
      const int index = workers;
      std::thread([this, index] { worker_loop(index); }).detach();
    }
  }
};

ChunkPool* g_pool = nullptr;
std::once_flag g_pool_once;

ChunkPool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new ChunkPool();  // never deleted: detached workers use it until the process ends
    // A forked child has none of the parent's threads: it starts a pool of its own.
    pthread_atfork(nullptr, nullptr, [] { g_pool = new ChunkPool(); });
  });
  return *g_pool;
}

}  // namespace

namespace {

// Where a job of n items runs: on the calling thread alone, on torch's OpenMP team, or on the pool.
enum class Route { kInline, kTeam, kPool };

Route route(int64_t n, int64_t grain, int64_t threads) {
  const Threads mode = threads_mode();
  if (threads <= 1 || n <= grain || t_in_pool_job || at::in_parallel_region() || mode == Threads::kInline)
    return Route::kInline;
  if (mode == Threads::kTeam) return Route::kTeam;
  if (mode == Threads::kAuto) {
    const int64_t now = now_ns();
    if (!machine_contended(threads, now) && now >= g_pool_until_ns.load(std::memory_order_relaxed))
      return Route::kTeam;
  }
  return Route::kPool;
}

// The job on the team; a late join within kLateRepeatNs of the one before sends the next
// kPoolForNs of jobs to the pool (auto mode).
void team_job(int64_t n, int64_t grain, int64_t threads, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t chunk = std::max(grain, (n + 8 * threads - 1) / (8 * threads));
  const int64_t late = run_on_team(n, chunk, (n + chunk - 1) / chunk, threads, fn);
  if (threads_mode() == Threads::kAuto && late > kLateJoinNs) {
    const int64_t now = now_ns(), before = g_last_late_ns.exchange(now, std::memory_order_relaxed);
    if (now - before < kLateRepeatNs) g_pool_until_ns.store(now + kPoolForNs, std::memory_order_relaxed);
  }
}

// Wakes the pool's workers for a job whose fields are published.
void wake_workers(ChunkPool& p) {
  p.wake.fetch_add(1, std::memory_order_seq_cst);
  if (p.sleepers.load(std::memory_order_seq_cst) > 0)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&p.wake), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

}  // namespace

void parallel_chunks(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t threads = at::get_num_threads();
  const Route where = route(n, grain, threads);
  if (where == Route::kInline) {
    fn(0, n);
    return;
  }
  if (where == Route::kTeam) {
    team_job(n, grain, threads, fn);
    return;
  }
  ChunkPool& p = pool();
  std::unique_lock<std::mutex> lock(p.job_lock, std::try_to_lock);
  if (!lock.owns_lock()) {  // another thread's job holds the pool
    fn(0, n);
    return;
  }
  // Chunks of at least `grain`, about 8 per thread (a parked thread leaves at most one
  // chunk in flight), and never more than the claim word counts.
  int64_t chunk = std::max(grain, (n + 8 * threads - 1) / (8 * threads));
  chunk = std::max(chunk, (n + int64_t(kCountMask) - 1) / int64_t(kCountMask));
  const int64_t count = (n + chunk - 1) / chunk;
  p.start_workers(int(threads - 1));
  p.participants.store(int(threads - 1), std::memory_order_relaxed);
  p.fn = &fn;
  p.n = n;
  p.chunk = chunk;
  p.failed.store(false, std::memory_order_relaxed);
  p.error = nullptr;
  p.done.store(0, std::memory_order_relaxed);
  p.epoch = (p.epoch + 1) & ((uint64_t(1) << kEpochBits) - 1);
  p.claim.store(claim_word(p.epoch, uint64_t(count), 0), std::memory_order_release);
  wake_workers(p);
  {
    c10::ParallelGuard guard(true);
    t_in_pool_job = true;
    p.run_chunks(p.epoch);
    t_in_pool_job = false;
  }
  // Only chunks a worker claimed are left: wait for them, not for the workers.
  while (p.done.load(std::memory_order_acquire) < count) cpu_relax();
  if (p.failed.load(std::memory_order_acquire)) std::rethrow_exception(p.error);
}

void parallel_out_rows(int64_t O, int64_t B, int64_t grain, float* out, bool abandonable,
                       const std::vector<at::Tensor>& keep, OutRows rows) {
  if (O <= 0 || B <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t threads = at::get_num_threads();
  const Route where = route(O, grain, threads);
  if (where == Route::kInline) {
    rows(out, 0, O);
    return;
  }
  if (where == Route::kTeam) {  // the team's end barrier: a chunk is never abandoned there
    team_job(O, grain, threads, [&](int64_t r0, int64_t r1) { rows(out, r0, r1); });
    return;
  }
  ChunkPool& p = pool();
  std::unique_lock<std::mutex> lock(p.job_lock, std::try_to_lock);
  if (!lock.owns_lock()) {
    rows(out, 0, O);
    return;
  }
  auto job = std::make_shared<OutRowsJob>();
  job->rows = std::move(rows);
  for (const auto& t : keep)
    if (t.defined() && t.has_storage()) job->storages.push_back(t.storage());
  job->out = out;
  job->abandonable = abandonable;
  job->B = B;
  job->O = O;
  job->chunk = std::max(grain, (O + 8 * threads - 1) / (8 * threads));
  job->count = (O + job->chunk - 1) / job->chunk;
  job->state.reset(new std::atomic<uint8_t>[size_t(job->count)]);
  for (int64_t c = 0; c < job->count; ++c) job->state[c].store(kFree, std::memory_order_relaxed);
  p.start_workers(int(threads - 1));
  p.participants.store(int(threads - 1), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> g(p.out_job_lock);
    p.out_job = job;
  }
  wake_workers(p);
  OutRowsJob& j = *job;
  int64_t own = 0, own_ns = 0;
  try {
    c10::ParallelGuard guard(true);
    for (int64_t c = j.next.fetch_add(1, std::memory_order_relaxed); c < j.count;
         c = j.next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t t0 = now_ns();
      j.rows(out, c * j.chunk, j.end(c));
      own_ns += now_ns() - t0;
      ++own;
      j.state[c].store(kDone, std::memory_order_relaxed);
    }
    {
      std::lock_guard<std::mutex> g(p.out_job_lock);
      p.out_job.reset();  // no worker joins from here on
    }
    // The workers' chunks: wait for each a few times what a chunk took here, then take it over
    // (a worker that holds one longer than that was parked by the OS, for milliseconds).
    const int64_t patience = std::max<int64_t>(20 * 1000, own > 0 ? 4 * own_ns / own : 100 * 1000);
    for (int64_t c = 0; c < j.count; ++c) {
      const int64_t t0 = now_ns();
      int spins = 0;
      for (uint8_t s = j.state[c].load(std::memory_order_acquire); s != kDone;
           s = j.state[c].load(std::memory_order_acquire)) {
        // kFree: a worker counted the chunk but has not begun it (or gave it back after an
        // error): taking it is always safe. kWorker: only where the job may be abandoned.
        if ((s == kFree || (s == kWorker && j.abandonable && takeover_on())) && (++spins & 63) == 0 &&
            now_ns() - t0 > patience &&
            j.state[c].compare_exchange_strong(s, kTaken, std::memory_order_acq_rel)) {
          if (s == kWorker) {
            g_takeovers.fetch_add(1, std::memory_order_relaxed);
            j.pin();
          }
          j.rows(out, c * j.chunk, j.end(c));
          break;
        }
        cpu_relax();
      }
    }
  } catch (...) {
    {
      std::lock_guard<std::mutex> g(p.out_job_lock);
      p.out_job.reset();
    }
    j.close();
    throw;
  }
}

}  // namespace cpu

int64_t cpu_pool_takeovers() { return cpu::g_takeovers.load(std::memory_order_relaxed); }

int64_t cpu_pool_pinned_storages() { return cpu::pinned_storages(); }

}  // namespace sparsekern
