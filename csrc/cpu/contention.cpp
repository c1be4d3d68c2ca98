// machine_contended (cpu_common.h): whether other processes use the cores torch's threads
// need, judged from the CPU time the whole machine spent against this process's; and, while
// they do, libgomp's idle workers kept from spinning.
//
// Why. With libgomp's default wait policy (OMP_WAIT_POLICY unset) torch's idle OpenMP worker
// spins for about 300,000 iterations after each of torch's parallel regions, a few milliseconds
// of CPU. On a quiet machine that is what makes the next region start at once. When another
// process holds one of two cores, the spinning worker and the thread running the model share
// the other, and the model's thread waits for a time slice between layers: the Llama-style
// decoder's sparse variants kept 0.35-0.72 of their quiet speed-up with a core busy under the
// default policy, 0.81-0.97 under PASSIVE (bench/results/cpu-models-20261207g and -passive).
// A library cannot change the policy once torch has loaded libgomp, but libgomp's documented
// rule (GOMP_SPINCOUNT) cuts the spin to 100 iterations whenever it manages more threads than
// there are CPUs. So while the machine is contended, a thread of this file holds an idle team of
// its own (kThrottleTeam threads, parked on a futex) that takes libgomp's count past the CPUs;
// when the machine is quiet again the thread ends, its team with it, and the spinning resumes.
// Only with libgomp, the policy unset, no GOMP_SPINCOUNT, and torch running at least two
// threads (one idle worker to spin); with PASSIVE the chunk pool runs every job anyway.
//
// The judgement. Every kSampleNs at most (on the calling thread of a job, so a process that
// runs no sparse kernel never samples): the machine's busy CPU time (/proc/stat: user, nice,
// system, irq, softirq, steal) minus this process's own (getrusage) over the interval, in CPUs.
// Contended when it leaves fewer CPUs than torch's threads: others > CPUs - threads + 0.5. The
// machine's figure is counted in clock ticks (10 ms), so the interval is long enough for a few
// ticks' error to stay well below half a CPU. SPARSEKERN_CONTENTION=auto|busy|quiet (read once,
// a benchmarking and test switch): busy and quiet fix the verdict.
#include "cpu_common.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <omp.h>
#include <pthread.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>

namespace sparsekern {
namespace cpu {
namespace {

// How often the machine is sampled (a read of /proc/stat, about 20 microseconds).
constexpr int64_t kSampleNs = 200 * 1000 * 1000;
// The throttle's team: at most this many threads (libgomp must count more threads than CPUs).
constexpr int kMaxThrottleTeam = 4;

enum class Verdict { kAuto, kBusy, kQuiet };

Verdict forced_verdict() {
  static const Verdict v = [] {
    const char* s = std::getenv("SPARSEKERN_CONTENTION");
    if (s && std::string(s) == "busy") return Verdict::kBusy;
    if (s && std::string(s) == "quiet") return Verdict::kQuiet;
    return Verdict::kAuto;
  }();
  return v;
}

// The machine's busy CPU time since boot, in ns (-1 where /proc/stat cannot be read).
int64_t machine_busy_ns() {
  FILE* f = std::fopen("/proc/stat", "r");
  if (!f) return -1;
  unsigned long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  const int got = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &user, &nice, &system, &idle,
                              &iowait, &irq, &softirq, &steal);
  std::fclose(f);
  if (got < 7) return -1;
  static const long tick = sysconf(_SC_CLK_TCK);
  if (tick <= 0) return -1;
  const unsigned long long busy = user + nice + system + irq + softirq + (got >= 8 ? steal : 0);
  return int64_t(busy) * (int64_t(1000000000) / tick);
}

int64_t process_cpu_ns() {
  rusage u{};
  if (getrusage(RUSAGE_SELF, &u) != 0) return -1;
  return (int64_t(u.ru_utime.tv_sec) + u.ru_stime.tv_sec) * 1000000000 +
         (int64_t(u.ru_utime.tv_usec) + u.ru_stime.tv_usec) * 1000;
}

// libgomp (not LLVM's or Intel's runtime, which export kmp_* and keep their own block time),
// with its spin count left to its default: the only case the throttle changes anything.
bool libgomp_spins_by_default() {
  static const bool spins = [] {
    if (std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT")) return false;
    return dlsym(RTLD_DEFAULT, "GOMP_parallel") != nullptr && dlsym(RTLD_DEFAULT, "kmp_set_blocktime") == nullptr;
  }();
  return spins;
}

// The thread that holds an idle OpenMP team while the machine is contended.
struct SpinThrottle {
  std::mutex m;
  std::condition_variable cv;
  bool release = false;
  bool running = false;  // a thread holds (or is about to hold) the team
  pthread_t thread{};
  int team_size = 0;  // threads of the team the next thread holds
  std::atomic<int64_t> engagements{0};

  static void* body(void* arg) {
    auto* self = static_cast<SpinThrottle*>(arg);
    const int team = self->team_size;
    // A region that only counts its threads (GCC drops an empty one): afterwards libgomp keeps
    // this thread's team-1 workers parked for its next region, and counts them among the
    // threads it manages until this thread ends.
    std::atomic<int> joined{0};
#pragma omp parallel num_threads(team)
    { joined.fetch_add(1, std::memory_order_relaxed); }
    std::unique_lock<std::mutex> l(self->m);
    self->cv.wait(l, [&] { return self->release; });
    return nullptr;  // libgomp's thread destructor releases the team
  }

  void engage(int team) {
    std::lock_guard<std::mutex> g(m);
    if (running) return;
    release = false;
    team_size = team;
    if (pthread_create(&thread, nullptr, &SpinThrottle::body, this) != 0) return;  // no throttle, no harm
    running = true;
    engagements.fetch_add(1, std::memory_order_relaxed);
  }
  void disengage() {
    pthread_t t;
    {
      std::lock_guard<std::mutex> g(m);
      if (!running) return;
      release = true;
      running = false;
      t = thread;
    }
    cv.notify_all();
    pthread_join(t, nullptr);
  }
};

SpinThrottle* g_throttle = new SpinThrottle();  // never deleted: its thread may outlive statics

struct Monitor {
  std::mutex sample_lock;
  int64_t last_ns = 0, last_machine = -1, last_self = -1;
  std::atomic<bool> contended{false};
  std::atomic<int64_t> next_sample_ns{0};
};
Monitor* g_monitor = new Monitor();
// A forked child has none of the parent's threads (nor its throttle's): it starts afresh.
const int g_fork_handler = pthread_atfork(nullptr, nullptr, [] {
  g_throttle = new SpinThrottle();
  g_monitor = new Monitor();
});

// The team size that takes libgomp's managed threads (about torch's `threads`) past `cpus`;
// 0 where that needs more than kMaxThrottleTeam (torch leaves cores free: spinning costs
// little there).
int throttle_team(int64_t threads, int64_t cpus) {
  if (threads < 2) return 0;
  const int64_t team = std::max<int64_t>(2, cpus - threads + 2);
  return team <= kMaxThrottleTeam ? int(team) : 0;
}

void apply(bool contended, int64_t threads) {
  if (!libgomp_spins_by_default()) return;
  const int team = throttle_team(threads, omp_get_num_procs());
  if (contended && team > 0)
    g_throttle->engage(team);
  else if (!contended)
    g_throttle->disengage();
}

void sample(Monitor& mon, int64_t now, int64_t threads) {
  std::unique_lock<std::mutex> l(mon.sample_lock, std::try_to_lock);
  if (!l.owns_lock() || now < mon.next_sample_ns.load(std::memory_order_relaxed)) return;
  mon.next_sample_ns.store(now + kSampleNs, std::memory_order_relaxed);
  const int64_t machine = machine_busy_ns(), self = process_cpu_ns();
  if (machine >= 0 && self >= 0 && mon.last_machine >= 0 && now > mon.last_ns) {
    const double others = double((machine - mon.last_machine) - (self - mon.last_self)) / double(now - mon.last_ns);
    const bool contended = others > double(omp_get_num_procs() - threads) + 0.5;
    mon.contended.store(contended, std::memory_order_relaxed);
    apply(contended, threads);
  }
  mon.last_ns = now;
  mon.last_machine = machine;
  mon.last_self = self;
}

}  // namespace

bool machine_contended(int64_t threads, int64_t now) {
  switch (forced_verdict()) {
    case Verdict::kBusy: {
      static std::once_flag once;
      std::call_once(once, [&] { apply(true, threads); });
      return true;
    }
    case Verdict::kQuiet:
      return false;
    case Verdict::kAuto:
      break;
  }
  Monitor& mon = *g_monitor;
  if (now >= mon.next_sample_ns.load(std::memory_order_relaxed)) sample(mon, now, threads);
  return mon.contended.load(std::memory_order_relaxed);
}

}  // namespace cpu

std::tuple<bool, int64_t> cpu_contention() {
  return {cpu::g_monitor->contended.load(std::memory_order_relaxed) ||
              cpu::forced_verdict() == cpu::Verdict::kBusy,
          cpu::g_throttle->engagements.load(std::memory_order_relaxed)};
}

}  // namespace sparsekern
