#include "common/FileLock.h"

#include <cerrno>
#include <cstring>
#include <string>

#ifndef _WIN32
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#endif

namespace kvstash {

namespace {

int FdArg(const Napi::CallbackInfo& info, const char* caller) {
  if (info.Length() < 1 || !info[0].IsNumber()) {
    throw Napi::TypeError::New(info.Env(), std::string(caller) + ": fd must be a number");
  }
  double value = info[0].As<Napi::Number>().DoubleValue();
  if (!(value >= 0 && value <= 2147483647.0) || value != static_cast<double>(static_cast<int>(value))) {
    throw Napi::RangeError::New(info.Env(), std::string(caller) + ": fd must be a non-negative integer");
  }
  return static_cast<int>(value);
}

// Shaped like Node's system errors, so lib/ handles both alike.
Napi::Error SystemError(Napi::Env env, int err, const char* syscall) {
  const char* name = "EIO";
  switch (err) {
    case EBADF: name = "EBADF"; break;
    case EINVAL: name = "EINVAL"; break;
    case ENOLCK: name = "ENOLCK"; break;
    case EINTR: name = "EINTR"; break;
    default: break;
  }
  Napi::Error error = Napi::Error::New(env, std::string(name) + ": " + std::strerror(err) + ", " + syscall);
  error.Set("code", Napi::String::New(env, name));
  error.Set("errno", Napi::Number::New(env, -err));
  error.Set("syscall", Napi::String::New(env, syscall));
  return error;
}

#ifndef _WIN32
// F_OFD_SETLK where the C library has it (Linux, x64 and arm64 alike): a POSIX range lock owned by
// the open file description, unlike classic F_SETLK whose locks belong to the process and vanish
// when any of its descriptors for the file is closed. Elsewhere flock(), which has the same owner.
int SetLock(int fd, bool lock) {
#ifdef F_OFD_SETLK
  struct flock request;
  std::memset(&request, 0, sizeof(request));
  request.l_type = lock ? F_WRLCK : F_UNLCK;
  request.l_whence = SEEK_SET;
  request.l_start = 0;
  request.l_len = 0;  // the whole file, however long it grows
  int rc;
  do {
    rc = fcntl(fd, F_OFD_SETLK, &request);
  } while (rc == -1 && errno == EINTR);
  return rc;
#else
  int rc;
  do {
    rc = flock(fd, lock ? (LOCK_EX | LOCK_NB) : LOCK_UN);
  } while (rc == -1 && errno == EINTR);
  return rc;
#endif
}
#endif

}  // namespace

Napi::Value TryLockFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(info, "tryLockFile");
#ifdef _WIN32
  (void)fd;
  throw SystemError(env, ENOLCK, "tryLockFile");
#else
  if (SetLock(fd, true) == 0) return Napi::Boolean::New(env, true);
  int err = errno;
  // EAGAIN/EACCES (fcntl) and EWOULDBLOCK (flock): someone else holds it.
  if (err == EAGAIN || err == EACCES || err == EWOULDBLOCK) return Napi::Boolean::New(env, false);
  throw SystemError(env, err, "fcntl");
#endif
}

Napi::Value UnlockFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(info, "unlockFile");
#ifdef _WIN32
  (void)fd;
#else
  if (SetLock(fd, false) != 0) throw SystemError(env, errno, "fcntl");
#endif
  return env.Undefined();
}

}  // namespace kvstash
