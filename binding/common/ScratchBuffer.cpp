#include "common/ScratchBuffer.h"

#include <sys/mman.h>
#include <unistd.h>

#include <new>

namespace kvstash {

uint8_t* ScratchBuffer::Reserve(size_t size) {
  if (size <= capacity_ && data_ != nullptr) return data_;
  Release();
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t capacity = (size + page - 1) / page * page;
  // Every page is faulted in now, in one pass (MAP_POPULATE), rather than one by one inside the
  // first copy. Mapping new memory is what costs (about 10 ms per 25 MB in a VM): hence the reuse.
  int flags = MAP_PRIVATE | MAP_ANONYMOUS;
#ifdef MAP_POPULATE
  flags |= MAP_POPULATE;
#endif
  void* memory = ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (memory == MAP_FAILED) throw std::bad_alloc();
#ifdef MADV_DONTFORK
  // A hint: without it the buffer still works, only slower after a fork.
  ::madvise(memory, capacity, MADV_DONTFORK);
#endif
  data_ = static_cast<uint8_t*>(memory);
  capacity_ = capacity;
  return data_;
}

void ScratchBuffer::Release() {
  if (data_ != nullptr) ::munmap(data_, capacity_);
  data_ = nullptr;
  capacity_ = 0;
}

}  // namespace kvstash
