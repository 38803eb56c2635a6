// Shape contract: see decode_attention.h; cache layout: kv_layout.h; tile layout: codec/tile_layout.h.
//
// decode_attention_kernel: 1-D grid of pairs * (num_splits + 1) CTAs over the (sequence n, kv-head h) pairs, 128
// threads (4 warps). A group past 8 q heads per kv head is a pair per block of up to 8 for the tails, for fp16 tiles
// and in small grids, and for KVarN tiles in large ones one pair of up to 16 heads (head_blocks, tile_blocks), whose
// tile CTAs read each tile once for all of them; a group of 8 over KVarN tiles in a tiny grid is a pair per half
// (GroupServing). The first
// `pairs` CTAs read the fp16 tails (attend_tail: like an fp16 tile, on tensor cores; short, and first so that they
// do not trail the launch); then split-major, CTA split s of pair (n, h) reads the tiles [s*tps, (s+1)*tps) of
// sequence n, kv-head h through cp.async copies of whole tiles into shared memory
// (16-byte pieces, tiles in flight while others are read). Each CTA leaves one partial softmax state (m, l, o[D])
// per q head; a tile CTA's 4 warps keep their own online softmax and merge at the end. Launched to overlap the
// kernel before it (DecodeAttentionArgs::overlap_previous_kernel), a CTA reads its sequence's view and block table
// and asks for its first tile before it waits for that kernel's end (wait_for_previous_kernel), and reads q and the
// tail only after: H200, k4v2 1.03-1.17x, fp16 1.00-1.21x at batch 1-8 x 1K-32K (docs/benchmarks.md). A grid that
// fits at fewer CTAs per SM than the kernel allows is spread evenly over the SMs (launch_shared_bytes). A grid of
// one split per pair that the tail CTAs would make larger than the GPU holds at once has none: each pair's CTA reads
// its tail after its tiles and writes the output, and no combine follows (tails_in_tile_ctas, decode_split_plan.h;
// H200 k4v2 32 x 1K 1.58x / 1.41x, Llama / Qwen).
// (Measured and not kept, H200: the tail read by the pair's last tile CTA puts it on the critical path, 1.3-1.6x
// slower at batch 1-8 x 1K; a separate tail kernel, a programmatic dependent, costs a launch, 1.2-1.3x slower
// there, and pays only at batch >= 32 x 1K, where the tail CTAs' tile-sized shared memory halves the CTAs per SM.)
// On tensor cores (mma m16n8k16):
//   scores  S[h][t] = s_tok[t] * (sum_c (q'[h][c] a_K[c]) code[c][t] + sum_c q'[h][c] z_K[c])   (K = channels)
//   values  O[h][c] += s_ch[c] * (sum_t (p[h][t] a_V[t]) code[t][c] + sum_t p[h][t] z_V[t])    (K = tokens)
// KVarN (decode_kvarn_tiles.cuh, decode_kvarn_tile_io.cuh): one warp reads a whole tile (warps take every 4th tile
// of the split, each through its own slot, refilled by halves: the next keys while the values are read), so that
// the fold of a_K into the query, the scales and the per-channel end of the values are paid per tile rather than
// per quarter tile, and nothing but warp barriers separates tiles; ~73 KB of shared memory and <= 168 registers
// leave 3 CTAs (12 warps) per SM (a grid that fits at 2 may run a twin with more registers: launch_kernel).
// Values: channels as the mma's rows and the heads as its columns; scores: tokens as the rows and the heads as the
// columns (all 16 rows work, and no lane works for an absent head). For groups of
// up to 4 heads the folded query q' a_K is split into an fp16 high part and the fp16 rounding of the rest, in the
// otherwise idle columns, so the two halves of the result add up to it with ~2^-22 instead of 2^-12 relative
// rounding; for 5-8 heads it is one fp16 operand, its rounding centred on the tile's largest-scale token
// (fold_key_scales_rounded): an fp16 query's error, none in an attention sink's score. Groups of 9-16 in a large
// grid (decode_kvarn_tiles_wide.cuh): the heads as the rows of both products, the query rounded likewise, ~80 KB
// and <= 255 registers, 2 CTAs per SM; each code unpacked once for the whole group. The weights p a_V
// are plain fp16 (2^-12, as FlashAttention's P). Codes enter as the raw bits of fp16 subnormals, code * 2^k * 2^-24
// for a code at bit k of a 16-bit half (exact; the tensor cores take subnormal fp16 inputs), and 2^(24-k) comes off
// in fp32; no dequantized copy is ever written. Key codes are read with ldmatrix.trans (a register: two channels'
// codes of 4 tokens; an odd token's code taken with its even neighbour's, key_code_operand), value codes as words
// of the packed rows paired by byte permutes; the token and channel orders inside an mma follow the reads (any
// permutation of the reduced index, used consistently in A and B, gives the same sum).
// fp16 tiles (decode_fp16_tiles.cuh): the 4 warps share each tile (a quarter of its tokens each) through a ring of
// several tiles; K/V and p as they are, q as an fp16 pair (rows 8-15: the rest of its rounding), the scale applied
// to the fp32 scores.
// Bytes per (sequence, kv-head): num_tiles * layout.bytes + tail_len * 2*D*2 + q/out/partials (small).
// FLOPs (tensor cores, useful): 4 * G_q * D per token; issued: 8/G_q x that (the hi and lo halves fill the
// columns of groups up to 4).
// Measurements: docs/benchmarks.md.
//
// decode_combine_kernel: per (sequence, q head) row, merges the partials, divides by l, rotates back (H_D) for
// rotated dtypes, writes fp16. On Hopper it is launched as a programmatic dependent of the attention kernel, whose
// CTAs release it when they start, and it releases the kernel after it once the attention grid has ended (a next
// call's attention then overlaps it; released earlier, that attention's CTAs would hold SM slots that the attention
// grid still needs), so its cost is the latency after the last attention CTA: every lane reads the
// (m, l) and its channels of 8 partials at once and merges them online, one round trip to L2 for up to 8 partials
// (three to four dependent ones before: H200, 1.11x at batch 1 x 1K, 1.04-1.05x at 8 x 1K-8K), and a row with
// more partials than 8 gets up to 8 warps, each reading its own 8 at once, merged in shared memory (up to 64
// partials, batch 1 x 32K has 33, in one round trip instead of one per 8). Combining in the last CTA of each pair
// instead (one launch, arrival counters) measured 0.73-0.95x the speed on every shape of the benchmark, and again
// with that CTA reading 16 partials per round trip, 0.78-0.93x at batch 1 and 0.86-0.89x at 128 x 1K (one CTA
// reads what the combine spreads over many SMs, and every CTA waits for its arrival's atomic; docs/benchmarks.md),
// so the two kernels stay.
#include "backend/cuda/decode_attention.h"

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/decode_common.cuh"
#include "backend/cuda/decode_fp16_tiles.cuh"
#include "backend/cuda/decode_kvarn_tiles_wide.cuh"
#include "backend/cuda/decode_split_plan.h"
#include "backend/cuda/per_device.h"
#include "backend/cuda/tile_formats.cuh"

#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <string>
#include <type_traits>
#include <utility>

namespace kvarn::cuda {

namespace {

using namespace decode;

template <class F, int kHeads>  // the paths of up to 8 heads stage 8 heads' queries
using SharedLayout =
    std::conditional_t<F::kCodes, KvarnSharedLayout<F, std::max(kHeads, kMaxGroup)>, Fp16SharedLayout<F>>;

template <class F, int kHeads>
constexpr size_t shared_bytes() {
  static_assert(TailSharedLayout<F>::bytes <= SharedLayout<F, kHeads>::bytes, "a tail CTA would lower the CTAs per SM");
  return SharedLayout<F, kHeads>::bytes;
}

// A pair of one split whose CTA also read the tail: the states of each of its q heads, the tiles' merged one
// (tiles_state, TailSharedLayout; none where null) and the tail's warps' (the merge buffer, where tail), merged,
// rotated back and written as the output, so that no combine follows. Both stay in shared memory: written to
// global partials and read back they took two round trips (H200: 1.05-1.09x at batch 32-128 x 1K, where the
// tail is a large part of a CTA's work; docs/benchmarks.md).
template <int D>
__device__ void write_pair_output(const DecodeParams& p, uint8_t* shared, const float* tiles_state, bool tail,
                                  size_t partial_row) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x & 31;
  merge_states<D>(shared, p.group, tail, tiles_state, [&](int h, float (&o)[E], float, float l) {
    const float inv = l > 0 ? 1.0f / l : 0.0f;
#pragma unroll
    for (int i = 0; i < E; ++i) o[i] *= inv;
    if (p.rotated) hadamard_warp<D>(o);
#pragma unroll
    for (int i = 0; i < E; ++i) p.out[(partial_row + h) * D + lane * E + i] = __float2half_rn(o[i]);
  });
}

// kHeads: the most q heads a tile CTA serves, which picks the KVarN path (4: attend_kvarn_tiles with the folded query
// as hi + lo, 8: two heads per lane, 16: attend_kvarn_tiles_wide), a kernel each so that each path gets its own
// registers; 8 for fp16 tiles. kCtasPerSm: the CTAs per SM its registers are bounded for (launch_kernel).
template <class F, int kHeads, int kCtasPerSm>
__global__ void __launch_bounds__(kThreads, kCtasPerSm) decode_attention_kernel(const DecodeParams p) {
  extern __shared__ __align__(16) uint8_t shared[];
  release_next_kernel();  // the combine kernel (or the next call, without one) may launch once every CTA has started
  const int pairs = p.num_seqs * p.num_kv_heads * p.head_blocks;
  if (!p.tails_in_tile_ctas && static_cast<int>(blockIdx.x) < pairs) {
    const CtaWork pair = cta_work(p, blockIdx.x, 1);
    // The tail may be the kernel before's to write. Waiting also where there is none keeps this grid's end after
    // that kernel's even when no CTA has work, so that the combine, waiting for this grid, comes after it too.
    wait_for_previous_kernel();
    if (pair.seq.tail_len == 0) return;
    attend_tail<F>(p, pair.seq, pair.head, pair.partial_row, shared);
    write_partial_from_warp_states<F::D>(p, shared, pair.partial_row, pair.heads, p.num_splits);
    return;
  }
  const CtaWork work = cta_work(p, blockIdx.x - (p.tails_in_tile_ctas ? 0 : pairs), p.tile_blocks);
  const bool tiles = work.first_tile < work.end_tile;
  if (tiles) {
    if constexpr (F::kCodes) {
      if constexpr (kHeads == kMaxTileGroup) {
        attend_kvarn_tiles_wide<F>(p, work, shared);
      } else {
        attend_kvarn_tiles<F, kHeads == 4 ? 1 : 2>(p, work, shared);
      }
    } else {
      attend_fp16_tiles<F>(p, work, shared);
    }
  }
  if (!p.tails_in_tile_ctas) {
    if (tiles) write_partial_from_warp_states<F::D>(p, shared, work.partial_row, work.heads, work.split);
    return;
  }
  // Without tail CTAs (only where a tile CTA serves one block), each pair's one split reads the tail after its tiles
  // (alone where there are none). Its work is read again rather than kept in registers through the tiles.
  constexpr int E = F::D / 32;
  const CtaWork pair = cta_work(p, blockIdx.x, 1);
  if (!tiles) wait_for_previous_kernel();  // the tail and the output may be the kernel before's to write
  float* tiles_state = reinterpret_cast<float*>(shared + TailSharedLayout<F>::tiles_state);
  if (tiles) merge_states<F::D>(shared, p.group, true, nullptr, [&](int h, const float (&o)[E], float m, float l) {
    float* dst = tiles_state + h * (F::D + 4);
    store_floats(dst + (threadIdx.x & 31) * E, o);
    if ((threadIdx.x & 31) == 0) dst[F::D] = m, dst[F::D + 1] = l;
  });
  const bool tail = pair.seq.tail_len > 0;
  __syncthreads();  // the merge buffer is read (the tail's rows replace it) and the tiles' state written
  if (tail) attend_tail<F>(p, pair.seq, pair.head, pair.partial_row, shared);
  write_pair_output<F::D>(p, shared, tiles ? tiles_state : nullptr, tail, pair.partial_row);
}

// Warps of 32 lanes per combine CTA; a row's partials are shared by warps_per_row of them (1, 2, 4 or 8).
constexpr int kCombineWarps = 8, kPartsPerTrip = 8;

// At most 64 registers, 4 CTAs per SM, so that batch 128 x 1K's 512 CTAs fit in one wave (with 70 registers and
// 3 CTAs per SM, Llama k4v2 at 128 x 1K took 0.955x the speed of the one-warp-per-row kernel, with this bound 0.977x;
// H200, side by side).
template <int D>
__global__ void __launch_bounds__(kCombineWarps * 32, 4)
    decode_combine_kernel(const float* __restrict__ partial_o, const float2* __restrict__ partial_ml,
                          const SequenceKvView* __restrict__ seqs, int num_q_heads, int tiles_per_split,
                          int num_splits, int num_rows, int warps_per_row, bool rotated, __half* __restrict__ out) {
  constexpr int E = D / 32;
  extern __shared__ float states[];  // [kCombineWarps][D + 2] for rows of several warps, else none
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, k = warp % warps_per_row;
  const int row = blockIdx.x * (kCombineWarps / warps_per_row) + warp / warps_per_row;
  int used = 0, parts = 0;  // rows past the end take no part, but reach the barrier
  if (row < num_rows) {
    const SequenceKvView seq = seqs[row / num_q_heads];
    used = min((seq.num_tiles + tiles_per_split - 1) / tiles_per_split, num_splits);  // the last may hold more
    parts = used + (seq.tail_len > 0);  // part `used` is the tail's, stored at index num_splits
  }
  const size_t base = static_cast<size_t>(row) * (num_splits + 1);
  auto slot = [&](int part) { return base + (part < used ? part : num_splits); };
  wait_for_previous_kernel();  // the attention grid has finished and its writes are visible
  release_next_kernel();       // the next call's attention may start reading its tiles
  float m = -FLT_MAX, l = 0, acc[E] = {};
  for (int first = k * kPartsPerTrip; first < parts; first += kPartsPerTrip * warps_per_row) {
    float2 ml[kPartsPerTrip];
    float x[kPartsPerTrip][E];
#pragma unroll
    for (int j = 0; j < kPartsPerTrip; ++j) {
      if (first + j < parts) {
        ml[j] = partial_ml[slot(first + j)];
        load_floats(partial_o + slot(first + j) * D + lane * E, x[j]);
      } else {
        ml[j] = make_float2(-FLT_MAX, 0.0f);
#pragma unroll
        for (int e = 0; e < E; ++e) x[j][e] = 0;
      }
    }
    float mx = m;
#pragma unroll
    for (int j = 0; j < kPartsPerTrip; ++j) mx = fmaxf(mx, ml[j].x);
    const float correction = exp2f(m - mx);
    l *= correction;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= correction;
#pragma unroll
    for (int j = 0; j < kPartsPerTrip; ++j) {
      const float f = exp2f(ml[j].x - mx);
      l += ml[j].y * f;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += x[j][e] * f;
    }
    m = mx;
  }
  if (warps_per_row > 1) {
#pragma unroll
    for (int e = 0; e < E; ++e) states[warp * (D + 2) + lane * E + e] = acc[e];
    if (lane == 0) states[warp * (D + 2) + D] = m, states[warp * (D + 2) + D + 1] = l;
    __syncthreads();
    if (k != 0) return;
    float mx = -FLT_MAX;
    for (int w = warp; w < warp + warps_per_row; ++w) mx = fmaxf(mx, states[w * (D + 2) + D]);
    l = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0;
    for (int w = warp; w < warp + warps_per_row; ++w) {
      const float* state = states + w * (D + 2);
      const float f = exp2f(state[D] - mx);
      l += state[D + 1] * f;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += state[lane * E + e] * f;
    }
  }
  if (row >= num_rows) return;
  const float inv = l > 0 ? 1.0f / l : 0.0f;
#pragma unroll
  for (int i = 0; i < E; ++i) acc[i] *= inv;
  if (rotated) hadamard_warp<D>(acc);
#pragma unroll
  for (int i = 0; i < E; ++i) out[static_cast<size_t>(row) * D + lane * E + i] = __float2half_rn(acc[i]);
}

// The current device's properties the launches depend on, read once per device.
struct DeviceTraits {
  int multiprocessors = 0;
  SmSharedMemory shared;
  // Programmatic dependent launch: the GPU has it (compute capability >= 9.0) and the kernels it runs were compiled
  // with their griddepcontrol waits (for 9.0 or later, not JIT-compiled from the sm_80 PTX, which has none).
  bool programmatic_launch = false;
};

const DeviceTraits& device_traits() {
  return once_per_device<DeviceTraits>([] {
    int device = 0;
    DeviceTraits t;
    KVARN_CUDA_CHECK(cudaGetDevice(&device));
    const auto attribute = [device](cudaDeviceAttr which) {
      int value = 0;
      KVARN_CUDA_CHECK(cudaDeviceGetAttribute(&value, which, device));
      return value;
    };
    const int major = attribute(cudaDevAttrComputeCapabilityMajor);
    t.multiprocessors = attribute(cudaDevAttrMultiProcessorCount);
    t.shared.per_sm = attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor);
    t.shared.reserved_per_cta = attribute(cudaDevAttrReservedSharedMemoryPerBlock);
    t.shared.max_per_cta = attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    t.shared.allocation_unit = major >= 8 ? 128 : 256;
    cudaFuncAttributes compiled;
    KVARN_CUDA_CHECK(cudaFuncGetAttributes(&compiled, decode_combine_kernel<128>));
    t.programmatic_launch = major >= 9 && compiled.ptxVersion >= 90;
    return t;
  });
}

// Launches kernel<<<grid, block, shared_bytes, stream>>>(args...), where the GPU allows and `overlap` asks for it
// as a programmatic dependent of the kernel before it in the stream: it may start once every CTA of that kernel
// has released it (griddepcontrol.launch_dependents) or exited, and waits for its end with griddepcontrol.wait.
template <class... Params, class... Args>
void launch_with_overlap(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                         bool overlap, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  if (overlap && device_traits().programmatic_launch) config.attrs = &attribute, config.numAttrs = 1;
  KVARN_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// An attention kernel and its occupancy, read once: the CTAs an SM holds at once, and the SM's shared memory as the
// kernel's dynamic shared memory sees it (its static shared memory counted as reserved per CTA). Also lets a launch
// ask for up to the opt-in limit (launch_shared_bytes).
struct AttentionKernel {
  void (*kernel)(DecodeParams) = nullptr;
  int blocks_per_sm = 1;
  size_t shared_bytes = 0;  // the least dynamic shared memory a CTA asks for
  SmSharedMemory dynamic_shared;
};

template <class F, int kHeads, int kCtasPerSm>
const AttentionKernel& attention_kernel() {
  return once_per_device<AttentionKernel>([] {
    const auto attention = decode_attention_kernel<F, kHeads, kCtasPerSm>;
    cudaFuncAttributes compiled;
    KVARN_CUDA_CHECK(cudaFuncGetAttributes(&compiled, attention));
    AttentionKernel k;
    k.kernel = attention;
    k.dynamic_shared = device_traits().shared;
    k.dynamic_shared.reserved_per_cta += static_cast<long>(compiled.sharedSizeBytes);
    k.dynamic_shared.max_per_cta -= static_cast<long>(compiled.sharedSizeBytes);
    KVARN_CUDA_CHECK(cudaFuncSetAttribute(attention, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(k.dynamic_shared.max_per_cta)));
    k.shared_bytes = shared_bytes<F, kHeads>();
    KVARN_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&k.blocks_per_sm, attention, kThreads, k.shared_bytes));
    k.blocks_per_sm = std::max(k.blocks_per_sm, 1);
    return k;
  });
}

// The attention kernel the plan counts on for tile CTAs of `heads` q heads: a kernel per KVarN path, each with its own
// registers and so its own occupancy, bounded for 3 CTAs per SM (at most 168 registers) up to 8 heads, for 2 past 8
// (the queries of 16 heads and 4 slots take ~80 KB of shared memory, so 3 would not fit); fp16 tiles, 1.
template <class F>
const AttentionKernel& attention_kernel(int heads) {
  if constexpr (F::kCodes) {
    if (heads > kMaxGroup) return attention_kernel<F, kMaxTileGroup, 2>();
    if (heads > 4) return attention_kernel<F, kMaxGroup, 3>();
    return attention_kernel<F, 4, 3>();
  } else {
    return attention_kernel<F, kMaxGroup, 1>();
  }
}

// The path of two heads per lane at D = G = 128 compiled for 2 CTAs per SM, and held there: it asks for enough shared
// memory that no third CTA fits (shared_bytes_to_cap), also where its registers would let one on. Its registers
// alone had held it at 2 (173 for k4v2), until a change outside the tile loop took them to 165; at 3 per SM it lost
// its gain at 1 x 8K (8.0 -> 8.7 us), a grid that then had to be spread to 115.7 KB per CTA.
template <class F>
const AttentionKernel& twin_kernel() {
  return once_per_device<AttentionKernel>([] {
    AttentionKernel k = attention_kernel<F, kMaxGroup, 2>();
    k.blocks_per_sm = std::min(k.blocks_per_sm, 2);
    k.shared_bytes = shared_bytes_to_cap(2, k.shared_bytes, k.dynamic_shared);
    return k;
  });
}

// The kernel a grid of `ctas` CTAs runs: the plan's, but on the path of two heads per lane at D = G = 128 its twin
// (twin_kernel) wherever the grid fits in the twin's one wave: its registers are not capped at 168 (k4v4 180 against
// 167). H200, Qwen shape, side by side against the capped kernel alone: k4v2 up to 1.12x (1 x 8K), k4v4 up to 1.04x,
// on the rows of batch 1-32 it runs, none below 1.00x (docs/benchmarks.md, seventeenth session). The other paths
// take a few registers more or none unbounded (Llama's D = G = 128 path 143 -> 145, 1.00-1.01x; at G = 64 the
// two-head path 165 -> 163).
template <class F>
const AttentionKernel& launch_kernel(int heads, long ctas) {
  if constexpr (F::kCodes && F::D == 128 && F::G == 128) {
    if (heads > 4 && heads <= kMaxGroup) {
      const AttentionKernel& twin = twin_kernel<F>();
      if (ctas <= static_cast<long>(device_traits().multiprocessors) * twin.blocks_per_sm) return twin;
    }
  }
  return attention_kernel<F>(heads);
}

// The shared memory a launch of `ctas` attention CTAs asks for: a grid that fits at fewer CTAs per SM than the kernel
// allows is spread over every SM (shared_bytes_to_spread). Launched while the kernel before it still held some SMs,
// such a grid ran slower than without the overlap; our reading, not observed directly: its CTAs were stacked 3 to an
// SM on the SMs free first, and the busiest SMs set its time. H200, k4v2 batch 1 x 16K / 32K (264 CTAs on 132 SMs
// of 3 slots), overlapping against not: 0.94-1.005x launched as is, 1.09-1.14x spread; not overlapping, spreading
// changes nothing (0.99-1.00x). Asking only for enough that one more CTA does not fit (76.9 KB instead of 115.7 KB
// at 2 per SM) measured 1.07x at 1 x 8K and 0.98x at 1 x 32K for the kernel bounded for 3; the twin asks so
// (twin_kernel).
size_t launch_shared_bytes(long ctas, const AttentionKernel& kernel) {
  return shared_bytes_to_spread(ctas, device_traits().multiprocessors, kernel.blocks_per_sm, kernel.shared_bytes,
                                kernel.dynamic_shared);
}

// The q heads per kv head; they must be a positive multiple of the kv heads.
int group_size(const KvCacheLayer& cache, int num_q_heads, const char* who) {
  if (num_q_heads <= 0 || num_q_heads % cache.num_kv_heads != 0)
    throw_error(std::string(who) + ": " + std::to_string(num_q_heads) + " q heads over " +
                std::to_string(cache.num_kv_heads) + " kv heads; expected a positive multiple");
  return num_q_heads / cache.num_kv_heads;
}

// How a kv head's q heads are served (DecodeParams::group, head_blocks, tile_blocks): a tile CTA serves a run of the
// group, the group's largest divisor of at most `most` heads (DecodeAttentionPlan::tile_heads), and a tail CTA a
// block of that run's largest divisor of at most kMaxGroup (16 -> 2 x 8, 12 -> 2 x 6, 9 -> 3 x 3), so that all are
// alike; a prime past `most` in runs of 1. Every run's tile CTAs read the kv head's tiles.
struct HeadBlocks {
  int size, count, tile_blocks;  // a block's heads, blocks per kv head, blocks per tile CTA
  int tile_heads() const { return size * tile_blocks; }
};

HeadBlocks head_blocks(int group, int most) {
  const auto largest_divisor = [](int n, int m) {
    int d = std::min(n, m);
    while (n % d != 0) --d;
    return d;
  };
  const int tile_heads = largest_divisor(group, most);
  const int size = largest_divisor(tile_heads, kMaxGroup);
  return {size, group / size, tile_heads / size};
}

// The ways a plan may serve a kv head's group (DecodeAttentionPlan::tile_heads): in blocks of up to 8 heads; over
// code tiles also with one read of each tile for up to 16, and, for a group of 5-8 that splits into two halves of up
// to 4 heads (Qwen3-32B's 8 as 4 + 4), per half: each tile read twice, on the path of up to 4 heads. A way the group
// does not allow is its blocks of up to 8.
struct GroupServing {
  HeadBlocks blocks_of_8, read_once, halves;

  bool serves(int tile_heads) const {
    return tile_heads == blocks_of_8.tile_heads() || tile_heads == read_once.tile_heads() ||
           tile_heads == halves.tile_heads();
  }
  HeadBlocks of(int tile_heads) const {  // tile_heads: one that serves
    return tile_heads == read_once.tile_heads() ? read_once : tile_heads == halves.tile_heads() ? halves : blocks_of_8;
  }
  std::string choices() const {  // "4 or 8", "8 or 16", "8"
    std::string text = std::to_string(halves.tile_heads());
    if (blocks_of_8.tile_heads() != halves.tile_heads()) text += " or " + std::to_string(blocks_of_8.tile_heads());
    if (read_once.tile_heads() != blocks_of_8.tile_heads()) text += " or " + std::to_string(read_once.tile_heads());
    return text;
  }
};

GroupServing group_serving(const KvCacheLayer& cache, int group) {
  const HeadBlocks blocks_of_8 = head_blocks(group, kMaxGroup);
  if (!cache.layout.code_tile) return {blocks_of_8, blocks_of_8, blocks_of_8};
  const HeadBlocks halves = head_blocks(group, 4);
  return {blocks_of_8, head_blocks(group, kMaxTileGroup), blocks_of_8.count == 1 && halves.count == 2 ? halves
                                                                                                      : blocks_of_8};
}

// A plan's workspace: each q head's partial softmax state (o[D], m, l) per split and one for the tail.
size_t decode_workspace_bytes(int num_seqs, int num_q_heads, int num_splits, int head_dim) {
  const size_t rows = static_cast<size_t>(num_seqs) * num_q_heads * (num_splits + 1);
  return rows * (sizeof(float) * head_dim + sizeof(float2));
}

// A group past 8 q heads per kv head over code tiles is read once for up to 16 heads (attend_kvarn_tiles_wide) where
// that kernel's wave gives each warp at least this many tiles; in smaller grids blocks of up to 8 finish first, each
// block's CTAs reading the tiles again: twice the warps per tile and 3 CTAs per SM (the wide kernel's registers and
// shared memory allow 2) shorten what is a chain of latencies there. Measured on the H200 (qwen3-235b shape, 4 kv
// heads, k4v2, blocks / wide, each at its planner's splits, side by side): warps of 0.5-2 tiles (batch 1-8 x 8K,
// 1-2 x 32K, 4 x 16K) 0.79-0.97x, of 4 tiles (4 x 32K, 16 x 8K) 1.11x and 1.01x, of 8 or more 1.15-1.32x
// (docs/benchmarks.md).
constexpr long kWideTilesPerWarp = 3;

// A group served in halves (GroupServing) where the halves' tile reads would keep at most 1 in this many of a wave's
// warps busy: in a grid that small each warp reads one tile, whose chain is the call's, and the path of up to 4
// heads has the shorter chain. Measured on the H200 (Qwen shape, k4v2, halves / one block of 8, each at its
// planner's splits, side by side; 1,584 warps): 112 and 224 reads (batch 1 x 1K, 2 x 1K) 1.14x and 1.17x, faster
// than our fp16 kernel there (which a block of 8 was not: 0.92x, 0.95x); 448-896 (4 x 1K, 1 x 4K, 8 x 1K)
// 1.00-1.02x; ~1,000 (2 x 4K, 1 x 8K) 0.93x and 0.86x; more, slower still (docs/benchmarks.md).
constexpr long kHalvesWarpsPerRead = 4;

// The planner's way to serve the group (GroupServing) for sequences of these tiles, by the tile reads a wave's warps
// would take: one read for 16 heads where each warp would get a few tiles, halves where most warps would get none.
HeadBlocks planned_serving(const KvCacheLayer& cache, const GroupServing& serving, std::span<const int> seq_tiles) {
  const auto [blocks_of_8, read_once, halves] = serving;
  long tiles = 0;
  for (int t : seq_tiles) tiles += t;
  const auto reads = [&](const HeadBlocks& b) { return tiles * cache.num_kv_heads * b.count / b.tile_blocks; };
  const auto wave_warps = [&](const HeadBlocks& b) {
    long warps = 0;
    with_tile_format(cache, "decode_attention", [&](auto f) {
      warps = static_cast<long>(device_traits().multiprocessors) *
              attention_kernel<decltype(f)>(b.tile_heads()).blocks_per_sm * kWarps;
    });
    return warps;
  };
  if (read_once.tile_heads() > blocks_of_8.tile_heads())
    return reads(read_once) >= kWideTilesPerWarp * wave_warps(read_once) ? read_once : blocks_of_8;
  if (halves.tile_heads() < blocks_of_8.tile_heads())
    return kHalvesWarpsPerRead * reads(halves) <= wave_warps(halves) ? halves : blocks_of_8;
  return blocks_of_8;
}

}  // namespace

DecodeAttentionPlan plan_decode_attention(const KvCacheLayer& cache, std::span<const int> seq_tiles, int num_q_heads,
                                          int tiles_per_split, int tile_heads) {
  check_kv_cache_layer(cache, "plan_decode_attention");
  for (size_t s = 0; s < seq_tiles.size(); ++s)
    if (seq_tiles[s] < 0)
      throw_error("plan_decode_attention: sequence " + std::to_string(s) + " has " + std::to_string(seq_tiles[s]) +
                  " full tiles; expected >= 0");
  if (tiles_per_split < 0)
    throw_error("plan_decode_attention: tiles_per_split " + std::to_string(tiles_per_split) +
                "; expected > 0, or 0 for the planner's choice");
  DecodeAttentionPlan plan;
  plan.num_seqs = static_cast<int>(seq_tiles.size());
  plan.num_q_heads = num_q_heads;
  const int group = group_size(cache, num_q_heads, "plan_decode_attention");
  const GroupServing serving = group_serving(cache, group);
  if (tile_heads != 0 && !serving.serves(tile_heads))
    throw_error("plan_decode_attention: " + std::to_string(tile_heads) + " q heads per tile CTA for groups of " +
                std::to_string(group) + "; expected " + serving.choices() + " (or 0: the planner's choice)");
  const HeadBlocks blocks = tile_heads != 0 ? serving.of(tile_heads) : planned_serving(cache, serving, seq_tiles);
  plan.tile_heads = blocks.tile_heads();
  int per_sm = 1;
  with_tile_format(cache, "decode_attention",
                   [&](auto f) { per_sm = attention_kernel<decltype(f)>(blocks.tile_heads()).blocks_per_sm; });
  DecodeGridShape grid;
  grid.kv_heads = cache.num_kv_heads * blocks.count / blocks.tile_blocks;
  grid.slots = static_cast<long>(device_traits().multiprocessors) * per_sm;
  grid.tiles_at_once = cache.layout.code_tile ? kWarps : 1;  // KVarN CTAs read one tile per warp
  grid.sms = device_traits().multiprocessors;
  grid.tails_fold = blocks.tile_blocks == 1;  // as decode_attention decides tails_in_tile_ctas
  const int max_tiles = seq_tiles.empty() ? 0 : *std::max_element(seq_tiles.begin(), seq_tiles.end());
  plan.tiles_per_split = tiles_per_split > 0 ? std::min(tiles_per_split, std::max(max_tiles, 1))
                                             : choose_tiles_per_split(seq_tiles, grid);
  // At least one, so that a plan kept from a step when every sequence was in its tail still reads the tiles since.
  plan.num_splits = std::max(1, (max_tiles + plan.tiles_per_split - 1) / plan.tiles_per_split);
  plan.workspace_bytes = decode_workspace_bytes(plan.num_seqs, num_q_heads, plan.num_splits, cache.head_dim());
  return plan;
}

void decode_attention(const KvCacheLayer& cache, const DecodeAttentionArgs& args, const DecodeAttentionPlan& plan,
                      void* workspace, cudaStream_t stream) {
  check_kv_cache_layer(cache, "decode_attention");
  if (args.num_seqs == 0) return;
  const int group = group_size(cache, args.num_q_heads, "decode_attention");
  if (args.num_seqs != plan.num_seqs || args.num_q_heads != plan.num_q_heads)
    throw_error("decode_attention: a plan for " + std::to_string(plan.num_seqs) + " sequences x " +
                std::to_string(plan.num_q_heads) + " q heads, called with " + std::to_string(args.num_seqs) + " x " +
                std::to_string(args.num_q_heads) + "; expected the plan of these sequences");
  const GroupServing serving = group_serving(cache, group);
  if (!serving.serves(plan.tile_heads) || plan.tiles_per_split < 1 || plan.num_splits < 1 ||
      plan.workspace_bytes < decode_workspace_bytes(plan.num_seqs, plan.num_q_heads, plan.num_splits, cache.head_dim()))
    throw_error("decode_attention: a plan of " + std::to_string(plan.num_splits) + " splits of " +
                std::to_string(plan.tiles_per_split) + " tiles, " + std::to_string(plan.tile_heads) +
                " q heads per tile CTA and " + std::to_string(plan.workspace_bytes) +
                " bytes of workspace, for a cache of " + (cache.layout.code_tile ? "code" : "fp16") +
                " tiles of head_dim " + std::to_string(cache.head_dim()) +
                "; expected the one plan_decode_attention made for this cache");
  const HeadBlocks blocks = serving.of(plan.tile_heads);
  const long pairs = static_cast<long>(args.num_seqs) * cache.num_kv_heads * blocks.count;  // of a tail CTA each
  const long tile_ctas = pairs / blocks.tile_blocks * plan.num_splits;
  if (tile_ctas + pairs > 0x7fffffffL)
    throw_error("decode_attention: " + std::to_string(tile_ctas + pairs) + " CTAs exceed the grid limit (2^31 - 1)");
  check_softmax_scale(args.scale, cache.head_dim(), "decode_attention");
  check_device_memory(workspace, 16, "decode_attention", "workspace",
                      "plan.workspace_bytes (" + std::to_string(plan.workspace_bytes) + " bytes)");
  check_device_memory(args.q, 16, "decode_attention", "q", "[num_seqs][num_q_heads][D] fp16");
  check_device_memory(args.out, 16, "decode_attention", "out", "[num_seqs][num_q_heads][D] fp16");
  check_device_memory(args.seqs, alignof(SequenceKvView), "decode_attention", "seqs", "[num_seqs] SequenceKvView");
  const int d = cache.head_dim();
  const size_t rows = static_cast<size_t>(args.num_seqs) * args.num_q_heads * (plan.num_splits + 1);
  DecodeParams p;
  p.q = reinterpret_cast<const __half*>(args.q);
  p.blocks = cache.blocks;
  p.tails = reinterpret_cast<const __half*>(cache.tails);
  p.seqs = args.seqs;
  p.block_tables = args.block_tables;
  p.partial_o = static_cast<float*>(workspace);
  p.partial_ml = reinterpret_cast<float2*>(p.partial_o + rows * d);
  p.num_seqs = args.num_seqs;
  p.num_kv_heads = cache.num_kv_heads;
  p.group = blocks.size;
  p.head_blocks = blocks.count;
  p.tile_blocks = blocks.tile_blocks;
  p.tiles_per_split = plan.tiles_per_split;
  p.num_splits = plan.num_splits;
  p.scale_log2 = args.scale * kLog2e;
  p.rotated = cache.rotated();
  p.out = reinterpret_cast<__half*>(args.out);
  with_tile_format(cache, "decode_attention", [&](auto f) {
    using F = decltype(f);
    p.first_wave_ctas = device_traits().multiprocessors * attention_kernel<F>(blocks.tile_heads()).blocks_per_sm;
    p.tails_in_tile_ctas =
        blocks.tile_blocks == 1 && tails_in_tile_ctas(plan.num_splits, pairs, p.first_wave_ctas);
    const long ctas = p.tails_in_tile_ctas ? tile_ctas : tile_ctas + pairs;
    const AttentionKernel& attention = launch_kernel<F>(blocks.tile_heads(), ctas);
    launch_with_overlap(attention.kernel, dim3(static_cast<unsigned>(ctas)), dim3(kThreads),
                        launch_shared_bytes(ctas, attention), stream, args.overlap_previous_kernel, p);
  });
  if (p.tails_in_tile_ctas) return;  // each pair's CTA wrote its output
  const int num_rows = args.num_seqs * args.num_q_heads;
  int warps_per_row = 1;  // enough warps that each row's partials (the splits and the tail) take one round trip
  while (warps_per_row < kCombineWarps && warps_per_row * kPartsPerTrip < plan.num_splits + 1) warps_per_row *= 2;
  const int rows_per_cta = kCombineWarps / warps_per_row;
  launch_with_overlap(d == 128 ? decode_combine_kernel<128> : decode_combine_kernel<64>,
                      dim3((num_rows + rows_per_cta - 1) / rows_per_cta), dim3(kCombineWarps * 32),
                      warps_per_row > 1 ? kCombineWarps * (d + 2) * sizeof(float) : 0, stream, true,
                      static_cast<const float*>(p.partial_o), static_cast<const float2*>(p.partial_ml), args.seqs,
                      args.num_q_heads, plan.tiles_per_split, plan.num_splits, num_rows, warps_per_row,
                      cache.rotated(), reinterpret_cast<__half*>(args.out));
}

}  // namespace kvarn::cuda
