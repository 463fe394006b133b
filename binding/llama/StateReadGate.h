// Reads, verifies and hands state bytes to llama.cpp in one pipeline, and holds llama.cpp back from
// any byte not yet verified.
//
// Reading an entry, checking every chunk and then calling llama_state_seq_set_data costs three
// passes over 25 MB, one after the other. kvstash's edit of llama.cpp (scripts/fetch-llama.js)
// makes its state reader ask kvstash_state_read_gate() before it reads or copies any range; a
// StateReadGate answers for the imports on its thread. A helper thread (the context's, parked
// between restores: HelperThread says why) reads the file chunk by chunk into the import buffer
// and checks each chunk there, from the front, while llama.cpp imports the chunks already checked.
// A range whose chunks nobody has started on is read and checked on the spot, on llama.cpp's
// thread. When llama.cpp's thread reaches a chunk the helper is still working on, it reads and
// checks the next unclaimed chunk ahead instead of waiting, so the two threads share the work.
// The on-the-spot work matters because llama.cpp first reads small fields spread over the whole
// state (each layer's type and row size) and copies the bulk only afterwards.
//
// llama.cpp defers the bulk copies (the K and V rows) to the end and hands them all to FlushReads
// (the second hook, kvstash_state_read_tensors). There both threads take chunks in turn: a chunk
// already in the buffer is copied from it; a chunk nobody has read is read into a small per-thread
// bounce buffer, checked there and copied into the KV cache from it. The bounce buffer stays in
// the CPU cache, so those bytes cross main memory twice (file in, KV cache out) instead of four
// times (file into the buffer, buffer through the hash, buffer out, KV cache in).
//
// What is hashed is always the copy that is then used, after it left the file: a file changed
// meanwhile cannot slip bytes past the check. A chunk that fails stops llama.cpp before it reads a
// byte of it and is never copied into the KV cache (the import fails); the caller clears what the
// import had added.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/Checksum.h"
#include "common/HelperThread.h"

extern "C" bool kvstash_state_read_gate(const void* data, size_t size);
// The same struct as in kvstash's edit of llama.cpp (scripts/fetch-llama.js): one deferred copy of
// `size` state bytes at `src` into host memory at `dst` (null: not host memory).
struct kvstash_tensor_read {
  const void* src;
  void* dst;
  size_t size;
};
extern "C" bool kvstash_state_read_tensors(const kvstash_tensor_read* reads, size_t count);

namespace kvstash {

// What llama_state_seq_get_data bytes must look like to be imported into one sequence of a context
// (in the pinned llama.cpp: llama_context::state_seq_get_data's magic and source sequence, then
// llama_kv_cache::state_write for each cache: the stream count;
// per stream, the cell count, each cell's position, sequence ids and optional extension, then each
// layer's K and V rows). llama.cpp sizes allocations by the state's own cell count before it
// compares anything with the context, and trusts the positions; the checksums only prove that the
// bytes are the ones written, not that the writer told the truth.
struct SequenceStateShape {
  bool known = false;           // false: a memory whose layout this check does not parse (recurrent, hybrid)
  uint32_t streams = 1;         // n_stream: 1 with a unified KV cache, else the context's sequences
  uint32_t cellsPerStream = 0;  // cells a stream holds: the context size per sequence
  int32_t tokens = -1;          // the header's token count (positions exactly [0, tokens)), or -1: unknown
  uint32_t cellExtBytes = 0;    // sizeof(llama_kv_cell_ext) when the model keeps it (M-RoPE, PLE), else 0
  uint32_t maxLayers = 0;       // the model's layer count: no cache holds more
  bool swaFirst = false;        // the model has sliding-window layers: try two caches (base, SWA) first
  bool prefixed = true;         // starts with state_seq_get_data's magic and source sequence (a state
                                // file's bytes after its tokens do not)
};

// kInvalid: the bytes contradict themselves, the model or their header (a lie: corrupt).
// kMismatch: a consistent state that does not fit this context (more cells than it holds, another
// stream count): made for another context, not damaged.
enum class StateCheck { kValid, kInvalid, kMismatch, kUnverified };

// Walks the structure of the `size` state bytes at `data` without reading any bulk row, asking
// `admit` before each field it reads (false: those bytes failed their checksum: kUnverified). On
// kInvalid and kMismatch, `reason` says what is wrong.
StateCheck CheckSequenceState(const uint8_t* data, uint64_t size, const SequenceStateShape& shape,
                              const std::function<bool(const uint8_t*, size_t)>& admit, std::string* reason);

class StateReadGate {
 public:
  // Starts reading bytes [0, length) of `fd` into `buffer` and checking them in chunks of
  // `chunkBytes` against `digests` (8 bytes, little-endian, per chunk, as ChunkDigest() with
  // `scheme`: the entry format's digest table), and becomes the gate of the calling thread's state
  // reads until it is destroyed.
  // `readAhead` false keeps the helper out until the flush (so every bulk chunk takes the bounce
  // path: the tests use it to reach that path on small states).
  StateReadGate(int fd, uint8_t* buffer, uint64_t length, uint64_t chunkBytes, const std::vector<uint8_t>& digests,
                DigestScheme scheme, HelperThread& reader, bool readAhead = true);
  ~StateReadGate();
  StateReadGate(const StateReadGate&) = delete;
  StateReadGate& operator=(const StateReadGate&) = delete;

  // Reads and checks what is left (helping the other thread) and waits for the rest; true when
  // every chunk was read and matched its digest.
  bool AllVerified();
  // Returns once [data, data + size) is verified; false when a chunk it covers failed. Bytes
  // outside the buffer are not this gate's: they pass.
  bool Admit(const uint8_t* data, size_t size);
  // Admit() for kvstash's own reads (CheckSequenceState): it does not count as llama.cpp asking.
  bool Verify(const uint8_t* data, size_t size);
  // Does llama.cpp's deferred copies (in buffer order) from verified bytes only, on this thread
  // and the helper; true when it took them (the import then fails if a chunk failed). False, and
  // nothing done, when they are not all from the buffer into host memory: llama.cpp then copies
  // them itself, each through Admit().
  bool FlushReads(const kvstash_tensor_read* reads, size_t count);
  // Whether llama.cpp asked the gate at all (a tree without kvstash's edit never does).
  bool Consulted() const { return consulted_; }
  // How many chunks the flush read straight from the file through a bounce buffer.
  uint64_t BouncedChunks() const { return bounced_.load(); }
  // Why a chunk failed: empty for a checksum mismatch, else the read error.
  std::string ReadError() const;

 private:
  enum State : uint8_t { kUnchecked, kChecking, kVerified, kFailed };
  // Makes chunk `index` verified or failed (reading and checking it here, or waiting for the
  // thread that does); true when it is verified.
  bool Resolve(uint64_t index);
  // Claims, reads and checks the first unclaimed chunk of the few after `index`; false if none.
  bool ClaimAhead(uint64_t index);
  static constexpr uint64_t kClaimAheadChunks = 32;
  // Reads chunks [first, first + count), claimed by the caller, and marks each verified or failed.
  void ReadAndCheck(uint64_t first, uint64_t count);
  // Reads [begin, end) of the file into `into`; false (readErrno_ set) when it cannot.
  bool ReadRange(uint64_t begin, uint64_t end, uint8_t* into);
  // Takes chunks of the flush until none is left or one failed (both threads run it).
  void FlushWork();
  // Copies the parts of the flush's reads that lie in chunk `index`, verified first.
  void FlushChunk(uint64_t index);
  // Chunks larger than this are not bounced (format 1's single chunk): they go through the buffer.
  static constexpr uint64_t kMaxBounceBytes = 1 << 20;

  int fd_;
  uint8_t* buffer_;
  uint64_t length_, chunkBytes_, chunks_;
  const std::vector<uint8_t>& digests_;
  DigestScheme scheme_;
  std::unique_ptr<std::atomic<uint8_t>[]> states_;
  std::atomic<bool> failed_{false}, stop_{false};
  std::atomic<int> readErrno_{0};  // 0: none; -1: the file ended early
  bool consulted_ = false;         // only the importing thread touches it
  // The flush: its reads (sorted by source), the next chunk to take, the chunks finished.
  const kvstash_tensor_read* flushReads_ = nullptr;
  size_t flushCount_ = 0;
  uint64_t flushEnd_ = 0;
  std::atomic<uint64_t> flushNext_{0}, flushDone_{0}, bounced_{0};
  std::atomic<bool> flushing_{false};
  StateReadGate* previous_;
  HelperThread& reader_;
  bool readerStarted_ = false;
};

}  // namespace kvstash
