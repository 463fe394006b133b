#include "common/OperationThread.h"

#include <system_error>

namespace kvstash {

bool OperationThread::Run(Napi::Env env, Napi::AsyncWorker* worker) {
  if (!thread_.joinable()) {
    auto* link = new Link{this};
    try {
      settler_ = Settler::New(env, "kvstash.operation", 0, 1, this, &OperationThread::Finalized, link);
    } catch (const Napi::Error&) {
      delete link;
      return false;
    }
    link_ = link;
    settlerLive_ = true;
    settlerClosed_ = false;
    // An idle owner must not keep the process alive; a running operation does (Ref below).
    settler_.Unref(env);
    quit_ = false;
    try {
      thread_ = std::thread([this] { Loop(); });
    } catch (const std::system_error&) {
      Stop();
      return false;
    }
  }
  settler_.Ref(env);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = worker;
  }
  wake_.notify_one();
  return true;
}

void OperationThread::Loop() {
  for (;;) {
    Napi::AsyncWorker* job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return job_ != nullptr || quit_; });
      if (job_ == nullptr) return;  // quit_
      job = job_;
      job_ = nullptr;
    }
    // Execute() never touches JS (the env argument is unused off the main thread).
    job->OnExecute(Napi::Env(nullptr));
    // Under the lock, so that the settler cannot be finalized (and freed) between the check and
    // the call. Unbounded queue: the call fails only while the environment is torn down.
    std::lock_guard<std::mutex> lock(mutex_);
    if (!settlerClosed_) settler_.NonBlockingCall(job);
  }
}

void OperationThread::Complete(Napi::Env env, Napi::Function, OperationThread* self, Napi::AsyncWorker* worker) {
  if (env == nullptr) return;  // environment teardown: the worker is abandoned with its promise
  self->settler_.Unref(env);
  worker->OnWorkComplete(env, napi_ok);  // OnOK/OnError, then deletes the worker
}

void OperationThread::Finalized(Napi::Env, Link* link, OperationThread*) {
  // At environment teardown Node.js finalizes (then frees) the settler even while this thread may
  // still call it: from here on the thread must not.
  if (OperationThread* owner = link->owner) {
    std::lock_guard<std::mutex> lock(owner->mutex_);
    owner->settlerClosed_ = true;
    owner->settlerLive_ = false;
  }
  delete link;
}

void OperationThread::Stop() {
  if (thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      quit_ = true;
    }
    wake_.notify_one();
    thread_.join();
  }
  if (settlerLive_) {
    settlerLive_ = false;
    link_->owner = nullptr;
    settler_.Release();
  }
  link_ = nullptr;
}

}  // namespace kvstash
