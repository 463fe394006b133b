// A large reusable buffer that stays out of forked children.
//
// Why not a std::vector: fork() (which Node's child_process uses) marks every private page of the
// parent copy-on-write, so the parent's next write to each 4 KiB page of a 25 MB buffer is a page
// fault; measured, that turned a 2 ms read into 8-12 ms after every spawn. MADV_DONTFORK keeps
// the pages out of the child, so a fork leaves them writable. The buffer is page-aligned memory
// of its own (mmap), faulted in once when it grows.
// (No MADV_HUGEPAGE: with the common THP setting defrag=madvise the kernel may compact memory
// synchronously when the pages are first touched; restores that mapped a new buffer took 75 ms
// with it, 19 ms without.)
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvstash {

class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { Release(); }

  // At least `size` writable bytes; the contents are not kept when it grows. Throws
  // std::bad_alloc when the memory cannot be mapped.
  uint8_t* Reserve(size_t size);
  void Release();

  uint8_t* data() const { return data_; }
  size_t capacity() const { return capacity_; }

 private:
  uint8_t* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace kvstash
