// One long-lived thread that runs one job at a time for its owner.
//
// Why not a std::thread per job: a verified restore wants its reader thread running within
// microseconds. Measured on a 2-vCPU machine, a thread created at the start of each restore began
// 0.2 to 4 ms later (the scheduler queues a new thread behind running ones), and every restore
// whose reader started late took the single-threaded time, ≈ 9 ms instead of ≈ 5 ms. A parked
// thread is woken instead; Prewake() wakes it ahead of the job, so that its own wake-up latency
// (tens of microseconds, milliseconds when its CPU is idle in a VM) overlaps the job's dispatch.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

namespace kvstash {

class HelperThread {
 public:
  HelperThread() = default;
  HelperThread(const HelperThread&) = delete;
  HelperThread& operator=(const HelperThread&) = delete;
  ~HelperThread() { Stop(); }

  // Wakes the thread (starting it on first use) to wait for a job by spinning, for at most
  // `spin`: a Start() within that time runs at once instead of after a wake-up.
  void Prewake(std::chrono::microseconds spin);
  // Keeps the thread off CPU `cpu` (the caller's) when the process may run on others, moving it at
  // once if it is queued there. A thread woken while its waker's CPU is the only one not busy can
  // be queued behind the waker there, and then waits for the waker's time slice to end although
  // the other CPU goes idle meanwhile (the scheduler does not move a task that ran recently).
  // Traced on a 2-vCPU machine: 5 of 81 restores had both threads on one CPU, and in each the
  // reader started 2–4 ms late. Best effort: a failure leaves the thread where it was.
  void AvoidCpu(int cpu);
  // Runs `job` on the helper thread (started on first use). False when no thread can be started:
  // the caller then does the work itself. One job at a time: Wait() before the next Start().
  bool Start(std::function<void()> job);
  // Returns once the job given to Start() has finished.
  void Wait();
  // Ends the thread (after its job); a later Start() starts a new one.
  void Stop();

 private:
  bool EnsureThread();
  void Loop();

  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::function<void()> job_;
  std::atomic<bool> jobPending_{false};
  std::chrono::steady_clock::time_point spinUntil_{};
  bool running_ = false, quit_ = false;
  std::thread thread_;
};

}  // namespace kvstash
