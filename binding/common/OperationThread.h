// One long-lived thread that runs an owner's slow operations (a context's decodes and state work),
// one at a time, and settles each on the main thread.
//
// Why not libuv's pool, where Napi::AsyncWorker runs them: consecutive decodes of one generation
// then land on whichever of its threads is free, and a thread that has not run for a while is
// queued behind busy ones. With ggml's compute threads waiting for it at every graph barrier, such
// a late start stalls the whole step. Measured on a 2-vCPU machine (tiny model, 2 threads, 200
// one-token decodes after a 2,000-token prompt, sampling between them): 13-36 ms stalls in every
// run on the pool (mean step 1.6-2.4 ms) and about none with one thread doing every decode (mean
// 1.5-1.6 ms); through the server, the mean gap between streamed tokens went from 2.5-2.7 ms to
// 1.8-1.9 ms. llama.cpp's own server decodes on one thread too.
#pragma once

#include <napi.h>

#include <condition_variable>
#include <mutex>
#include <thread>

namespace kvstash {

class OperationThread {
 public:
  OperationThread() = default;
  OperationThread(const OperationThread&) = delete;
  OperationThread& operator=(const OperationThread&) = delete;
  ~OperationThread() { Stop(); }

  // Main thread. Runs `worker`'s Execute on this thread (started on first use), then its
  // OnOK/OnError on the main thread, as Queue() would; the process stays alive until then. False
  // when no thread could be started: the caller then queues the worker on libuv's pool.
  bool Run(Napi::Env env, Napi::AsyncWorker* worker);

  // Main thread. Ends the thread once its job (if any) is done.
  void Stop();

 private:
  // The settler's finalizer may run after its owner is gone (it is asynchronous once released), so
  // it reaches the owner through this link, which Stop() cuts.
  struct Link {
    OperationThread* owner;
  };
  static void Complete(Napi::Env env, Napi::Function, OperationThread* self, Napi::AsyncWorker* worker);
  static void Finalized(Napi::Env, Link* link, OperationThread*);
  void Loop();

  using Settler = Napi::TypedThreadSafeFunction<OperationThread, Napi::AsyncWorker, &OperationThread::Complete>;

  std::mutex mutex_;
  std::condition_variable wake_;
  Napi::AsyncWorker* job_ = nullptr;
  bool quit_ = false;
  std::thread thread_;
  Settler settler_;
  Link* link_ = nullptr;
  // Main thread only: whether settler_ exists and has not been finalized (at environment teardown
  // Node.js closes it before the owner's destructor runs; releasing it then would touch freed memory).
  bool settlerLive_ = false;
  // Set (under mutex_) when the settler is finalized; the thread then settles nothing more.
  bool settlerClosed_ = false;
};

}  // namespace kvstash
