#include "common/HelperThread.h"

#include <system_error>

namespace kvstash {

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

bool HelperThread::Start(std::function<void()> job) {
  if (!thread_.joinable()) {
    try {
      thread_ = std::thread([this]() { Loop(); });
    } catch (const std::system_error&) {
      return false;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = std::move(job);
    running_ = true;
  }
  wake_.notify_one();
  return true;
}

void HelperThread::Wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [this]() { return !running_; });
}

void HelperThread::Loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    wake_.wait(lock, [this]() { return quit_ || job_ != nullptr; });
    if (job_ == nullptr) return;  // quit_ with no job pending
    std::function<void()> job = std::move(job_);
    job_ = nullptr;
    lock.unlock();
    job();
    lock.lock();
    running_ = false;
    done_.notify_all();
  }
}

}  // namespace kvstash
