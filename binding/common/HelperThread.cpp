#include "common/HelperThread.h"

#include <pthread.h>
#include <sched.h>

#include <system_error>

#include "common/CpuRelax.h"

namespace kvstash {

bool HelperThread::EnsureThread() {
  if (thread_.joinable()) return true;
  try {
    thread_ = std::thread([this]() { Loop(); });
    return true;
  } catch (const std::system_error&) {
    return false;
  }
}

void HelperThread::Prewake(std::chrono::microseconds spin) {
  if (!EnsureThread()) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    spinUntil_ = std::chrono::steady_clock::now() + spin;
  }
  wake_.notify_one();
}

void HelperThread::AvoidCpu(int cpu) {
  if (cpu < 0 || cpu >= CPU_SETSIZE || !EnsureThread()) return;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  // The calling thread's set: the process's, unless someone narrowed it (taskset, cgroups).
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0 || !CPU_ISSET(cpu, &allowed) || CPU_COUNT(&allowed) < 2) return;
  CPU_CLR(cpu, &allowed);
  pthread_setaffinity_np(thread_.native_handle(), sizeof(allowed), &allowed);
}

bool HelperThread::Start(std::function<void()> job) {
  if (!EnsureThread()) return false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = std::move(job);
    running_ = true;
    jobPending_.store(true, std::memory_order_release);
  }
  wake_.notify_one();
  return true;
}

void HelperThread::Wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [this]() { return !running_; });
}

void HelperThread::Stop() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    quit_ = true;
  }
  wake_.notify_one();
  thread_.join();
  quit_ = false;
}

void HelperThread::Loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    wake_.wait(lock, [this]() {
      return quit_ || job_ != nullptr || std::chrono::steady_clock::now() < spinUntil_;
    });
    if (job_ == nullptr) {
      if (quit_) return;
      // Prewoken: spin until the job arrives or the spin time is up.
      const auto until = spinUntil_;
      spinUntil_ = {};
      lock.unlock();
      while (!jobPending_.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < until) CpuRelax();
      lock.lock();
      continue;
    }
    std::function<void()> job = std::move(job_);
    job_ = nullptr;
    jobPending_.store(false, std::memory_order_relaxed);
    lock.unlock();
    job();
    lock.lock();
    running_ = false;
    done_.notify_all();
  }
}

}  // namespace kvstash
