#include "llama/StateReadGate.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <unistd.h>

#include "common/Checksum.h"
#include "common/CpuRelax.h"

namespace kvstash {

namespace {

// The gate of the imports running on this thread (a libuv worker runs one import at a time).
thread_local StateReadGate* currentGate = nullptr;

}  // namespace

StateReadGate::StateReadGate(int fd, uint8_t* buffer, uint64_t length, uint64_t chunkBytes, const std::vector<uint8_t>& digests,
                             DigestScheme scheme, HelperThread& reader)
    : fd_(fd),
      buffer_(buffer),
      length_(length),
      chunkBytes_(chunkBytes),
      chunks_(ChunkCount(length, chunkBytes)),
      digests_(digests),
      scheme_(scheme),
      states_(new std::atomic<uint8_t>[chunks_]),
      previous_(currentGate),
      reader_(reader) {
  for (uint64_t i = 0; i < chunks_; ++i) states_[i].store(kUnchecked, std::memory_order_relaxed);
  readerStarted_ = reader_.Start([this]() {
    // Runs of up to kRunChunks unclaimed chunks, one pread each: fewer system calls than one per
    // chunk, and still small enough to stay in the CPU cache until they are hashed.
    constexpr uint64_t kRunChunks = 16;
    for (uint64_t index = 0; index < chunks_ && !stop_.load(std::memory_order_relaxed) && !failed_.load();) {
      uint64_t run = 0;
      for (uint8_t expected = kUnchecked; index + run < chunks_ && run < kRunChunks; ++run, expected = kUnchecked) {
        if (!states_[index + run].compare_exchange_strong(expected, kChecking)) break;
      }
      if (run == 0) {
        ++index;  // taken by the importing thread
        continue;
      }
      ReadAndCheck(index, run);
      index += run;
    }
  });
  currentGate = this;
}

StateReadGate::~StateReadGate() {
  currentGate = previous_;
  stop_ = true;
  if (readerStarted_) reader_.Wait();
}

void StateReadGate::ReadAndCheck(uint64_t first, uint64_t count) {
  const uint64_t begin = first * chunkBytes_, end = std::min(length_, (first + count) * chunkBytes_);
  bool readable = true;
  for (uint64_t done = begin; done < end;) {
    const ssize_t got = ::pread(fd_, buffer_ + done, static_cast<size_t>(end - done), static_cast<off_t>(done));
    if (got > 0) {
      done += static_cast<uint64_t>(got);
    } else if (got < 0 && errno == EINTR) {
      continue;
    } else {
      readErrno_ = got < 0 ? errno : -1;
      readable = false;
      break;
    }
  }
  for (uint64_t index = first; index < first + count; ++index) {
    bool matches = readable;
    if (matches) {
      const uint64_t chunkBegin = index * chunkBytes_, chunkEnd = std::min(length_, chunkBegin + chunkBytes_);
      const ByteSpan chunk{buffer_ + chunkBegin, static_cast<size_t>(chunkEnd - chunkBegin)};
      matches = ChunkDigest(&chunk, 1, 0, chunk.size, index, scheme_) == LoadDigest(digests_.data(), index);
    }
    if (!matches) failed_ = true;
    states_[index].store(matches ? kVerified : kFailed, std::memory_order_release);
  }
}

std::string StateReadGate::ReadError() const {
  const int error = readErrno_.load();
  if (error == 0) return "";
  return error < 0 ? "the file ends early" : std::strerror(error);
}

bool StateReadGate::Resolve(uint64_t index) {
  for (int spins = 0;; ++spins) {
    uint8_t state = states_[index].load(std::memory_order_acquire);
    if (state == kUnchecked && states_[index].compare_exchange_strong(state, kChecking)) {
      ReadAndCheck(index, 1);
      continue;
    }
    if (state == kVerified) return true;
    if (state == kFailed) return false;
    // The other thread is checking this chunk. Rather than wait, take the next chunk nobody has
    // claimed: the two threads then share the reading and hashing instead of one idling.
    if (ClaimAhead(index)) continue;
    // Being checked by the other thread: one chunk takes microseconds. Yield now and then in case
    // that thread is not running.
    if (spins % 256 == 255) std::this_thread::yield();
    else CpuRelax();
  }
}

bool StateReadGate::ClaimAhead(uint64_t index) {
  const uint64_t end = std::min(chunks_, index + 1 + kClaimAheadChunks);
  for (uint64_t ahead = index + 1; ahead < end; ++ahead) {
    uint8_t expected = kUnchecked;
    if (states_[ahead].load(std::memory_order_relaxed) == kUnchecked &&
        states_[ahead].compare_exchange_strong(expected, kChecking)) {
      ReadAndCheck(ahead, 1);
      return true;
    }
  }
  return false;
}

bool StateReadGate::Admit(const uint8_t* data, size_t size) {
  consulted_ = true;
  if (data < buffer_ || data >= buffer_ + length_ || size == 0) return true;
  const uint64_t offset = static_cast<uint64_t>(data - buffer_);
  const uint64_t last = (std::min(length_, offset + size) - 1) / chunkBytes_;
  for (uint64_t index = offset / chunkBytes_; index <= last; ++index) {
    if (!Resolve(index)) return false;
  }
  return true;
}

bool StateReadGate::AllVerified() {
  for (uint64_t index = 0; index < chunks_; ++index) {
    if (!Resolve(index)) return false;
  }
  return true;
}

}  // namespace kvstash

// Declared weak in kvstash's edit of llama.cpp's state reader (scripts/fetch-llama.js).
extern "C" bool kvstash_state_read_gate(const void* data, size_t size) {
  kvstash::StateReadGate* gate = kvstash::currentGate;
  return gate == nullptr || gate->Admit(static_cast<const uint8_t*>(data), size);
}
