// kvarn_cuda_bench: times the CUDA KV-cache kernels on the GPU it runs on and writes one CSV row per measurement.
//   copy      device-to-device cudaMemcpy of 2 GiB: the bandwidth ceiling (bytes read + bytes written)
//   decode    decode_attention per (model shape, cache dtype, batch, context): time per call in a CUDA graph of 32
//             or more back-to-back calls (as one decode step calls it once per layer, launch latency hidden) at
//             the rate the GPU sustains (median_ms: after 0.5 s of the same work, under its power cap), the bytes
//             the attention must read and write (tiles, tails, q, out, block tables and sequence views; not the
//             split-K partials, the kernels' own intermediate), useful TFLOP/s; the full run adds our fp16
//             kernel's rows without overlap (decode_no_overlap), which PyTorch's SDPA, timed the same way, lacks
//   flush     flush_full_tiles of N full tails in each of L layers of the Llama-3-8B shape, one call: tiles per
//             second (L = 32: a step's flush of N sequences)
//   linear    the linear layers of one Llama-3-8B decode step at batch 128 with cuBLAS (fp16 weights, fp32
//             accumulation): the rest of a step that the flush's share is taken against
//   prefill   prefill_attention of one chunk of N tokens after a prefix of P cached tokens (whole tiles): useful
//             TFLOP/s, 4 * q_heads * D * (N^2 / 2 + N * P) as sdpa_bench.py counts the causal chunk (splits = P)
//   dequantize  dequantize_prefix_tiles of that prefix (code-tile dtypes), the part of such a prefill call that
//             decodes it: bytes = packed tiles read + fp16 tiles written (context = P)
// Every row ends with the wall-clock bounds of its timed window (window_begin, window_end: seconds since the epoch),
// which bench/report.py matches with a log of the SM clock.
// Sequences hold context/G - 1 full tiles plus a tail of G/2 tokens (context - G/2 tokens), or in the ragged and
// one-long rows a share of that, their blocks in a shuffled order; when one batch's cache is small, several copies
// are rotated so that L2 cannot serve it.
// Usage: kvarn_cuda_bench [--csv FILE] [--quick] [--decode-only | --flush-only | --prefill-only] [--batches 8,32]
//                         [--contexts 8192,32768] [--shapes qwen3-32b] [--dtypes kvarn_k4v2_g128]
//                         [--tiles-per-split 16,32] [--tile-heads 8,16] [--ragged | --one-long] [--no-overlap]
//                         [--after-append]
//   --decode-only: only the copy and the decode rows; --flush-only / --prefill-only: only the flush / prefill rows;
//   --batches, --contexts, --shapes (llama3-8b, qwen3-32b; or qwen3-235b), --dtypes (of the decode rows; default
//   kvarn_k4v2_g128,fp16): only these; --tiles-per-split: each decode row once per split size, 0 being the planner's
//   choice (to time its alternatives); --tile-heads: likewise the q heads one read of a tile serves
//   (plan_decode_attention; rows of groups past 8, and rows that read a tile for part of the group, show it after their
//   splits, "8x32 16/read", "2x4 4/read"); --ragged / --one-long: the decode rows' lengths (Lengths below), ragged as
//   the full run's last decode rows are; --no-overlap: the decode rows' calls do not overlap (a call's attention starts
//   once the call before has ended; see bench_decode); --after-append: each decode call comes after an append_to_tails
//   of one K/V row per sequence, which it overlaps, as in a decode step (kinds decode_after_append, ...: the time and
//   bytes of both).
#include "backend/cuda/append_to_tails.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/decode_attention.h"
#include "backend/cuda/dequantize_prefix.h"
#include "backend/cuda/flush_full_tiles.h"
#include "backend/cuda/kv_layout.h"
#include "backend/cuda/prefill_attention.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kvarn::cuda {
namespace {

// Every 16-bit word becomes a finite fp16 number of magnitude in [0.5, 1): valid scales, arbitrary codes.
__global__ void fill_plausible_kernel(uint16_t* data, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32) * 40503u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    data[i] = static_cast<uint16_t>((h & 0x83ffu) | 0x3800u);
  }
}

void fill_plausible(void* data, size_t bytes, uint32_t seed) {
  fill_plausible_kernel<<<4096, 256>>>(static_cast<uint16_t*>(data), bytes / 2, seed);
  KVARN_CUDA_CHECK(cudaGetLastError());
}

// The H200 holds its 700 W cap by lowering the SM clock, to 1.2-1.9 GHz under our heavier rows (measured), within
// ~100 ms of heavy work, and recovers when idle: a short timing depends on what ran before it (the same decode row
// took 255-338 us in 12 runs in a row). So every measurement is of the rate the GPU sustains: fn runs back to back
// (the next call queued behind the running one, the GPU never idle) for kSustainMs, then each call is timed for
// another kSustainMs and at least `reps` calls; the median. The timed window's wall-clock bounds go into the CSV,
// so that a log of the SM clock (scripts/gpu-check.sh runs nvidia-smi beside the benchmark) can be matched to it.
constexpr double kSustainMs = 500;

struct Timing {
  double ms;                        // per call
  double window_begin, window_end;  // the timed calls, seconds since the epoch
};

double epoch_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

template <typename Fn>
Timing median_ms(int reps, Fn&& fn, cudaStream_t stream = nullptr) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point begin = Clock::now();
  auto ms_since_begin = [&] { return std::chrono::duration<double, std::milli>(Clock::now() - begin).count(); };
  cudaEvent_t start[2], stop[2];
  bool timed[2] = {false, false};
  for (int k = 0; k < 2; ++k) {
    KVARN_CUDA_CHECK(cudaEventCreate(&start[k]));
    KVARN_CUDA_CHECK(cudaEventCreate(&stop[k]));
  }
  std::vector<float> times;
  auto collect = [&](int k) {  // waits for call slot k and keeps its time if it was a timed call
    KVARN_CUDA_CHECK(cudaEventSynchronize(stop[k]));
    if (!timed[k]) return;
    float ms = 0;
    KVARN_CUDA_CHECK(cudaEventElapsedTime(&ms, start[k], stop[k]));
    times.push_back(ms);
  };
  double timing_since = -1, window_begin = 0;
  for (int i = 0;; ++i) {
    const int k = i % 2;
    if (i >= 2) collect(k);
    const double now = ms_since_begin();
    if (timing_since < 0 && i >= 3 && now >= kSustainMs) timing_since = now, window_begin = epoch_seconds();
    if (timing_since >= 0 && static_cast<int>(times.size()) >= reps && now - timing_since >= kSustainMs) {
      collect(1 - k);
      break;
    }
    KVARN_CUDA_CHECK(cudaEventRecord(start[k], stream));
    fn(i);
    KVARN_CUDA_CHECK(cudaEventRecord(stop[k], stream));
    timed[k] = timing_since >= 0;
  }
  for (int k = 0; k < 2; ++k) {
    KVARN_CUDA_CHECK(cudaEventDestroy(start[k]));
    KVARN_CUDA_CHECK(cudaEventDestroy(stop[k]));
  }
  std::sort(times.begin(), times.end());
  return {times[times.size() / 2], window_begin, epoch_seconds()};
}

// Per call: the median over replays (median_ms) of one CUDA graph of `calls` back-to-back fn(i, stream),
// i = 0..calls-1.
template <typename Fn>
Timing graph_median_ms(int calls, Fn&& fn) {
  cudaStream_t stream;
  KVARN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  fn(0, stream);
  KVARN_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  KVARN_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) fn(i, stream);
  KVARN_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  KVARN_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  Timing t = median_ms(10, [&](int) { KVARN_CUDA_CHECK(cudaGraphLaunch(exec, stream)); }, stream);
  KVARN_CUDA_CHECK(cudaGraphExecDestroy(exec));
  KVARN_CUDA_CHECK(cudaGraphDestroy(graph));
  KVARN_CUDA_CHECK(cudaStreamDestroy(stream));
  t.ms /= calls;
  return t;
}

// Rows of kColumns fields: the first ones given, the rest empty, then the timed window of `timing` (if any).
struct Csv {
  static constexpr const char* kHeader =
      "kind,shape,dtype,batch,context,time_us,bytes,GB_per_s,TFLOP_per_s,splits,window_begin,window_end";
  static constexpr int kColumns = 10;
  FILE* file = nullptr;
  void row(std::string line, const Timing* timing = nullptr) {
    for (auto fields = std::count(line.begin(), line.end(), ',') + 1; fields < kColumns; ++fields) line += ",";
    line += timing ? "," + std::to_string(timing->window_begin) + "," + std::to_string(timing->window_end) : ",,";
    print(line);
  }
  void header() { print(kHeader); }

 private:
  void print(const std::string& line) {
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
    if (file) std::fprintf(file, "%s\n", line.c_str()), std::fflush(file);
  }
};

double copy_bandwidth(Csv& csv) {
  const size_t bytes = size_t{2} << 30;
  void *a, *b;
  KVARN_CUDA_CHECK(cudaMalloc(&a, bytes));
  KVARN_CUDA_CHECK(cudaMalloc(&b, bytes));
  fill_plausible(a, bytes, 1);
  const Timing t =
      median_ms(10, [&](int) { KVARN_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  KVARN_CUDA_CHECK(cudaFree(a));
  KVARN_CUDA_CHECK(cudaFree(b));
  const double gbs = 2.0 * bytes / (t.ms * 1e-3) / 1e9;
  csv.row("copy,,,,," + std::to_string(t.ms * 1e3) + "," + std::to_string(2 * bytes) + "," + std::to_string(gbs), &t);
  return gbs;
}

struct Shape {
  const char* name;
  int q_heads, kv_heads, head_dim;
};
constexpr Shape kShapes[] = {{"llama3-8b", 32, 8, 128}, {"qwen3-32b", 64, 8, 128}};
// What --shapes may name: also qwen3-235b's attention, 16 q heads per kv head.
constexpr Shape kNamedShapes[] = {kShapes[0], kShapes[1], {"qwen3-235b", 64, 4, 128}};

// The sequences' lengths in a decode row: every one the row's context (uniform, kind "decode"); sequence s of the
// batch (s + 1) / batch of it (ragged, "decode_ragged": continuous batching leaves requests at every length up to
// the longest); or sequence 0 the context and the others 1K (one_long, "decode_one_long": a long request among
// short ones).
enum class Lengths { uniform, ragged, one_long };

// What a decode row needs beside its cache (tails, queries, split-K partials: < 100 MB at batch 128) and what the
// graph and cuBLAS keep: a row whose cache does not fit in the free memory less this is skipped.
constexpr size_t kDecodeHeadroom = size_t{2} << 30;

// How many copies of a call's data the calls rotate over, each read again only after all the others: enough that
// they span 512 MB, ten times the H200's 50 MB L2, up to 256 copies (which span 128 MB or more wherever that caps
// them). Until the twenty-third session at most 16: a batch 1 x 1K KVarN cache (0.8 MB) then rotated over 13 MB,
// which L2 holds.
int rotated_copies(size_t bytes_per_call) {
  return static_cast<int>(std::clamp<size_t>((size_t{512} << 20) / std::max<size_t>(bytes_per_call, 1) + 1, 1, 256));
}

// tiles_per_split, tile_heads: 0 for the planner's choice. overlap: each call's attention starts reading its tiles
// while the kernel before it runs, the call before's combine or the append
// (DecodeAttentionArgs::overlap_previous_kernel); false: it starts once that has ended. after_append: each call is
// an append_to_tails of one K/V row per sequence (over its tail's last row) and the attention.
void bench_decode(Csv& csv, const Shape& shape, const std::string& dtype_name, int batch, int context,
                  int tiles_per_split = 0, int tile_heads = 0, Lengths lengths = Lengths::uniform,
                  bool overlap = true, bool after_append = false) {
  const codec::CacheDtype dtype = codec::parse_cache_dtype(dtype_name);
  const int g = dtype.tile_tokens ? dtype.tile_tokens : 128, d = shape.head_dim, tail = g / 2;
  std::vector<int> seq_tiles(batch);
  for (int s = 0; s < batch; ++s) {
    long tokens = context;
    if (lengths == Lengths::ragged) tokens = static_cast<long>(context) * (s + 1) / batch;
    if (lengths == Lengths::one_long && s > 0) tokens = std::min(context, 1024);
    seq_tiles[s] = std::max(0, static_cast<int>(tokens / g) - 1);
  }
  const int max_tiles = *std::max_element(seq_tiles.begin(), seq_tiles.end());
  const long total_tiles = std::accumulate(seq_tiles.begin(), seq_tiles.end(), 0L);
  const KvCacheLayer probe = make_kv_cache_layer(dtype, d, g, shape.kv_heads, nullptr, nullptr);
  const size_t cache_bytes = probe.block_bytes() * total_tiles;
  const std::string kind = std::string(lengths == Lengths::ragged     ? "decode_ragged"
                                       : lengths == Lengths::one_long ? "decode_one_long"
                                                                      : "decode") +
                           (after_append ? "_after_append" : "") + (overlap ? "" : "_no_overlap");
  const std::string key = kind + "," + shape.name + "," + dtype_name + "," + std::to_string(batch) + "," +
                          std::to_string(context);
  size_t free_bytes, total_bytes;
  KVARN_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (cache_bytes + kDecodeHeadroom > free_bytes) {
    csv.row(key + ",skipped: " + std::to_string(cache_bytes >> 30) + " GiB of cache, " +
            std::to_string(free_bytes >> 30) + " GiB free");
    return;
  }
  // (Sequences shorter than a tile plus its tail have no tiles: their tails are replicated alone.)
  const int replicas = rotated_copies(cache_bytes + probe.tail_slot_elements() * 2 * batch);
  const long num_blocks = total_tiles * replicas;
  uint8_t* blocks;
  uint16_t *tails, *q, *out;
  KVARN_CUDA_CHECK(cudaMalloc(&blocks, probe.block_bytes() * std::max(num_blocks, 1L)));
  KVARN_CUDA_CHECK(cudaMalloc(&tails, probe.tail_slot_elements() * 2 * batch * replicas));
  KVARN_CUDA_CHECK(cudaMalloc(&q, sizeof(uint16_t) * batch * shape.q_heads * d));
  KVARN_CUDA_CHECK(cudaMalloc(&out, sizeof(uint16_t) * batch * shape.q_heads * d));
  fill_plausible(blocks, probe.block_bytes() * num_blocks, 2);
  fill_plausible(tails, probe.tail_slot_elements() * 2 * batch * replicas, 3);
  fill_plausible(q, sizeof(uint16_t) * batch * shape.q_heads * d, 4);

  std::mt19937 rng(5);
  std::vector<int32_t> order(std::max(num_blocks, 1L));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<SequenceKvView> views;
  int32_t table_offset = 0;
  for (int r = 0; r < replicas; ++r)
    for (int s = 0; s < batch; ++s) {
      views.push_back({table_offset, seq_tiles[s], tail, r * batch + s});
      table_offset += seq_tiles[s];
    }
  int32_t* tables;
  SequenceKvView* dviews;
  KVARN_CUDA_CHECK(cudaMalloc(&tables, sizeof(int32_t) * order.size()));
  KVARN_CUDA_CHECK(cudaMalloc(&dviews, sizeof(SequenceKvView) * views.size()));
  KVARN_CUDA_CHECK(cudaMemcpy(tables, order.data(), sizeof(int32_t) * order.size(), cudaMemcpyHostToDevice));
  KVARN_CUDA_CHECK(cudaMemcpy(dviews, views.data(), sizeof(SequenceKvView) * views.size(), cudaMemcpyHostToDevice));

  const KvCacheLayer layer = make_kv_cache_layer(dtype, d, g, shape.kv_heads, blocks, tails);
  const DecodeAttentionPlan plan =
      plan_decode_attention(layer, seq_tiles, shape.q_heads, tiles_per_split, tile_heads);
  void* workspace;
  KVARN_CUDA_CHECK(cudaMalloc(&workspace, plan.workspace_bytes));
  uint16_t *new_k, *new_v;  // the rows appended: [batch][kv_heads][D]
  TailAppendRow* new_rows;  // [replicas][batch]: each sequence's tail's last row
  const size_t row_elements = static_cast<size_t>(batch) * shape.kv_heads * d;
  KVARN_CUDA_CHECK(cudaMalloc(&new_k, sizeof(uint16_t) * row_elements));
  KVARN_CUDA_CHECK(cudaMalloc(&new_v, sizeof(uint16_t) * row_elements));
  fill_plausible(new_k, sizeof(uint16_t) * row_elements, 6);
  fill_plausible(new_v, sizeof(uint16_t) * row_elements, 7);
  std::vector<TailAppendRow> rows;
  for (int r = 0; r < replicas; ++r)
    for (int s = 0; s < batch; ++s) rows.push_back({r * batch + s, tail - 1});
  KVARN_CUDA_CHECK(cudaMalloc(&new_rows, sizeof(TailAppendRow) * rows.size()));
  KVARN_CUDA_CHECK(cudaMemcpy(new_rows, rows.data(), sizeof(TailAppendRow) * rows.size(), cudaMemcpyHostToDevice));
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // A multiple of the replicas, so that each is read again only after all the others, also across replays.
  const int calls = (32 + replicas - 1) / replicas * replicas;
  const Timing t = graph_median_ms(calls, [&](int i, cudaStream_t stream) {
    const int r = i % replicas;
    if (after_append) append_to_tails(layer, new_k, new_v, new_rows + r * batch, batch, stream);
    decode_attention(layer, {q, out, dviews + r * batch, tables, batch, shape.q_heads, scale, overlap}, plan,
                     workspace, stream);
  });
  const double bytes = static_cast<double>(cache_bytes) + 2.0 * batch * shape.kv_heads * tail * d * 2 +
                       2.0 * batch * shape.q_heads * d * 2 + 4.0 * total_tiles + sizeof(SequenceKvView) * batch +
                       (after_append ? 4.0 * row_elements * 2 : 0.0);
  const double flops = 4.0 * shape.q_heads * d * (static_cast<double>(total_tiles) * g + batch * tail);
  csv.row(key + "," + std::to_string(t.ms * 1e3) + "," + std::to_string(bytes) + "," +
              std::to_string(bytes / (t.ms * 1e-3) / 1e9) + "," + std::to_string(flops / (t.ms * 1e-3) / 1e12) + "," +
              std::to_string(plan.num_splits) + "x" + std::to_string(plan.tiles_per_split) +
              (plan.tile_heads != shape.q_heads / shape.kv_heads || shape.q_heads > 8 * shape.kv_heads
                   ? " " + std::to_string(plan.tile_heads) + "/read"
                   : ""),
          &t);
  for (void* p : {static_cast<void*>(blocks), static_cast<void*>(tails), static_cast<void*>(q), static_cast<void*>(out),
                  static_cast<void*>(tables), static_cast<void*>(dviews), workspace,
                  static_cast<void*>(new_k), static_cast<void*>(new_v), static_cast<void*>(new_rows)})
    KVARN_CUDA_CHECK(cudaFree(p));
}

// One call of flush_full_tiles: `jobs` full tails in each of `layers` layers (each its own tails and blocks), the
// calls rotating over copies so that L2 cannot serve the tails.
void bench_flush(Csv& csv, const std::string& dtype_name, int jobs, int layers) {
  const codec::CacheDtype dtype = codec::parse_cache_dtype(dtype_name);
  const int g = 128, d = 128, heads = 8;
  const KvCacheLayer probe = make_kv_cache_layer(dtype, d, g, heads, nullptr, nullptr);
  const size_t call_tail_bytes = probe.tail_slot_elements() * 2 * jobs * layers;
  const int replicas = rotated_copies(call_tail_bytes + probe.block_bytes() * jobs * layers);
  const int slots = jobs * replicas;
  std::vector<KvCacheLayer> views;
  std::vector<void*> buffers;
  for (int l = 0; l < layers; ++l) {
    uint8_t* blocks;
    uint16_t* tails;
    KVARN_CUDA_CHECK(cudaMalloc(&blocks, probe.block_bytes() * slots));
    KVARN_CUDA_CHECK(cudaMalloc(&tails, probe.tail_slot_elements() * 2 * slots));
    fill_plausible(tails, probe.tail_slot_elements() * 2 * slots, 6 + l);
    views.push_back(make_kv_cache_layer(dtype, d, g, heads, blocks, tails));
    buffers.push_back(blocks), buffers.push_back(tails);
  }
  std::vector<TileFlushJob> host;  // replica r: slots and blocks r * jobs ..
  for (int r = 0; r < replicas; ++r)
    for (int j = 0; j < jobs; ++j) host.push_back({r * jobs + j, r * jobs + jobs - 1 - j});
  TileFlushJob* dev;
  KVARN_CUDA_CHECK(cudaMalloc(&dev, sizeof(TileFlushJob) * host.size()));
  KVARN_CUDA_CHECK(cudaMemcpy(dev, host.data(), sizeof(TileFlushJob) * host.size(), cudaMemcpyHostToDevice));
  const Timing t = median_ms(10, [&](int i) { flush_full_tiles(views, dev + (i % replicas) * jobs, jobs, nullptr); });
  const double tiles = static_cast<double>(jobs) * layers * heads;
  csv.row("flush,llama3-8b," + dtype_name + "," + std::to_string(jobs) + "," + std::to_string(layers) + "," +
              std::to_string(t.ms * 1e3) + ",,," + std::to_string(tiles / (t.ms * 1e-3)),
          &t);
  for (void* p : buffers) KVARN_CUDA_CHECK(cudaFree(p));
  KVARN_CUDA_CHECK(cudaFree(dev));
}

// One decode step's linear layers at `batch` tokens, Llama-3-8B: per layer QKV 4096 -> 6144, O 4096 -> 4096,
// gate + up 4096 -> 28672, down 14336 -> 4096, 32 layers, then the lm_head 4096 -> 128256. The same weights serve
// every layer: one layer's 436 MB pass through L2 (50 MB) as 32 distinct layers' would. Norms, RoPE, the MLP's
// activation and sampling are left out: a step costs at least this plus attention.
void bench_step_linear_layers(Csv& csv, int batch) {
  struct Linear {
    int in, out;
  };
  const Linear layer[] = {{4096, 6144}, {4096, 4096}, {4096, 28672}, {14336, 4096}}, head{4096, 128256};
  const int layers = 32;
  size_t weight_elements = 0, flops = 0, max_dim = 0;
  for (const Linear& l : layer) {
    weight_elements = std::max(weight_elements, static_cast<size_t>(l.in) * l.out);
    flops += 2ull * batch * l.in * l.out * layers;
    max_dim = std::max({max_dim, static_cast<size_t>(l.in), static_cast<size_t>(l.out)});
  }
  weight_elements = std::max(weight_elements, static_cast<size_t>(head.in) * head.out);
  flops += 2ull * batch * head.in * head.out;
  size_t bytes = 2ull * head.in * head.out;
  for (const Linear& l : layer) bytes += 2ull * l.in * l.out * layers;
  void *weights, *x, *y;
  KVARN_CUDA_CHECK(cudaMalloc(&weights, 2 * weight_elements));
  KVARN_CUDA_CHECK(cudaMalloc(&x, 2 * batch * std::max<size_t>(max_dim, head.out)));
  KVARN_CUDA_CHECK(cudaMalloc(&y, 2 * batch * std::max<size_t>(max_dim, head.out)));
  fill_plausible(weights, 2 * weight_elements, 11);
  fill_plausible(x, 2 * batch * max_dim, 12);
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasCreate failed");
  const float one = 1, zero = 0;
  // Row-major y[batch][out] = x[batch][in] W^T with W[out][in] (Hugging Face's layout). cuBLAS is column-major:
  // W is an in x out matrix there, and y^T (out x batch) = op(W) x^T with op = transpose.
  auto linear = [&](const Linear& l) {
    if (cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, l.out, batch, l.in, &one, weights, CUDA_R_16F, l.in, x,
                     CUDA_R_16F, l.in, &zero, y, CUDA_R_16F, l.out, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
      throw std::runtime_error("cublasGemmEx failed");
  };
  const Timing t = median_ms(5, [&](int) {
    for (int i = 0; i < layers; ++i)
      for (const Linear& l : layer) linear(l);
    linear(head);
  });
  csv.row("linear,llama3-8b,fp16," + std::to_string(batch) + ",," + std::to_string(t.ms * 1e3) + "," +
              std::to_string(bytes) + "," + std::to_string(bytes / (t.ms * 1e6)) + "," +
              std::to_string(flops / (t.ms * 1e9)),
          &t);
  cublasDestroy(handle);
  for (void* p : {weights, x, y}) KVARN_CUDA_CHECK(cudaFree(p));
}

// One job is a sequence filling a tile in every kv-head; a step at batch 128 flushes ~1 sequence (a sequence every
// 128 steps) in each of the 32 layers, in one call; one layer's flush, and more jobs, for the kernel's rate.
void bench_flushes(Csv& csv) {
  for (const auto [jobs, layers] : {std::pair{1, 1}, {1, 32}, {8, 32}, {32, 1}, {1024, 1}})
    bench_flush(csv, "kvarn_k4v2_g128", jobs, layers);
  bench_step_linear_layers(csv, 128);
}

void bench_prefill(Csv& csv, const Shape& shape, const std::string& dtype_name, int tokens, int prefix) {
  const codec::CacheDtype dtype = codec::parse_cache_dtype(dtype_name);
  const int g = dtype.tile_tokens ? dtype.tile_tokens : 128, d = shape.head_dim, tiles = prefix / g;
  const KvCacheLayer probe = make_kv_cache_layer(dtype, d, g, shape.kv_heads, nullptr, nullptr);
  uint8_t* blocks;
  uint16_t *tails, *q, *kv, *out;
  int32_t* table;
  PrefillSequence* seq;
  const size_t q_elems = static_cast<size_t>(tokens) * shape.q_heads * d;
  const size_t kv_elems = static_cast<size_t>(tokens) * shape.kv_heads * d;
  KVARN_CUDA_CHECK(cudaMalloc(&blocks, probe.block_bytes() * std::max(tiles, 1)));
  KVARN_CUDA_CHECK(cudaMalloc(&tails, probe.tail_slot_elements() * 2));
  KVARN_CUDA_CHECK(cudaMalloc(&q, q_elems * 2));
  KVARN_CUDA_CHECK(cudaMalloc(&kv, kv_elems * 2 * 2));
  KVARN_CUDA_CHECK(cudaMalloc(&out, q_elems * 2));
  KVARN_CUDA_CHECK(cudaMalloc(&table, sizeof(int32_t) * std::max(tiles, 1)));
  KVARN_CUDA_CHECK(cudaMalloc(&seq, sizeof(PrefillSequence)));
  fill_plausible(blocks, probe.block_bytes() * std::max(tiles, 1), 7);
  fill_plausible(q, q_elems * 2, 8);
  fill_plausible(kv, kv_elems * 4, 9);
  std::vector<int32_t> host_table(std::max(tiles, 1));
  std::iota(host_table.begin(), host_table.end(), 0);
  std::shuffle(host_table.begin(), host_table.end(), std::mt19937(5));
  KVARN_CUDA_CHECK(cudaMemcpy(table, host_table.data(), sizeof(int32_t) * host_table.size(), cudaMemcpyHostToDevice));
  const PrefillSequence host_seq{{0, tiles, 0, 0}, 0, tokens, 0};
  KVARN_CUDA_CHECK(cudaMemcpy(seq, &host_seq, sizeof host_seq, cudaMemcpyHostToDevice));
  const KvCacheLayer layer = make_kv_cache_layer(dtype, d, g, shape.kv_heads, blocks, tails);
  void* workspace;
  KVARN_CUDA_CHECK(cudaMalloc(&workspace, std::max<size_t>(1, prefill_attention_workspace_bytes(layer, tokens, tiles))));
  const PrefillAttentionArgs args{q, kv, kv + kv_elems, out, seq, table, 1, tokens, shape.q_heads, tokens,
                                  1.0f / std::sqrt(static_cast<float>(d)), tiles};
  const Timing t = median_ms(10, [&](int) { prefill_attention(layer, args, workspace, nullptr); });
  const double flops = 4.0 * shape.q_heads * d * (0.5 * tokens * tokens + static_cast<double>(tokens) * tiles * g);
  csv.row("prefill," + std::string(shape.name) + "," + dtype_name + ",1," + std::to_string(tokens) + "," +
              std::to_string(t.ms * 1e3) + ",,," + std::to_string(flops / (t.ms * 1e-3) / 1e12) + "," +
              std::to_string(tiles * g),
          &t);
  if (tiles > 0 && layer.layout.code_tile) {
    const Timing td = median_ms(10, [&](int) {
      dequantize_prefix_tiles(layer, seq, 1, table, tiles, static_cast<uint8_t*>(workspace), nullptr);
    });
    const double bytes = static_cast<double>(layer.block_bytes()) * tiles + dequantized_prefix_bytes(layer, tiles);
    csv.row("dequantize," + std::string(shape.name) + "," + dtype_name + ",1," + std::to_string(tiles * g) + "," +
                std::to_string(td.ms * 1e3) + "," + std::to_string(bytes) + "," +
                std::to_string(bytes / (td.ms * 1e-3) / 1e9) + ",," + std::to_string(tiles),
            &td);
  }
  for (void* p : {static_cast<void*>(blocks), static_cast<void*>(tails), static_cast<void*>(q), static_cast<void*>(kv),
                  static_cast<void*>(out), static_cast<void*>(table), static_cast<void*>(seq), workspace})
    KVARN_CUDA_CHECK(cudaFree(p));
}

std::vector<std::string> split_commas(const char* text) {
  std::vector<std::string> out;
  std::string rest = text;
  for (size_t comma; (comma = rest.find(',')) != std::string::npos; rest.erase(0, comma + 1))
    out.push_back(rest.substr(0, comma));
  out.push_back(rest);
  return out;
}

std::vector<int> parse_list(const char* text) {
  std::vector<int> out;
  for (const std::string& item : split_commas(text)) {
    char* end = nullptr;
    const long value = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end) throw std::runtime_error(std::string("not a list of integers: ") + text);
    out.push_back(static_cast<int>(value));
  }
  return out;
}

void bench_prefills(Csv& csv) {
  for (const Shape& shape : kShapes)
    for (const char* dtype : {"kvarn_k4v2_g128", "fp16"}) {
      for (int tokens : {2048, 8192}) bench_prefill(csv, shape, dtype, tokens, 0);
      bench_prefill(csv, shape, dtype, 2048, 30720);
    }
}

int run(int argc, char** argv) {
  Csv csv;
  bool decode_only = false, flush_only = false, prefill_only = false, overlap = true, after_append = false;
  Lengths lengths = Lengths::uniform;
  std::vector<int> batches = {1, 8, 32, 128}, contexts = {1024, 8192, 32768, 131072}, splits = {0}, tile_heads = {0};
  std::vector<std::string> shape_names = {"llama3-8b", "qwen3-32b"}, dtypes = {"kvarn_k4v2_g128", "fp16"};
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) csv.file = std::fopen(argv[++i], "w");
    if (!std::strcmp(argv[i], "--quick")) batches = {8}, contexts = {8192};
    if (!std::strcmp(argv[i], "--decode-only")) decode_only = true;
    for (const auto& [flag, chosen] :
         {std::pair{"--ragged", Lengths::ragged}, std::pair{"--one-long", Lengths::one_long}})
      if (!std::strcmp(argv[i], flag)) {
        if (lengths != Lengths::uniform && lengths != chosen)
          throw std::runtime_error("--ragged and --one-long: one set of sequence lengths at a time; expected one");
        lengths = chosen;
      }
    if (!std::strcmp(argv[i], "--no-overlap")) overlap = false;
    if (!std::strcmp(argv[i], "--after-append")) after_append = true;
    if (!std::strcmp(argv[i], "--flush-only")) flush_only = true;
    if (!std::strcmp(argv[i], "--prefill-only")) prefill_only = true;
    if (!std::strcmp(argv[i], "--batches") && i + 1 < argc) batches = parse_list(argv[++i]);
    if (!std::strcmp(argv[i], "--contexts") && i + 1 < argc) contexts = parse_list(argv[++i]);
    if (!std::strcmp(argv[i], "--tiles-per-split") && i + 1 < argc) splits = parse_list(argv[++i]);
    if (!std::strcmp(argv[i], "--tile-heads") && i + 1 < argc) tile_heads = parse_list(argv[++i]);
    if (!std::strcmp(argv[i], "--shapes") && i + 1 < argc) shape_names = split_commas(argv[++i]);
    if (!std::strcmp(argv[i], "--dtypes") && i + 1 < argc) dtypes = split_commas(argv[++i]);
  }
  for (const std::string& name : shape_names)
    if (std::none_of(std::begin(kNamedShapes), std::end(kNamedShapes), [&](const Shape& s) { return name == s.name; }))
      throw std::runtime_error("--shapes: unknown shape '" + name + "'; expected llama3-8b, qwen3-32b or qwen3-235b");
  for (int tiles_per_split : splits)
    if (tiles_per_split < 0)
      throw std::runtime_error("--tiles-per-split: " + std::to_string(tiles_per_split) +
                               "; expected split sizes in tiles (0: the planner's choice)");
  for (int heads : tile_heads)
    if (heads < 0)
      throw std::runtime_error("--tile-heads: " + std::to_string(heads) +
                               "; expected q heads per read of a tile (0: the planner's choice)");
  const std::vector<std::string>& known = codec::cache_dtype_names();
  for (const std::string& name : dtypes)
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      std::string expected;
      for (const std::string& k : known) expected += (expected.empty() ? "" : ", ") + k;
      throw std::runtime_error("--dtypes: unknown cache dtype '" + name + "'; expected one of " + expected);
    }
  cudaDeviceProp prop;
  KVARN_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# %s, %d SMs, %.0f GiB\n", prop.name, prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0);
  csv.header();
  if (flush_only) {
    bench_flushes(csv);
    if (csv.file) std::fclose(csv.file);
    return 0;
  }
  if (prefill_only) {
    bench_prefills(csv);
    if (csv.file) std::fclose(csv.file);
    return 0;
  }
  copy_bandwidth(csv);
  for (const Shape& shape : kNamedShapes)
    if (std::find(shape_names.begin(), shape_names.end(), shape.name) != shape_names.end())
      for (const std::string& dtype : dtypes)
        for (int batch : batches)
          for (int context : contexts)
            for (int tiles_per_split : splits)
              for (int heads : tile_heads)
                bench_decode(csv, shape, dtype, batch, context, tiles_per_split, heads, lengths, overlap,
                             after_append);
  if (decode_only) {
    if (csv.file) std::fclose(csv.file);
    return 0;
  }
  for (const Shape& shape : kShapes)  // our fp16 kernel as PyTorch's SDPA runs: calls that do not overlap
    if (std::find(shape_names.begin(), shape_names.end(), shape.name) != shape_names.end())
      for (int batch : batches)
        for (int context : contexts) bench_decode(csv, shape, "fp16", batch, context, 0, 0, lengths, false);
  for (const char* dtype : {"kvarn_k4v4_g128", "kvarn_k4v2_g64", "kvarn_k4v4_g64"})
    bench_decode(csv, kShapes[0], dtype, 32, 32768);
  for (const Shape& shape : kShapes)
    for (const char* dtype : {"kvarn_k4v2_g128", "fp16"})
      for (int batch : {8, 32})
        for (int context : {8192, 32768}) bench_decode(csv, shape, dtype, batch, context, 0, 0, Lengths::ragged);
  bench_flushes(csv);
  bench_prefills(csv);
  if (csv.file) std::fclose(csv.file);
  return 0;
}

}  // namespace
}  // namespace kvarn::cuda

int main(int argc, char** argv) {
  try {
    return kvarn::cuda::run(argc, argv);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "kvarn_cuda_bench: %s\n", e.what());
    return 1;
  }
}
