#include "llama/StateReadGate.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif
#include <new>
#include <thread>

#include <sched.h>
#include <unistd.h>

#include "common/Checksum.h"
#include "common/CpuRelax.h"
#include "common/ScratchBuffer.h"
#include "ggml.h"

namespace kvstash {

namespace {

// Reads the small fields of a state in order, each admitted (verified) before it is read. A read
// past the end, or of bytes that failed their checksum, stops the walk.
class StateCursor {
 public:
  StateCursor(const uint8_t* data, uint64_t size, const std::function<bool(const uint8_t*, size_t)>& admit)
      : at_(data), left_(size), admit_(admit) {}

  template <typename T>
  bool Read(T* value) {
    if (left_ < sizeof(T)) {
      ended_ = true;
      return false;
    }
    if (!admit_(at_, sizeof(T))) {
      unverified_ = true;
      return false;
    }
    std::memcpy(value, at_, sizeof(T));
    Skip(sizeof(T));
    return true;
  }
  // Steps over `bytes` nobody reads here (K and V rows); false when fewer are left.
  bool Skip(uint64_t bytes) {
    if (bytes > left_) {
      ended_ = true;
      return false;
    }
    at_ += bytes;
    left_ -= bytes;
    return true;
  }
  uint64_t Left() const { return left_; }
  bool Unverified() const { return unverified_; }
  bool Ended() const { return ended_; }

 private:
  const uint8_t* at_;
  uint64_t left_;
  const std::function<bool(const uint8_t*, size_t)>& admit_;
  bool unverified_ = false, ended_ = false;
};

// LLAMA_MAX_SEQ (src/llama-cparams.h): no context has more sequences, so no cell names a larger id.
constexpr int32_t kMaxSequenceId = 256;
// io_magic in llama-context.cpp: the first u32 of every sequence state.
constexpr uint32_t kSequenceStateMagic = 0xaf143cd8;

// One walk of the state as `caches` KV caches, each with V rows or not (MLA caches have none).
// Returns kValid when the bytes are exactly such a state, else why not in `reason`.
StateCheck WalkState(StateCursor& c, const SequenceStateShape& shape, int caches, bool withV, std::string* reason) {
  auto str = [](uint64_t v) { return std::to_string(v); };
  auto invalid = [&](const std::string& why) {
    *reason = why;
    return StateCheck::kInvalid;
  };
  const std::string truncated = "the state ends inside its own structure";
  // llama_context::state_seq_get_data's prefix: its magic and the sequence the state came from.
  uint32_t magic = kSequenceStateMagic;
  int32_t source = 0;
  if (shape.prefixed && (!c.Read(&magic) || !c.Read(&source))) return invalid(truncated);
  if (magic != kSequenceStateMagic) return invalid("it does not start with llama.cpp's sequence-state magic");
  if (source < 0 || source >= kMaxSequenceId) return invalid("it names source sequence " + std::to_string(source));
  for (int cache = 0; cache < caches; ++cache) {
    uint32_t streams = 0;
    if (!c.Read(&streams)) return invalid(truncated);
    if (streams == 0 || streams > static_cast<uint32_t>(kMaxSequenceId)) return invalid("the state has " + str(streams) + " KV streams");
    if (streams != shape.streams) {
      *reason = "the state was made with " + str(streams) + " KV streams, this context has " + str(shape.streams) +
                " (unifiedKv or sequences differ)";
      return StateCheck::kMismatch;
    }
    uint32_t filled = 0;
    uint64_t cellsSeen = 0;
    for (uint32_t s = 0; s < streams; ++s) {
      uint32_t cells = 0;
      if (!c.Read(&cells)) return invalid(truncated);
      if (cells == 0) continue;
      if (++filled > 1) return invalid("the state of one sequence holds cells in more than one KV stream");
      // Each cell's metadata alone takes this much: a claim the bytes cannot back is refused before
      // anything is sized by it.
      if (uint64_t{cells} * (12 + shape.cellExtBytes) > c.Left()) {
        return invalid("the state claims " + str(cells) + " cells but holds only " + str(c.Left()) + " more bytes");
      }
      // The first cache holds every position of the sequence; a sliding-window cache after it keeps
      // only the window's.
      if (shape.tokens >= 0 && (cache == 0 ? cells != static_cast<uint32_t>(shape.tokens) : cells > static_cast<uint32_t>(shape.tokens))) {
        return invalid("the header lists " + str(shape.tokens) + " tokens; the state holds " + str(cells) + " cells");
      }
      if (cells > shape.cellsPerStream) {
        *reason = "the state holds " + str(cells) + " cells; this context holds " + str(shape.cellsPerStream) + " per sequence";
        return StateCheck::kMismatch;
      }
      cellsSeen = cells;
      // Not above cellsPerStream: with a token count, cells == tokens was checked above.
      const uint32_t limit = shape.tokens >= 0 ? static_cast<uint32_t>(shape.tokens) : shape.cellsPerStream;
      std::vector<bool> seen(limit);
      for (uint32_t i = 0; i < cells; ++i) {
        int32_t pos = 0, seq = 0;
        uint32_t owners = 0;
        if (!c.Read(&pos) || !c.Read(&owners)) return invalid(truncated);
        if (owners != 1) return invalid("cell " + str(i) + " belongs to " + str(owners) + " sequences, not 1");
        if (!c.Skip(shape.cellExtBytes) || !c.Read(&seq)) return invalid(truncated);
        if (seq < 0 || seq >= kMaxSequenceId) return invalid("cell " + str(i) + " names sequence " + std::to_string(seq));
        if (pos < 0 || static_cast<uint32_t>(pos) >= limit) {
          return invalid("cell " + str(i) + " is at position " + std::to_string(pos) + ", outside [0, " + str(limit) + ")" +
                         (shape.tokens >= 0 ? " (the header's tokens)" : " (the context)"));
        }
        if (seen[pos]) return invalid("position " + std::to_string(pos) + " appears in two cells");
        seen[pos] = true;
      }
      uint32_t vTrans = 0, layers = 0;
      if (!c.Read(&vTrans) || !c.Read(&layers)) return invalid(truncated);
      if (vTrans > 1) return invalid("the V-transposed flag is " + str(vTrans));
      if (layers == 0 || layers > shape.maxLayers) {
        return invalid("the state has " + str(layers) + " layers; the model has " + str(shape.maxLayers));
      }
      auto rows = [&](const char* what, uint32_t layer, uint64_t rowBytes, uint64_t count) -> std::string {
        if (rowBytes == 0 || rowBytes > c.Left() / count) {
          return std::string("layer ") + str(layer) + "'s " + what + " rows (" + str(count) + " of " + str(rowBytes) +
                 " bytes) do not fit in the " + str(c.Left()) + " bytes left";
        }
        c.Skip(rowBytes * count);
        return "";
      };
      for (uint32_t layer = 0; layer < layers; ++layer) {
        int32_t type = 0;
        uint64_t rowBytes = 0;
        if (!c.Read(&type) || !c.Read(&rowBytes)) return invalid(truncated);
        if (type < 0 || type >= GGML_TYPE_COUNT) return invalid("layer " + str(layer) + "'s K type is " + std::to_string(type));
        std::string bad = rows("K", layer, rowBytes, cells);
        if (!bad.empty()) return invalid(bad);
      }
      for (uint32_t layer = 0; withV && layer < layers; ++layer) {
        int32_t type = 0;
        if (!c.Read(&type)) return invalid(truncated);
        if (type < 0 || type >= GGML_TYPE_COUNT) return invalid("layer " + str(layer) + "'s V type is " + std::to_string(type));
        std::string bad;
        if (vTrans == 0) {
          uint64_t rowBytes = 0;
          if (!c.Read(&rowBytes)) return invalid(truncated);
          bad = rows("V", layer, rowBytes, cells);
        } else {
          // Transposed: one run of `cells` elements per embedding row.
          uint32_t elementBytes = 0, embd = 0;
          if (!c.Read(&elementBytes) || !c.Read(&embd)) return invalid(truncated);
          if (embd == 0) return invalid("layer " + str(layer) + "'s V has no rows");
          bad = rows("V", layer, uint64_t{elementBytes} * cells, embd);
        }
        if (!bad.empty()) return invalid(bad);
      }
    }
    if (cache == 0 && shape.tokens > 0 && cellsSeen == 0) {
      return invalid("the header lists " + str(shape.tokens) + " tokens; the state holds no cells");
    }
  }
  if (c.Left() != 0) return invalid(str(c.Left()) + " bytes follow the end of the state");
  return StateCheck::kValid;
}

}  // namespace

StateCheck CheckSequenceState(const uint8_t* data, uint64_t size, const SequenceStateShape& shape,
                              const std::function<bool(const uint8_t*, size_t)>& admit, std::string* reason) {
  if (!shape.known) return StateCheck::kValid;
  // The model's public description does not say whether its caches keep V rows, nor (for sure)
  // whether a sliding-window cache follows the first; the walk tries each reading, the likeliest
  // first. Positions and cell counts are read the same way by all of them.
  const int firstCaches = shape.swaFirst ? 2 : 1;
  StateCheck first = StateCheck::kValid;
  for (int caches : {firstCaches, 3 - firstCaches}) {
    for (bool withV : {true, false}) {
      StateCursor cursor(data, size, admit);
      std::string why;
      const StateCheck check = WalkState(cursor, shape, caches, withV, &why);
      if (cursor.Unverified()) return StateCheck::kUnverified;
      if (check == StateCheck::kValid) return check;
      if (first == StateCheck::kValid) {
        first = check;
        *reason = why;
      }
    }
  }
  return first;
}

namespace {

// The gate of the imports running on this thread (a libuv worker runs one import at a time).
thread_local StateReadGate* currentGate = nullptr;

#if defined(__x86_64__)
// Copies verified state bytes into the KV cache with non-temporal stores: the lines are written
// without first being read into the cache (a normal store reads each destination line from
// memory first), and the copy does not evict the bounce buffers. Measured with interleaved
// restores of a 24.6 MB state: median 4.8-5.4 ms against 5.3-5.6 ms with memcpy. FlushWork
// fences each chunk's stores before it counts the chunk done.
void CopyToMemory(uint8_t* dst, const uint8_t* src, size_t size) {
  if (size < 256) {
    std::memcpy(dst, src, size);
    return;
  }
  const size_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
  std::memcpy(dst, src, head);
  dst += head, src += head, size -= head;
  for (; size >= 64; dst += 64, src += 64, size -= 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), d);
  }
  std::memcpy(dst, src, size);
}
void FenceCopies() { _mm_sfence(); }
#else
void CopyToMemory(uint8_t* dst, const uint8_t* src, size_t size) { std::memcpy(dst, src, size); }
void FenceCopies() {}
#endif

}  // namespace

StateReadGate::StateReadGate(int fd, uint8_t* buffer, uint64_t length, uint64_t chunkBytes, const std::vector<uint8_t>& digests,
                             DigestScheme scheme, HelperThread& reader, bool readAhead)
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
  reader_.AvoidCpu(sched_getcpu());  // not queued behind this thread on its CPU (HelperThread.h)
  readerStarted_ = reader_.Start([this, readAhead]() {
    // Runs of up to kRunChunks unclaimed chunks, one pread each: fewer system calls than one per
    // chunk, and still small enough to stay in the CPU cache until they are hashed. Until llama.cpp
    // has read every header and starts the flush, this is the helper's only work.
    constexpr uint64_t kRunChunks = 16;
    for (uint64_t index = readAhead ? 0 : chunks_; index < chunks_ && !stop_.load(std::memory_order_relaxed) && !failed_.load() &&
                             !flushing_.load(std::memory_order_relaxed);) {
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
    // Then share the flush: llama.cpp's thread is reading the last headers, and the flush starts
    // within a millisecond or so of the read-ahead's end.
    for (int spins = 0; !flushing_.load(std::memory_order_acquire) && !stop_.load(std::memory_order_relaxed) && !failed_.load();
         ++spins) {
      if (spins % 256 == 255) std::this_thread::yield();
      else CpuRelax();
    }
    if (flushing_.load(std::memory_order_acquire)) FlushWork();
  });
  currentGate = this;
}

StateReadGate::~StateReadGate() {
  currentGate = previous_;
  stop_ = true;
  if (readerStarted_) reader_.Wait();
}

bool StateReadGate::ReadRange(uint64_t begin, uint64_t end, uint8_t* into) {
  for (uint64_t done = begin; done < end;) {
    const ssize_t got = ::pread(fd_, into + (done - begin), static_cast<size_t>(end - done), static_cast<off_t>(done));
    if (got > 0) {
      done += static_cast<uint64_t>(got);
    } else if (got < 0 && errno == EINTR) {
      continue;
    } else {
      readErrno_ = got < 0 ? errno : -1;
      return false;
    }
  }
  return true;
}

void StateReadGate::ReadAndCheck(uint64_t first, uint64_t count) {
  const uint64_t begin = first * chunkBytes_, end = std::min(length_, (first + count) * chunkBytes_);
  const bool readable = ReadRange(begin, end, buffer_ + begin);
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

bool StateReadGate::FlushReads(const kvstash_tensor_read* reads, size_t count) {
  consulted_ = true;
  uint64_t firstByte = length_, endByte = 0;
  for (size_t i = 0; i < count; ++i) {
    const uint8_t* src = static_cast<const uint8_t*>(reads[i].src);
    if (reads[i].dst == nullptr || src < buffer_ || src > buffer_ + length_ ||
        reads[i].size > length_ - static_cast<uint64_t>(src - buffer_)) {
      return false;
    }
    const uint64_t begin = static_cast<uint64_t>(src - buffer_);
    if (begin < endByte) return false;  // not in buffer order: let llama.cpp copy them
    if (reads[i].size == 0) continue;
    firstByte = std::min(firstByte, begin);
    endByte = begin + reads[i].size;
  }
  // An import whose parse already failed copies nothing: it is failed as a whole.
  if (failed_.load() || endByte == 0) return true;
  flushReads_ = reads;
  flushCount_ = count;
  const uint64_t firstChunk = firstByte / chunkBytes_;
  flushEnd_ = (endByte - 1) / chunkBytes_ + 1;
  flushNext_.store(firstChunk);
  flushDone_.store(0);
  flushing_.store(true, std::memory_order_release);
  FlushWork();
  // No copy into the KV cache may still run when the import returns: wait for the helper's chunk.
  for (int spins = 0; flushDone_.load(std::memory_order_acquire) < flushEnd_ - firstChunk; ++spins) {
    if (spins % 256 == 255) std::this_thread::yield();
    else CpuRelax();
  }
  return true;
}

void StateReadGate::FlushWork() {
  for (uint64_t index = flushNext_++; index < flushEnd_; index = flushNext_++) {
    // After a failure the remaining chunks are only counted, so that the wait above ends.
    if (!failed_.load()) FlushChunk(index);
    FenceCopies();  // non-temporal stores are ordered only by a fence on their own thread
    flushDone_.fetch_add(1, std::memory_order_release);
  }
}

void StateReadGate::FlushChunk(uint64_t index) {
  const uint64_t begin = index * chunkBytes_, end = std::min(length_, begin + chunkBytes_);
  // One per thread, reused: small enough to stay in the CPU cache between the read and the copy.
  thread_local ScratchBuffer bounce;
  const uint8_t* verified = nullptr;
  bool bounced = false;
  uint8_t expected = kUnchecked;
  if (end - begin <= kMaxBounceBytes && states_[index].compare_exchange_strong(expected, kChecking)) {
    uint8_t* into = nullptr;
    try {
      into = bounce.Reserve(static_cast<size_t>(end - begin));
    } catch (const std::bad_alloc&) {
      ReadAndCheck(index, 1);  // claimed: check it in the buffer instead
    }
    if (into != nullptr) {
      const ByteSpan chunk{into, static_cast<size_t>(end - begin)};
      if (!ReadRange(begin, end, into) ||
          ChunkDigest(&chunk, 1, 0, chunk.size, index, scheme_) != LoadDigest(digests_.data(), index)) {
        failed_ = true;
        states_[index].store(kFailed, std::memory_order_release);
        return;
      }
      verified = into;
      bounced = true;
      ++bounced_;
    }
  }
  if (!bounced) {
    if (!Resolve(index)) return;  // failed_ is set
    verified = buffer_ + begin;
  }
  // The reads are in buffer order: skip those that end before this chunk, copy the overlaps.
  auto offsetOf = [this](const kvstash_tensor_read& read) { return static_cast<uint64_t>(static_cast<const uint8_t*>(read.src) - buffer_); };
  const kvstash_tensor_read* read = std::partition_point(
      flushReads_, flushReads_ + flushCount_, [&](const kvstash_tensor_read& r) { return offsetOf(r) + r.size <= begin; });
  for (; read != flushReads_ + flushCount_ && offsetOf(*read) < end; ++read) {
    const uint64_t readBegin = offsetOf(*read);
    const uint64_t from = std::max(begin, readBegin), to = std::min(end, readBegin + read->size);
    if (from < to) CopyToMemory(static_cast<uint8_t*>(read->dst) + (from - readBegin), verified + (from - begin), to - from);
  }
  // Verified; its bytes are now in the KV cache and not in the buffer, which nothing reads after
  // the flush.
  if (bounced) states_[index].store(kVerified, std::memory_order_release);
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
  return Verify(data, size);
}

bool StateReadGate::Verify(const uint8_t* data, size_t size) {
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

// Both declared weak in kvstash's edits of llama.cpp's state reader (scripts/fetch-llama.js).
extern "C" bool kvstash_state_read_tensors(const kvstash_tensor_read* reads, size_t count) {
  kvstash::StateReadGate* gate = kvstash::currentGate;
  return gate != nullptr && gate->FlushReads(reads, count);
}

extern "C" bool kvstash_state_read_gate(const void* data, size_t size) {
  kvstash::StateReadGate* gate = kvstash::currentGate;
  return gate == nullptr || gate->Admit(static_cast<const uint8_t*>(data), size);
}
