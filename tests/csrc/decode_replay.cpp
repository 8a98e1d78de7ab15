// Replays the decode kernel's walk (sk_decode::walk_task, the code the GPU runs) on the host over a
// prepared layout, with a model of the warp's cp.async ring that refuses every read the GPU could
// get wrong: a byte of a chunk whose copy has not been waited for, a slot whose copy is still in
// flight or already holds a later chunk, a byte past the task's stream. Every lane's registers are
// built with the kernel's own functions (csrc/cuda/decode_layout.cuh) from the modelled ring.
//
// Top-K blocks go through the kernel's three phases (zero the warp's tile, scatter, load), each
// run for all 32 lanes before the next, as the warp barriers between them order them on the GPU;
// two lanes storing to one tile address is an error. Before the tasks, the split-K reduction's
// plan (decode_layout.cuh) is checked for every token count and up to 64 segments: each float4
// of every segment read exactly once, by a lane of the butterfly group that stores it, one store
// per float4.
//
// The split-K handshake (sk_decode::arrive): `decode_replay handshake` runs launches over one
// block-row's word (a row's tasks are alike to it, so their order does not matter) and prints
// per case "handshake <segments> <arrivals of a launch that stopped part-way> <arrival of the
// next launch at which `last` fired> <count it left> <arrival at which a replay of that launch
// with the same tag fired>": every launch must reduce at its own last arrival, and only then,
// whatever the stopped one left behind.
//
// usage: decode_replay STREAM TASKS CODES TOPK   (raw files: uint8 stream, int32 [n, 8] tasks,
//        int32 codes). stdout, per multiplied block: "block <task> <index> <tier> <offset>", then
//        32 lines "<lane> <r0> <r1> <r2> <r3>" (2:4: a0 a1 meta 0); once at the end, 32 lines
//        "s24_b <lane> <source lane reg 0> <source lane reg 1> <source word>".
// Exit status 1 with a message on stderr at the first illegal read or unfinished task.
#include "cuda/decode_layout.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

using namespace sk_decode;

namespace {

constexpr int kLanes = 32;
constexpr int kInFlight = -2;  // slot state: a copy into it has been issued, not waited for

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "decode_replay: %s\n", message.c_str());
  std::exit(1);
}

std::vector<uint8_t> read_file(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(std::string("cannot read ") + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

template <typename T> std::vector<T> as_words(const std::vector<uint8_t>& bytes) {
  std::vector<T> words(bytes.size() / sizeof(T));
  std::memcpy(words.data(), bytes.data(), words.size() * sizeof(T));
  return words;
}

// A warp's ring as the GPU sees it: slot s holds chunk slot_chunk[s] once that chunk's group has
// been waited for. Reads take stream offsets, as in the kernel.
struct ModelRing {
  const uint8_t* stream = nullptr;  // the task's first byte
  int length = 0;
  std::vector<uint8_t> bytes = std::vector<uint8_t>(kRingBytes);
  int slot_chunk[kRingChunks];

  void check(int off, int size) const {
    if (off < 0 || off + size > length)
      fail("read of bytes " + std::to_string(off) + ".." + std::to_string(off + size) +
           " past the task's stream of " + std::to_string(length));
    const int chunk = off / kChunkBytes, held = slot_chunk[chunk % kRingChunks];
    if ((off + size - 1) / kChunkBytes != chunk) fail("a read straddles two chunks");
    if (held != chunk)
      fail("read of chunk " + std::to_string(chunk) + " from a slot " +
           (held == kInFlight ? std::string("whose copy is in flight")
                              : "holding chunk " + std::to_string(held)));
  }
  template <typename W> W load(int off) const {
    check(off, sizeof(W));
    W w;
    std::memcpy(&w, bytes.data() + ring_offset(off), sizeof(W));
    return w;
  }
  Words4 load16(int off) const { return load<Words4>(off); }
  Words2 load8(int off) const { return load<Words2>(off); }
  uint32_t load4(int off) const { return load<uint32_t>(off); }
  uint32_t load2(int off) const { return load<uint16_t>(off); }
  uint32_t load1(int off) const { return load<uint8_t>(off); }
};

// The warp's top-K tile: every store and load checked against the tile's bounds, and a scatter
// that writes one address twice is refused.
struct ModelTile {
  std::vector<uint8_t> bytes = std::vector<uint8_t>(kTileBytes);
  std::vector<int> writer = std::vector<int>(kTileBytes, -1);  // lane that stored a byte this block

  void check(int off, int size) const {
    if (off < 0 || off + size > kTileBytes || off % size)
      fail("tile access at byte " + std::to_string(off) + " of size " + std::to_string(size));
  }
  void store16(int off, Words4 v) {
    check(off, 16);
    std::memcpy(bytes.data() + off, &v, 16);
  }
  void store2(int off, uint32_t v) {
    check(off, 2);
    if (writer[off] >= 0) fail("two top-K values stored to tile byte " + std::to_string(off));
    writer[off] = 1;
    const uint16_t h = static_cast<uint16_t>(v);
    std::memcpy(bytes.data() + off, &h, 2);
  }
  Words4 load16(int off) const {
    check(off, 16);
    Words4 v;
    std::memcpy(&v, bytes.data() + off, 16);
    return v;
  }
};

// The Warp of sk_decode::walk_task: cp.async groups complete, in order, only at wait_oldest().
struct ReplayWarp {
  const Task& task;
  const std::vector<uint32_t>& codes;
  int topk, task_id;
  ModelRing ring;
  ModelTile tile;
  std::vector<std::vector<int>> groups;  // committed groups not yet waited for
  std::vector<int> open;                 // copies issued since the last commit
  uint32_t window_words[kLanes] = {};
  int code_window = -1;
  int multiplied = 0;

  ReplayWarp(const Task& t, const std::vector<uint8_t>& stream,
             const std::vector<uint32_t>& c, int k, int id)
      : task(t), codes(c), topk(k), task_id(id) {
    const size_t first = size_t(t.stream16) * 16, length = size_t(t.length16) * 16;
    if (first + length > stream.size()) fail("task " + std::to_string(id) + " runs past the stream");
    ring.stream = stream.data() + first;
    ring.length = static_cast<int>(length);
    for (int& s : ring.slot_chunk) s = -1;
  }

  void copy_chunk(int c) {
    int& slot = ring.slot_chunk[c % kRingChunks];
    if (slot == kInFlight) fail("chunk " + std::to_string(c) + " copied into a busy slot");
    slot = kInFlight;  // from now on the slot's old bytes may be overwritten at any moment
    open.push_back(c);
  }
  void commit() {
    groups.push_back(open);
    open.clear();
  }
  void wait_oldest() {  // cp.async.wait_group kRingChunks - 2
    while (groups.size() > size_t(kRingChunks - 2)) {
      for (int c : groups.front()) {
        const int begin = c * kChunkBytes, end = std::min(begin + kChunkBytes, ring.length);
        std::memcpy(ring.bytes.data() + ring_offset(begin), ring.stream + begin, end - begin);
        ring.slot_chunk[c % kRingChunks] = c;
      }
      groups.erase(groups.begin());
    }
  }
  void release() {}

  int tier(int block) {  // the kernel's window of 32 code words, one per lane, then a shuffle
    const int window = block / kCodeWindow;
    if (window != code_window) {
      code_window = window;
      for (int lane = 0; lane < kLanes; ++lane) {
        const int word = window * 32 + lane;
        const bool inside = word * kCodesPerWord < task.n_blocks;
        if (inside && size_t(task.code_word + word) >= codes.size()) fail("code word out of range");
        window_words[lane] = inside ? codes[task.code_word + word] : 0u;
      }
    }
    return tier_of(window_words[(block / kCodesPerWord) % 32], block);
  }

  void multiply(int tier, int block, int offset) {
    if (block != multiplied) fail("blocks multiplied out of order");
    ++multiplied;
    std::printf("block %d %d %d %d\n", task_id, block, tier, offset);
    uint32_t r[kLanes][4] = {};
    if (tier == kTierTopk) {  // phase by phase, every lane, as the warp barriers order them
      std::fill(tile.writer.begin(), tile.writer.end(), -1);
      for (int lane = 0; lane < kLanes; ++lane) topk_zero(tile, lane);
      for (int lane = 0; lane < kLanes; ++lane) topk_scatter(ring, tile, offset, topk, lane);
      for (int lane = 0; lane < kLanes; ++lane) topk_load(tile, lane, r[lane]);
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      if (tier == kTierS24) {
        uint32_t a[2];
        s24_registers(ring, offset, lane, a, r[lane][2]);
        r[lane][0] = a[0];
        r[lane][1] = a[1];
      } else if (tier == kTierDense) {
        dense_registers(ring, offset, lane, r[lane]);
      }
      std::printf("%d %u %u %u %u\n", lane, r[lane][0], r[lane][1], r[lane][2], r[lane][3]);
    }
  }
};

}  // namespace

// The reduction plan for `rows` tokens and `segments` tasks in a row: which lane reads what.
void check_reduction(int rows, int segments) {
  const int groups = rows * 16 / 4, spread = reduce_spread(groups);
  if (spread < 1 || 32 % spread || (spread > 1 && spread * groups > 32))
    fail("reduce_spread(" + std::to_string(groups) + ") = " + std::to_string(spread));
  std::vector<int> reads(size_t(groups) * segments, 0), stores(groups, 0);
  for (int q0 = 0; q0 < groups; q0 += 32 / spread)
    for (int lane = 0; lane < kLanes; ++lane) {
      const int q = reduce_group(q0, lane, spread);
      if (q >= groups) continue;
      for (int peer = 0; peer < spread; ++peer)  // the butterfly's partners share q
        if (reduce_group(q0, lane ^ peer, spread) != q) fail("a butterfly mixes two float4s");
      const auto load = [&](int seg, int group) {
        if (group != q || seg < 0 || seg >= segments) fail("reduction reads outside its float4");
        ++reads[size_t(group) * segments + seg];
        return Floats4{1.f, 1.f, 1.f, 1.f};
      };
      lane_partial_sum(load, q, lane, spread, segments);
      stores[q] += reduce_stores(lane, spread);
    }
  for (int r : reads)
    if (r != 1) fail("reduction of " + std::to_string(rows) + " rows, " +
                     std::to_string(segments) + " segments reads a partial " +
                     std::to_string(r) + " times");
  for (int st : stores)
    if (st != 1) fail("reduction stores a float4 " + std::to_string(st) + " times");
}

// One launch with `tag` over a row of `segments` tasks of which only `arrivals` reach the
// handshake; returns the 1-based arrival at which `last` fired (0: none).
int launch(uint64_t& word, uint32_t tag, int segments, int arrivals) {
  int fired = 0;
  for (int a = 1; a <= arrivals; ++a) {
    const Arrival arrival = arrive(word, tag, segments);
    word = arrival.word;
    if (arrival.last) {
      if (fired) fail("two tasks of one launch were last");
      fired = a;
    }
  }
  return fired;
}

void replay_handshake() {
  uint32_t tag = 7;
  for (int segments = 2; segments <= 64; ++segments)
    for (int stopped = 0; stopped < segments; ++stopped) {
      uint64_t word = 0;
      if (launch(word, tag++, segments, segments) != segments) fail("a full launch");
      launch(word, tag++, segments, stopped);  // stops part-way
      const int fired = launch(word, tag++, segments, segments);
      const int replay = launch(word, tag - 1, segments, segments);  // a graph replay: same tag
      std::printf("handshake %d %d %d %u %d\n", segments, stopped, fired,
                  static_cast<uint32_t>(word), replay);
    }
}

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "handshake") == 0) {
    replay_handshake();
    return 0;
  }
  if (argc != 5) fail("usage: decode_replay STREAM TASKS CODES TOPK | handshake");
  for (int rows = 1; rows <= kMaxTokens; ++rows)
    for (int segments = 1; segments <= 64; ++segments) check_reduction(rows, segments);
  const std::vector<uint8_t> stream = read_file(argv[1]);
  const std::vector<int32_t> task_words = as_words<int32_t>(read_file(argv[2]));
  const std::vector<uint32_t> codes = as_words<uint32_t>(read_file(argv[3]));
  const int topk = std::atoi(argv[4]);
  if (task_words.size() % 8) fail("tasks must be [n, 8] int32");
  for (size_t id = 0; id < task_words.size() / 8; ++id) {
    Task task;
    std::memcpy(&task, task_words.data() + 8 * id, sizeof(Task));
    ReplayWarp warp(task, stream, codes, topk, static_cast<int>(id));
    walk_task(warp, task, topk);
    if (warp.multiplied != task.n_blocks)
      fail("task " + std::to_string(id) + " multiplied " + std::to_string(warp.multiplied) +
           " of its " + std::to_string(task.n_blocks) + " blocks");
    if (!warp.open.empty()) fail("copies issued after the last commit");
  }
  for (int lane = 0; lane < kLanes; ++lane)
    std::printf("s24_b %d %d %d %d\n", lane, s24_b_source_lane(lane, 0),
                s24_b_source_lane(lane, 1), s24_b_source_word(lane));
  return 0;
}
