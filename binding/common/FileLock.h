// Kernel advisory locks on an open file, which Node's fs module does not offer. A lock belongs to
// the open file description, so the kernel drops it when the descriptor is closed or the holding
// process dies, however it dies: nothing on disk has to be cleaned up after a crash. Which file to
// lock and what a refusal means is decided in lib/ (lib/session/lock.ts); this is mechanism only.
#pragma once

#include <napi.h>

namespace kvstash {

// tryLockFile(fd: number) -> boolean: takes an exclusive lock on the whole file without waiting.
// true when taken, false when another open file description (another process, or another open()
// in this one) holds it. Other failures (ENOLCK on a file system without locks, EBADF) throw an
// Error carrying code/errno/syscall like Node's own system errors.
Napi::Value TryLockFile(const Napi::CallbackInfo& info);
// unlockFile(fd: number) -> undefined: drops this descriptor's lock (closing it does too; unlocking
// first means a descriptor duplicated meanwhile cannot keep the lock alive).
Napi::Value UnlockFile(const Napi::CallbackInfo& info);

}  // namespace kvstash
