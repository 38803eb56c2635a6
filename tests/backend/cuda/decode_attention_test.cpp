// decode_attention against float64 attention over what the cache holds: tiles decoded by codec::TileCodec::decode
// (storage space), the fp16 tail, the query rotated in float64, softmax in float64, output rotated back. Budget: per
// sequence, ||out - ref|| / ||ref|| over its q heads <= kRelErrorBudgetCodes (code tiles) or kRelErrorBudgetFp16, and
// per q head as well (kHeadErrorBudgetCodes for code tiles), so that heads a sink dominates cannot hide an error in the
// others'. What the kernel rounds on the way: code tiles, for GQA groups of up to 4 q heads, split the folded query
// q'*a_K*scale into fp16 hi + lo tensor-core operands (~2^-22 relative), for groups of 5-16 round it to fp16 once,
// centred on each tile's largest-scale token (an fp16 query's error; none in a sink's score), and give p*a_V as fp16
// (2^-12); fp16 tiles use the fp16 query and fp16 weights p (2^-12); the fp16 tail is read in fp32; the output is fp16
// (2^-12). Shapes: ragged batches, tails of 0, 1, 64 and G-1 tokens, a sequence with only a tail, an empty one,
// one-tile sequences with a 100x and a 3x attention sink, long sequences split over many CTAs, GQA groups of 1, 3, 4,
// 5, 7 and 8 (both KVarN paths, with and without heads absent from the mma tiles) and past 8 (the KVarN tiles read once
// for the whole group of 9, 10, 12 or 16 with the heads as the mma's rows, every tile shape; the tails and fp16 tiles
// in blocks: 9 as 3 x 3, 10 as 2 x 5, 12 as 2 x 6, 16 as 2 x 8), head_dim 64 and 128, every KVarN preset, the rtn
// ablation (unrotated codes) and the fp16 baseline at its default block size and at 64 tokens; 1, 2, 3 and 8 kv heads
// (Llama-3-8B's 32 q over 8); random K/V with outliers
// and real captured K/V (groups of 4, 8 and 16); the launch overlapping a kernel that writes the queries and tails
// late, and overlapping append_to_tails, which writes each sequence's last tail row. Outputs are poisoned (NaN) before
// each run; tail positions past tail_len hold NaN, and so does the block after each sequence's block table, so that
// reading them fails the test.
#include "backend/cuda/append_to_tails.h"
#include "backend/cuda/decode_attention.h"
#include "backend/cuda/kv_layout.h"
#include "cuda_test_support.h"
#include "delayed_copy.h"
#include "shared_dir.h"
#include "test_kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <utility>

namespace kvarn::cuda {
namespace {

using test::DeviceBuffer;
using test::refused_with;

// Code tiles: beside a 100x sink key, whose score is ~100x the others', an fp16 rounding of the folded query moves
// the sink's weight: by up to 2.3e-2 centred on the channels' zero codes, 5.5e-2 uncentred (10 seeds on the H200).
// The hi + lo split (groups of up to 4) measured at most 3.3e-4 beside a sink, the fp16 query centred on the
// largest-scale token's codes (5-8) 1.5e-3 (10 seeds), and 1.1e-3 over 300-tile sequences of random K/V (1.2e-3 on
// the H200 with fp16 p*a_V), so the budget is 5e-3. fp16 tiles use the fp16 query as given and scale in fp32.
constexpr double kRelErrorBudgetCodes = 5e-3, kRelErrorBudgetFp16 = 3e-3;
// One q head's error over code tiles: beside 30x outlier channels the fp16 roundings above (the folded query for
// groups of 5-16, p a_V for all) move a head whose output is small beside its values by up to 1.4e-2 (groups of
// 5-16) and 5.2e-3 (the hi + lo query of groups of up to 4, unrotated rtn codes) in three runs of the suite on the
// H200, while a sequence's heads pooled stay within 5e-3. A tail left out or a head written wrong moves a head by
// more.
constexpr double kHeadErrorBudgetCodes = 3e-2;

using test::KvSource;
using test::SeqSpec;

// How far a softmax scale off by this factor moves the reference (scale_shift below): a test whose inputs a
// 0.5% scale error cannot move past the budget could not catch one (near-one-hot attention, as beside a sink).
constexpr double kScaleError = 1.005;

// The kernel a check's attention is launched to overlap (DecodeAttentionArgs::overlap_previous_kernel).
enum class Before {
  nothing,     // none: a plain launch
  late_copy,   // the queries and tails are written by a kernel that lets the attention launch at once and writes
               // them late (copy_after_delay), over NaNs
  append_rows  // each sequence's last tail row is written by append_to_tails, over NaNs
};

struct DecodeCase {
  std::string dtype;
  int head_dim, q_heads, kv_heads;
  int block_size = 0;  // fp16 tiles' tokens (0: the engine's default); code tiles have their own
};

// kv(s): keys and values of sequence s, [tokens][kv_heads][D], model space. q: [seqs][q_heads][D]. scale_shift:
// the largest relative distance between the float64 reference and the same with the scale times kScaleError.
// tiles_per_split, tile_heads: as plan_decode_attention takes them. before: the kernel the attention is launched to
// overlap, if any.
void check_decode_plan(const DecodeCase& c, const std::vector<SeqSpec>& specs, const KvSource& kv,
                       const std::vector<float>& q_model, uint32_t seed, double* scale_shift, int tiles_per_split,
                       int tile_heads, Before before) {
  const std::string& dtype_name = c.dtype;
  const int d = c.head_dim, q_heads = c.q_heads, kv_heads = c.kv_heads;
  const int num_seqs = static_cast<int>(specs.size()), group = q_heads / kv_heads;
  std::mt19937 rng(seed);
  test::TestCache cache = test::build_test_cache(dtype_name, d, kv_heads, specs, kv, rng, c.block_size);
  const codec::CacheDtype& dtype = cache.dtype;
  const int g = cache.tile_tokens;
  const auto& stored_k = cache.stored_k;
  const auto& stored_v = cache.stored_v;

  DeviceBuffer<uint8_t> dblocks(cache.blocks);
  DeviceBuffer<uint16_t> dtails(cache.tails), dq(test::to_half(q_model));
  DeviceBuffer<uint16_t> dout(q_model.size());
  DeviceBuffer<int32_t> dtables(cache.tables);
  DeviceBuffer<SequenceKvView> dviews(cache.views);
  const KvCacheLayer layer = make_kv_cache_layer(dtype, d, g, kv_heads, dblocks.get(), dtails.get());
  std::vector<int> seq_tiles;
  for (const SeqSpec& spec : specs) seq_tiles.push_back(spec.tiles);
  const DecodeAttentionPlan plan = plan_decode_attention(layer, seq_tiles, q_heads, tiles_per_split, tile_heads);
  DeviceBuffer<uint8_t> workspace(plan.workspace_bytes);
  workspace.poison();
  dout.poison();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  cudaStream_t stream;
  KVARN_CUDA_CHECK(cudaStreamCreate(&stream));  // after the uploads and poisoning on the legacy stream
  const bool late_copy = before == Before::late_copy;
  DeviceBuffer<uint16_t> late_tails(late_copy ? cache.tails.size() : 0), late_q(late_copy ? q_model.size() : 0);
  if (late_copy) {
    KVARN_CUDA_CHECK(cudaMemcpy(late_tails.get(), dtails.get(), 2 * cache.tails.size(), cudaMemcpyDeviceToDevice));
    KVARN_CUDA_CHECK(cudaMemcpy(late_q.get(), dq.get(), 2 * q_model.size(), cudaMemcpyDeviceToDevice));
    dtails.poison();
    dq.poison();
    test::copy_after_delay({{dq.get(), late_q.get(), 2 * q_model.size()},
                            {dtails.get(), late_tails.get(), 2 * cache.tails.size()}},
                           200'000, stream);
  }
  // Appended rows: each sequence's last tail row, given in the model space (the stored row rotated back), over NaNs.
  std::vector<TailAppendRow> appended;
  std::vector<float> append_k, append_v;
  auto tail_row = [&](int slot, int which, int h, int t) {
    return ((static_cast<size_t>(slot) * 2 + which) * kv_heads + h) * g * d + static_cast<size_t>(t) * d;
  };
  if (before == Before::append_rows) {
    std::vector<uint16_t> poisoned = cache.tails;
    for (int s = 0; s < num_seqs; ++s) {
      if (specs[s].tail == 0) continue;
      const SequenceKvView& view = cache.views[s];
      appended.push_back({view.tail_slot, view.tail_len - 1});
      for (int h = 0; h < kv_heads; ++h)
        for (int which = 0; which < 2; ++which) {
          const size_t at = tail_row(view.tail_slot, which, h, view.tail_len - 1);
          std::vector<double> row(d);
          for (int c = 0; c < d; ++c) row[c] = half_to_float(cache.tails[at + c]), poisoned[at + c] = 0xffff;
          if (dtype.rotated()) test::hadamard_double(row.data(), d);  // its own inverse
          for (int c = 0; c < d; ++c) (which == 0 ? append_k : append_v).push_back(static_cast<float>(row[c]));
        }
    }
    dtails.upload(poisoned);
  }
  DeviceBuffer<uint16_t> dappend_k(append_k.size()), dappend_v(append_v.size());
  DeviceBuffer<TailAppendRow> dappended(appended.size());
  if (!appended.empty()) {
    dappend_k.upload(test::to_half(append_k)), dappend_v.upload(test::to_half(append_v)), dappended.upload(appended);
    append_to_tails(layer, dappend_k.get(), dappend_v.get(), dappended.get(), static_cast<int>(appended.size()),
                    stream);
  }
  decode_attention(
      layer, {dq.get(), dout.get(), dviews.get(), dtables.get(), num_seqs, q_heads, scale, before != Before::nothing},
      plan, workspace.get(), stream);
  KVARN_CUDA_CHECK(cudaStreamSynchronize(stream));
  KVARN_CUDA_CHECK(cudaStreamDestroy(stream));
  const auto out = test::to_float(dout.download());
  // The reference holds what the append wrote (its rounding is append_to_tails' test's to check).
  const std::vector<uint16_t> tails_after = appended.empty() ? std::vector<uint16_t>{} : dtails.download();
  for (int s = 0, i = 0; s < num_seqs && !appended.empty(); ++s) {
    if (specs[s].tail == 0) continue;
    const size_t token = static_cast<size_t>(specs[s].tiles) * g + specs[s].tail - 1;
    for (int h = 0; h < kv_heads; ++h)
      for (int c = 0; c < d; ++c) {
        cache.stored_k[s][h][token * d + c] = half_to_float(tails_after[tail_row(appended[i].tail_slot, 0, h,
                                                                                  appended[i].position) + c]);
        cache.stored_v[s][h][token * d + c] = half_to_float(tails_after[tail_row(appended[i].tail_slot, 1, h,
                                                                                  appended[i].position) + c]);
      }
    ++i;
  }

  const double budget = dtype.code_tile() ? kRelErrorBudgetCodes : kRelErrorBudgetFp16;
  const double head_budget = dtype.code_tile() ? kHeadErrorBudgetCodes : kRelErrorBudgetFp16;
  double worst = 0, worst_head = 0, largest_shift = 0;
  for (int s = 0; s < num_seqs; ++s) {
    const int tokens = specs[s].tiles * g + specs[s].tail;
    double seq_err2 = 0, seq_shift2 = 0, seq_ref2 = 0;
    for (int h = 0; h < q_heads; ++h) {
      const int kvh = h / group;
      std::vector<double> qr(d), o(d, 0.0), o_shifted(d, 0.0);
      for (int c = 0; c < d; ++c)
        qr[c] = half_to_float(float_to_half(q_model[(static_cast<size_t>(s) * q_heads + h) * d + c]));
      if (dtype.rotated()) test::hadamard_double(qr.data(), d);
      std::vector<double> scores(tokens);
      double mx = -INFINITY, sum = 0;
      for (int t = 0; t < tokens; ++t) {
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += qr[c] * stored_k[s][kvh][static_cast<size_t>(t) * d + c];
        scores[t] = dot * scale;
        mx = std::max(mx, scores[t]);
      }
      std::vector<double> shifted(tokens);
      double sum_shifted = 0;
      for (int t = 0; t < tokens; ++t) {
        sum_shifted += shifted[t] = std::exp((scores[t] - mx) * kScaleError);
        sum += scores[t] = std::exp(scores[t] - mx);
      }
      for (int t = 0; t < tokens; ++t)
        for (int c = 0; c < d; ++c) {
          const double v = stored_v[s][kvh][static_cast<size_t>(t) * d + c];
          o[c] += scores[t] / sum * v;
          o_shifted[c] += shifted[t] / sum_shifted * v;
        }
      if (dtype.rotated()) test::hadamard_double(o.data(), d), test::hadamard_double(o_shifted.data(), d);
      double err2 = 0, shift2 = 0, ref2 = 0;
      for (int c = 0; c < d; ++c) {
        const double got = out[(static_cast<size_t>(s) * q_heads + h) * d + c];
        ASSERT_TRUE(std::isfinite(got)) << "seq " << s << " head " << h << " channel " << c << " not written, seed "
                                        << seed;
        err2 += (got - o[c]) * (got - o[c]);
        shift2 += (o_shifted[c] - o[c]) * (o_shifted[c] - o[c]);
        ref2 += o[c] * o[c];
      }
      if (tokens == 0) {
        EXPECT_EQ(err2, 0.0) << "an empty sequence must give zeros (seq " << s << " head " << h << ")";
        continue;
      }
      const double rel = std::sqrt(err2 / ref2);
      worst_head = std::max(worst_head, rel);
      EXPECT_LE(rel, head_budget) << dtype_name << " seq " << s << " (" << specs[s].tiles << " tiles, tail "
                                  << specs[s].tail << ") q head " << h << ", seed " << seed;
      seq_err2 += err2, seq_shift2 += shift2, seq_ref2 += ref2;
    }
    if (tokens == 0) continue;
    const double rel = std::sqrt(seq_err2 / seq_ref2);
    worst = std::max(worst, rel);
    largest_shift = std::max(largest_shift, std::sqrt(seq_shift2 / seq_ref2));
    EXPECT_LE(rel, budget) << dtype_name << " seq " << s << " (" << specs[s].tiles << " tiles, tail "
                           << specs[s].tail << "), seed " << seed;
  }
  std::printf("  %s D=%d G=%d q/kv %d/%d (%d per tile CTA): worst relative error %.2e (of a q head %.2e) over %d "
              "sequences (%d splits of %d tiles); a scale off by 0.5%% moves the reference by up to %.2e\n",
              dtype_name.c_str(), d, g, q_heads, kv_heads, plan.tile_heads, worst, worst_head, num_seqs,
              plan.num_splits, plan.tiles_per_split, largest_shift);
  if (scale_shift) *scale_shift = largest_shift;
}

// check_decode_plan with each way of serving the group that a plan may choose over code tiles (the planner picks by
// the grid): past 8 q heads per kv head, one read of each tile for up to 16 heads and a read per block of up to 8; a
// group of 5-8 that splits in two halves of up to 4, one read for the group and a read per half.
void check_decode(const DecodeCase& c, const std::vector<SeqSpec>& specs, const KvSource& kv,
                  const std::vector<float>& q_model, uint32_t seed, double* scale_shift = nullptr,
                  int tiles_per_split = 0, Before before = Before::nothing) {
  const int group = c.q_heads / c.kv_heads;
  auto largest_divisor = [&](int most) {
    int h = std::min(group, most);
    while (group % h != 0) --h;
    return h;
  };
  std::vector<int> choices = {0};
  if (codec::parse_cache_dtype(c.dtype).code_tile() && largest_divisor(16) > largest_divisor(8))
    choices = {largest_divisor(16), largest_divisor(8)};
  if (codec::parse_cache_dtype(c.dtype).code_tile() && group > 4 && group <= 8 && 2 * largest_divisor(4) == group)
    choices = {group, group / 2};
  for (const int tile_heads : choices) {
    SCOPED_TRACE("q heads per tile CTA " + std::to_string(tile_heads));
    check_decode_plan(c, specs, kv, q_model, seed, scale_shift, tiles_per_split, tile_heads, before);
  }
}

class DecodeTest : public ::testing::TestWithParam<DecodeCase> {};

// check_decode over keys and values from the synthetic generator (sinks, outlier channels), per kv-head, and
// queries of N(0, 1.5^2).
void check_decode_on_synthetic_kv(const DecodeCase& c, const std::vector<SeqSpec>& specs, uint32_t seed,
                                  int tiles_per_split = 0) {
  const KvSource kv = test::synthetic_kv_source(c.kv_heads, c.head_dim, {.seed = seed});
  std::mt19937 rng(seed);
  check_decode(c, specs, kv, test::normal_values(specs.size() * c.q_heads * c.head_dim, 1.5f, rng), seed, nullptr,
               tiles_per_split);
}

// check_decode over keys and values of N(0, 1) per channel and queries of N(0, 2^2): scores with a standard
// deviation of ~2, attention spread over many tokens.
void check_decode_on_normal_kv(const DecodeCase& c, const std::vector<SeqSpec>& specs, uint32_t seed,
                               double* scale_shift = nullptr, int tiles_per_split = 0) {
  std::mt19937 rng(seed);
  const KvSource kv = test::normal_kv_source(c.kv_heads, c.head_dim, rng);
  check_decode(c, specs, kv, test::normal_values(specs.size() * c.q_heads * c.head_dim, 2.0f, rng), seed, scale_shift,
               tiles_per_split);
}

TEST_P(DecodeTest, MatchesFloat64ReferenceOnRaggedBatch) {
  KVARN_SKIP_WITHOUT_GPU();
  const auto& c = GetParam();
  const uint32_t seed = test::test_seed();
  const int g = test::tile_tokens_for(codec::parse_cache_dtype(c.dtype), c.block_size);
  check_decode_on_synthetic_kv(c, {{3, g - 1}, {0, 1}, {1, 0}, {17, 64}, {0, 0}, {5, 1}, {2, 127 % g}, {40, 33}},
                               seed);
}

// 250 sequences of 0-3 tiles (every fifth none, one of them empty) and tails of every length: with 2 kv heads, 500
// pairs, more than one wave of CTAs on any Hopper GPU with the tail CTAs.
std::vector<SeqSpec> several_waves_batch(int tile_tokens) {
  std::vector<SeqSpec> specs;
  for (int s = 0; s < 250; ++s) specs.push_back({s % 5 == 0 ? 0 : 1 + s % 3, (5 * s) % tile_tokens});
  return specs;
}

// The KVarN CTAs of the launch's first wave ask for their first tile's values behind its keys, the later ones for
// both halves at once. At 1 tile per split the tails have CTAs of their own; at 3, one split per pair, the grid
// has none where they would take it past a wave (tails_in_tile_ctas; 2 kv heads do on every Hopper GPU), and each
// pair's CTA reads its tail after its tiles (alone where there are none). For groups of 5-8 at D = G = 128 these
// grids run the kernel bounded for 3 CTAs per SM; grids that fit at 2 per SM, as most others here, run its twin
// bounded for 2 (launch_kernel, decode_attention.cu).
TEST_P(DecodeTest, MatchesFloat64ReferenceOnAGridOfSeveralWaves) {
  KVARN_SKIP_WITHOUT_GPU();
  const auto& c = GetParam();
  const uint32_t seed = test::test_seed();
  const int g = test::tile_tokens_for(codec::parse_cache_dtype(c.dtype), c.block_size);
  for (const int tiles_per_split : {1, 3}) {
    SCOPED_TRACE("tiles per split " + std::to_string(tiles_per_split));
    check_decode_on_synthetic_kv(c, several_waves_batch(g), seed, tiles_per_split);
  }
}

// The case that an fp16 folded query fails: one-tile sequences whose first token is a 100x sink (key and value),
// so that its score is ~100x the others' and so is its rounding error; also with a tail behind the tile. And a 3x
// sink: the largest-scale token centres the fp16 query's rounding however small its lead.
TEST_P(DecodeTest, ResolvesScoresBesideAnAttentionSink) {
  KVARN_SKIP_WITHOUT_GPU();
  const auto& c = GetParam();
  const uint32_t seed = test::test_seed();
  const int g = test::tile_tokens_for(codec::parse_cache_dtype(c.dtype), c.block_size);
  std::vector<SeqSpec> specs(12, SeqSpec{1, 0});
  specs.push_back({1, g / 2});
  specs.push_back({2, 0});
  for (const float sink : {100.0f, 3.0f}) {
    const KvSource kv =
        test::synthetic_kv_source(c.kv_heads, c.head_dim, {.sink_min = sink, .sink_max = sink, .seed = seed});
    std::mt19937 rng(seed);
    check_decode(c, specs, kv, test::normal_values(specs.size() * c.q_heads * c.head_dim, 1.5f, rng), seed);
  }
}

// Spread attention (scores with a standard deviation of ~2 over ~40K tokens): also where a wrong softmax scale
// shows, which the sink-dominated synthetic inputs hide.
TEST_P(DecodeTest, SplitsALongContextAcrossManyCtas) {
  KVARN_SKIP_WITHOUT_GPU();
  const auto& c = GetParam();
  double scale_shift = 0;
  check_decode_on_normal_kv(c, {{300, 5}, {77, 0}}, test::test_seed(), &scale_shift);
  const bool codes = codec::parse_cache_dtype(c.dtype).code_tile();
  EXPECT_GT(scale_shift, codes ? kRelErrorBudgetCodes : kRelErrorBudgetFp16)
      << "a softmax scale off by " << kScaleError << " would pass this test";
}

// check_decode on synthetic K/V, the attention launched to overlap the kernel `before`: a ragged batch (tails of 0,
// 1, 33, 64 and G-1 tokens, one sequence empty) whose tails have CTAs of their own, and the several waves' batch at
// one split per pair, whose tails are read by the tile CTAs.
void check_decode_overlapping(const DecodeCase& c, Before before) {
  const uint32_t seed = test::test_seed();
  const int g = test::tile_tokens_for(codec::parse_cache_dtype(c.dtype), c.block_size);
  const KvSource kv = test::synthetic_kv_source(c.kv_heads, c.head_dim, {.seed = seed});
  std::mt19937 rng(seed);
  const std::vector<SeqSpec> ragged = {{3, g - 1}, {0, 1}, {1, 0}, {17, 64}, {0, 0}, {40, 33}};
  for (const auto& [specs, tiles_per_split] : {std::pair{ragged, 0}, std::pair{several_waves_batch(g), 3}}) {
    SCOPED_TRACE(std::to_string(specs.size()) + " sequences");
    check_decode(c, specs, kv, test::normal_values(specs.size() * c.q_heads * c.head_dim, 1.5f, rng), seed, nullptr,
                 tiles_per_split, before);
  }
}

// Overlapping the kernel before it (a programmatic dependent launch), the attention reads that kernel's writes, the
// queries and the tails, only after it has ended: written 200 us after the attention could start, over NaNs.
TEST_P(DecodeTest, ReadsQueriesAndTailsOnlyOnceTheKernelItOverlapsHasEnded) {
  KVARN_SKIP_WITHOUT_GPU();
  check_decode_overlapping(GetParam(), Before::late_copy);
}

// A decode step's attention overlaps the kernel that appends the step's K/V rows to the tails (append_to_tails lets
// it launch at once): it reads those rows, written over NaNs, only once they are there.
TEST_P(DecodeTest, ReadsTheTailRowsAppendedByTheKernelItOverlaps) {
  KVARN_SKIP_WITHOUT_GPU();
  check_decode_overlapping(GetParam(), Before::append_rows);
}

// With nothing to read (every sequence empty), a launch overlapping the kernel before it still ends after that
// kernel: the zeros it writes come after that kernel's late writes to the output (the ones of q, 200 us after the
// start).
TEST(DecodeAttention, EndsAfterTheKernelItOverlapsEvenWithNothingToRead) {
  KVARN_SKIP_WITHOUT_GPU();
  const int d = 128, q_heads = 8, kv_heads = 2;
  const std::vector<SeqSpec> specs = {{0, 0}, {0, 0}, {0, 0}};
  std::mt19937 rng(test::test_seed());
  const test::TestCache cache = test::build_test_cache(
      "kvarn_k4v2_g128", d, kv_heads, specs, test::synthetic_kv_source(kv_heads, d, {.seed = 1}), rng);
  DeviceBuffer<uint8_t> dblocks(cache.blocks);
  DeviceBuffer<uint16_t> dtails(cache.tails), dq(test::to_half(std::vector<float>(specs.size() * q_heads * d, 1)));
  DeviceBuffer<uint16_t> dout(dq.size());
  DeviceBuffer<int32_t> dtables(cache.tables);
  DeviceBuffer<SequenceKvView> dviews(cache.views);
  const KvCacheLayer layer = make_kv_cache_layer(cache.dtype, d, cache.tile_tokens, kv_heads, dblocks.get(),
                                                 dtails.get());
  const std::vector<int> seq_tiles(specs.size(), 0);
  const DecodeAttentionPlan plan = plan_decode_attention(layer, seq_tiles, q_heads);
  DeviceBuffer<uint8_t> workspace(plan.workspace_bytes);
  dout.poison();
  cudaStream_t stream;
  KVARN_CUDA_CHECK(cudaStreamCreate(&stream));  // after the uploads and poisoning on the legacy stream
  test::copy_after_delay({{dout.get(), dq.get(), 2 * dout.size()}}, 200'000, stream);  // ones
  const int num_seqs = static_cast<int>(specs.size());
  decode_attention(layer, {dq.get(), dout.get(), dviews.get(), dtables.get(), num_seqs, q_heads, 0.1f, true}, plan,
                   workspace.get(), stream);
  KVARN_CUDA_CHECK(cudaStreamSynchronize(stream));
  KVARN_CUDA_CHECK(cudaStreamDestroy(stream));
  const auto out = test::to_float(dout.download());
  EXPECT_EQ(std::count(out.begin(), out.end(), 0.0f), static_cast<long>(out.size()))
      << "an empty sequence's output must be zeros, written after the overlapped kernel's";
}

// The combine merges each q head's partials (one per split, one for the tail) in rounds of 8 per warp, with up to 8
// warps per head: 2, 10, 18, 34 and 131 partials take 1, 2, 4 and 8 warps, the last of them in 3 rounds.
TEST_P(DecodeTest, CombinesAnyNumberOfSplits) {
  KVARN_SKIP_WITHOUT_GPU();
  const auto& c = GetParam();
  const uint32_t seed = test::test_seed();
  for (const int tiles_per_split : {130, 16, 8, 4, 1}) {
    SCOPED_TRACE("tiles per split " + std::to_string(tiles_per_split));
    check_decode_on_normal_kv(c, {{130, 7}, {9, 0}}, seed, nullptr, tiles_per_split);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Dtypes, DecodeTest,
    ::testing::Values(DecodeCase{"kvarn_k4v2_g128", 128, 8, 2}, DecodeCase{"kvarn_k4v2_g128", 128, 16, 2},
                      DecodeCase{"kvarn_k4v2_g128", 128, 2, 2}, DecodeCase{"kvarn_k4v4_g128", 128, 8, 2},
                      DecodeCase{"kvarn_k4v4_g128", 128, 16, 2}, DecodeCase{"kvarn_k4v2_g64", 128, 8, 2},
                      DecodeCase{"kvarn_k4v4_g64", 128, 16, 2}, DecodeCase{"kvarn_k4v2_g128", 64, 8, 2},
                      DecodeCase{"kvarn_k4v4_g128", 64, 16, 2}, DecodeCase{"kvarn_k4v2_g64", 64, 8, 2},
                      DecodeCase{"kvarn_k4v4_g64", 64, 4, 1}, DecodeCase{"rtn_k4v2_g128", 128, 8, 2},
                      DecodeCase{"fp16", 128, 8, 2}, DecodeCase{"fp16", 128, 16, 2}, DecodeCase{"fp16", 64, 8, 2},
                      DecodeCase{"kvarn_k4v2_g128", 128, 6, 2}, DecodeCase{"kvarn_k4v2_g128", 128, 10, 2},
                      DecodeCase{"kvarn_k4v2_g128", 64, 14, 2}, DecodeCase{"kvarn_k4v2_g128", 128, 32, 2},
                      DecodeCase{"kvarn_k4v2_g128", 128, 24, 2}, DecodeCase{"fp16", 128, 32, 2},
                      DecodeCase{"kvarn_k4v4_g64", 64, 18, 2}, DecodeCase{"kvarn_k4v4_g128", 128, 32, 2},
                      DecodeCase{"kvarn_k4v2_g64", 128, 32, 2}, DecodeCase{"kvarn_k4v2_g128", 64, 32, 2},
                      DecodeCase{"kvarn_k4v2_g128", 128, 20, 2}, DecodeCase{"fp16", 64, 8, 2, 64},
                      DecodeCase{"fp16", 128, 8, 2, 64}, DecodeCase{"fp16", 64, 24, 2},
                      DecodeCase{"kvarn_k4v4_g64", 128, 8, 2}, DecodeCase{"kvarn_k4v4_g64", 128, 32, 2},
                      DecodeCase{"kvarn_k4v4_g128", 64, 4, 2}, DecodeCase{"kvarn_k4v4_g128", 64, 32, 2},
                      DecodeCase{"kvarn_k4v2_g64", 64, 16, 2}, DecodeCase{"kvarn_k4v4_g64", 64, 16, 2},
                      DecodeCase{"kvarn_k4v2_g128", 128, 32, 8}, DecodeCase{"kvarn_k4v2_g128", 128, 24, 3},
                      DecodeCase{"fp16", 128, 32, 8}, DecodeCase{"kvarn_k4v2_g128", 128, 12, 2}),
    [](const auto& info) {
      return info.param.dtype + "_d" + std::to_string(info.param.head_dim) + "_q" +
             std::to_string(info.param.q_heads) + "_kv" + std::to_string(info.param.kv_heads) +
             (info.param.block_size ? "_block" + std::to_string(info.param.block_size) : "");
    });

// The benchmark times the planner's alternatives through a fixed split size: taken as given, at most the longest
// sequence's tiles, with the splits and the workspace to match.
TEST(DecodePlan, TakesAFixedSplitSize) {
  KVARN_SKIP_WITHOUT_GPU();
  const KvCacheLayer layer =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 8, nullptr, nullptr);
  const std::vector<int> seq_tiles(8, 255);
  const DecodeAttentionPlan chosen = plan_decode_attention(layer, seq_tiles, 64);
  const DecodeAttentionPlan fixed = plan_decode_attention(layer, seq_tiles, 64, 43);
  EXPECT_EQ(fixed.tiles_per_split, 43);
  EXPECT_EQ(fixed.num_splits, 6);
  EXPECT_EQ(fixed.workspace_bytes, size_t{8} * 64 * 7 * (128 * sizeof(float) + sizeof(float2)));
  const DecodeAttentionPlan whole = plan_decode_attention(layer, seq_tiles, 64, 1000);
  EXPECT_EQ(whole.tiles_per_split, 255);
  EXPECT_EQ(whole.num_splits, 1);
  EXPECT_EQ(plan_decode_attention(layer, seq_tiles, 64, 0).tiles_per_split, chosen.tiles_per_split);
}

// A group past 8 q heads per kv head over code tiles (Qwen3-235B: 64 q heads over 4 kv heads) is read once per tile
// for all 16 where the grid gives each warp of the wave a few tiles, and per block of 8 in a small grid, where twice
// the warps per tile finish sooner; fp16 tiles always in blocks of 8. A fixed choice is taken as given.
TEST(DecodePlan, ReadsATileOnceForAGroupOf16WhereTheGridIsLarge) {
  KVARN_SKIP_WITHOUT_GPU();
  const KvCacheLayer codes =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 4, nullptr, nullptr);
  const KvCacheLayer fp16 = make_kv_cache_layer(codec::parse_cache_dtype("fp16"), 128, 128, 4, nullptr, nullptr);
  const std::vector<int> small(1, 63), large(32, 255);
  EXPECT_EQ(plan_decode_attention(codes, small, 64).tile_heads, 8);
  EXPECT_EQ(plan_decode_attention(codes, large, 64).tile_heads, 16);
  EXPECT_EQ(plan_decode_attention(codes, small, 64, 0, 16).tile_heads, 16);
  EXPECT_EQ(plan_decode_attention(codes, large, 64, 0, 8).tile_heads, 8);
  EXPECT_EQ(plan_decode_attention(fp16, large, 64).tile_heads, 8);
  EXPECT_EQ(plan_decode_attention(codes, large, 16).tile_heads, 4);
}

// A group of 8 q heads per kv head over code tiles (Qwen3-32B: 64 over 8) is served per half of 4 heads, each tile
// read twice, where the halves' reads would leave at least 3 in 4 warps of a wave idle (batch 1 x 1K, 3 x 1K), and
// by one read of each tile otherwise (4 x 1K, 1 x 4K); a group of 6 likewise in halves of 3. fp16 tiles, and groups
// that do not split in two halves of up to 4, are not. A fixed choice is taken as given.
TEST(DecodePlan, ServesAGroupOf8InHalvesWhereTheGridIsTiny) {
  KVARN_SKIP_WITHOUT_GPU();
  const KvCacheLayer codes =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 8, nullptr, nullptr);
  const KvCacheLayer fp16 = make_kv_cache_layer(codec::parse_cache_dtype("fp16"), 128, 128, 8, nullptr, nullptr);
  const std::vector<int> one_1k(1, 7), three_1k(3, 7), four_1k(4, 7), one_4k(1, 31);
  EXPECT_EQ(plan_decode_attention(codes, one_1k, 64).tile_heads, 4);
  EXPECT_EQ(plan_decode_attention(codes, three_1k, 64).tile_heads, 4);
  EXPECT_EQ(plan_decode_attention(codes, four_1k, 64).tile_heads, 8);
  EXPECT_EQ(plan_decode_attention(codes, one_4k, 64).tile_heads, 8);
  EXPECT_EQ(plan_decode_attention(codes, one_1k, 48).tile_heads, 3);
  EXPECT_EQ(plan_decode_attention(codes, one_1k, 56).tile_heads, 7);
  EXPECT_EQ(plan_decode_attention(codes, one_1k, 32).tile_heads, 4);
  EXPECT_EQ(plan_decode_attention(fp16, one_1k, 64).tile_heads, 8);
  EXPECT_EQ(plan_decode_attention(codes, one_1k, 64, 0, 8).tile_heads, 8);
  EXPECT_EQ(plan_decode_attention(codes, one_4k, 64, 0, 4).tile_heads, 4);
}

// Argument checks that throw before anything is launched (so they run without a GPU): the q heads per tile CTA that
// a plan is asked for must be one of the ways it can serve the group.
TEST(DecodePlan, RefusesQueryHeadsPerTileCtaThatDoNotServeTheGroup) {
  const KvCacheLayer codes =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 4, nullptr, nullptr);
  const KvCacheLayer fp16 = make_kv_cache_layer(codec::parse_cache_dtype("fp16"), 128, 128, 4, nullptr, nullptr);
  const std::vector<int> seq_tiles = {3};
  for (const auto& [layer, tile_heads, expected] :
       {std::tuple{&codes, 12, "12 q heads per tile CTA for groups of 16; expected 8 or 16"},
        std::tuple{&fp16, 16, "16 q heads per tile CTA for groups of 16; expected 8 (or 0"}}) {
    EXPECT_THAT([&] { plan_decode_attention(*layer, seq_tiles, 64, 0, tile_heads); }, refused_with(expected));
  }
  for (const auto& [layer, tile_heads, expected] :
       {std::tuple{&codes, 2, "2 q heads per tile CTA for groups of 8; expected 4 or 8 (or 0"},
        std::tuple{&fp16, 4, "4 q heads per tile CTA for groups of 8; expected 8 (or 0"}}) {
    EXPECT_THAT([&] { plan_decode_attention(*layer, seq_tiles, 32, 0, tile_heads); }, refused_with(expected));
  }
}

// Argument checks that throw before anything is launched (so they run without a GPU): the q heads must be a
// positive multiple of the kv heads, for the plan as for the call.
TEST(DecodeAttention, RefusesQueryHeadsThatAreNotAPositiveMultipleOfKvHeads) {
  const KvCacheLayer layer =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 2, nullptr, nullptr);
  const std::vector<int> seq_tiles = {1};
  for (const int q_heads : {3, 0}) {
    DecodeAttentionArgs args;
    args.num_seqs = 1;
    args.num_q_heads = q_heads;
    const std::string expected = std::to_string(q_heads) + " q heads over 2 kv heads; expected a positive multiple";
    EXPECT_THAT([&] { plan_decode_attention(layer, seq_tiles, q_heads); }, refused_with(expected)) << "the plan";
    EXPECT_THAT([&] { decode_attention(layer, args, DecodeAttentionPlan{}, nullptr, nullptr); },
                refused_with(expected))
        << "the call";
  }
}

// A sequence's full tiles are a count: a negative one is refused before the plan sizes anything by it.
TEST(DecodePlan, RefusesANegativeTileCount) {
  const KvCacheLayer layer =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 8, nullptr, nullptr);
  EXPECT_THAT([&] { plan_decode_attention(layer, std::vector<int>{3, -1}, 32); },
              refused_with("sequence 1 has -1 full tiles"));
}

// A fixed split size or tile CTA size is a count or 0 (the planner's choice): a negative one is refused rather than
// taken as the planner's choice.
TEST(DecodePlan, RefusesANegativeSplitSizeOrTileHeads) {
  const KvCacheLayer layer =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 2, nullptr, nullptr);
  EXPECT_THAT([&] { plan_decode_attention(layer, std::vector<int>{3}, 8, -1); },
              refused_with("plan_decode_attention: tiles_per_split -1; expected > 0, or 0 for the planner's choice"));
  EXPECT_THAT([&] { plan_decode_attention(layer, std::vector<int>{3}, 8, 0, -4); },
              refused_with("plan_decode_attention: -4 q heads per tile CTA for groups of 4; expected 4"));
}

// The softmax scale and the arrays are checked after the shapes and the plan: a scale left at its default 0 (every
// key weighted alike) is refused, and so are null arrays and ones the kernels' 16-byte accesses would fault on. The
// plan is written out here as plan_decode_attention makes it (which reads the GPU): 2 sequences x 8 q heads over 2
// kv heads, one split of a tile, 4 q heads per tile CTA; the addresses are never read.
TEST(DecodeAttention, RefusesANonPositiveScaleAndNullOrMisalignedArrays) {
  const KvCacheLayer layer =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 2, nullptr, nullptr);
  DecodeAttentionPlan plan;
  plan.num_seqs = 2, plan.num_q_heads = 8, plan.tile_heads = 4, plan.tiles_per_split = 1, plan.num_splits = 1;
  plan.workspace_bytes = size_t{2} * 8 * 2 * (128 * sizeof(float) + sizeof(float2));
  const auto address = [](uintptr_t offset) { return test::fake_device_address<uint16_t>(offset); };
  DecodeAttentionArgs valid;
  valid.q = address(0), valid.out = address(0), valid.seqs = reinterpret_cast<const SequenceKvView*>(address(0));
  valid.num_seqs = 2, valid.num_q_heads = 8, valid.scale = 0.0884f;
  using Change = std::function<void(DecodeAttentionArgs&, void*&)>;
  const std::string fp16_rows = "expected device memory of [num_seqs][num_q_heads][D] fp16";
  const std::pair<Change, std::string> cases[] = {
      {[](auto& a, auto&) { a.scale = 0; },
       "decode_attention: scale 0; expected a finite softmax scale > 0 (1/sqrt(D) = 0.0883883 for the Llama family)"},
      {[](auto& a, auto&) { a.scale = -0.0884f; }, "decode_attention: scale -0.0884; expected a finite softmax"},
      {[](auto& a, auto&) { a.scale = NAN; }, "decode_attention: scale nan; expected a finite softmax"},
      {[](auto& a, auto&) { a.scale = INFINITY; }, "decode_attention: scale inf; expected a finite softmax"},
      {[](auto&, void*& w) { w = nullptr; },
       "decode_attention: workspace is null; expected device memory of plan.workspace_bytes (16640 bytes)"},
      {[&](auto&, void*& w) { w = address(8); }, "decode_attention: workspace at 0x10008 is not 16-byte aligned"},
      {[](auto& a, auto&) { a.q = nullptr; }, "decode_attention: q is null; " + fp16_rows},
      {[&](auto& a, auto&) { a.q = address(2); },
       "decode_attention: q at 0x10002 is not 16-byte aligned; " + fp16_rows},
      {[](auto& a, auto&) { a.out = nullptr; }, "decode_attention: out is null; " + fp16_rows},
      {[&](auto& a, auto&) { a.out = address(4); }, "decode_attention: out at 0x10004 is not 16-byte aligned"},
      {[](auto& a, auto&) { a.seqs = nullptr; },
       "decode_attention: seqs is null; expected device memory of [num_seqs] SequenceKvView"},
  };
  for (const auto& [change, expected] : cases) {
    DecodeAttentionArgs args = valid;
    void* workspace = address(0);
    change(args, workspace);
    EXPECT_THAT([&] { decode_attention(layer, args, plan, workspace, nullptr); }, refused_with(expected));
  }
}

// A plan serves the sequences and q heads it was made for: its splits cover their tiles and its workspace their
// partials. Another batch is refused before anything is launched.
TEST(DecodeAttention, RefusesAPlanMadeForOtherSequences) {
  const KvCacheLayer layer =
      make_kv_cache_layer(codec::parse_cache_dtype("kvarn_k4v2_g128"), 128, 128, 2, nullptr, nullptr);
  DecodeAttentionPlan plan;
  plan.num_seqs = 2, plan.num_q_heads = 8;
  for (const auto& [seqs, q_heads] : {std::pair{3, 8}, std::pair{2, 4}}) {
    DecodeAttentionArgs args;
    args.num_seqs = seqs, args.num_q_heads = q_heads;
    EXPECT_THAT([&] { decode_attention(layer, args, plan, nullptr, nullptr); },
                refused_with("a plan for 2 sequences x 8 q heads, called with " + std::to_string(seqs) + " x " +
                             std::to_string(q_heads)));
  }
}

// A plan carries its cache's shape: its splits, the q heads one read of a tile serves and a workspace sized by the
// head_dim. One made for another cache (here: the same batch over a cache of D = 64, or of code tiles read once for
// a group of 16) is refused before anything is launched, rather than writing past its workspace.
TEST(DecodeAttention, RefusesAPlanMadeForAnotherCache) {
  const auto layer = [](const char* dtype, int d) {
    return make_kv_cache_layer(codec::parse_cache_dtype(dtype), d, 128, 2, nullptr, nullptr);
  };
  DecodeAttentionPlan for_d64;  // 2 sequences x 32 q heads, 3 splits of 4 tiles, blocks of 8, at D = 64
  for_d64.num_seqs = 2, for_d64.num_q_heads = 32, for_d64.tile_heads = 8, for_d64.tiles_per_split = 4;
  for_d64.num_splits = 3, for_d64.workspace_bytes = size_t{2} * 32 * 4 * (64 * sizeof(float) + sizeof(float2));
  DecodeAttentionPlan read_once = for_d64;  // one read of each code tile for the group of 16
  read_once.tile_heads = 16, read_once.workspace_bytes *= 2;
  for (const auto& [plan, cache, expected] :
       {std::tuple{for_d64, layer("kvarn_k4v2_g128", 128),
                   "3 splits of 4 tiles, 8 q heads per tile CTA and 67584 bytes of workspace, for a cache of code "
                   "tiles of head_dim 128"},
        std::tuple{read_once, layer("fp16", 64), "16 q heads per tile CTA"}}) {
    DecodeAttentionArgs args;
    args.num_seqs = 2, args.num_q_heads = 32;
    EXPECT_THAT([&] { decode_attention(cache, args, plan, nullptr, nullptr); }, refused_with(expected));
  }
}

// A plan kept from an earlier step (a captured decode step replayed while the contexts grow) may have fewer splits
// than a sequence now needs: its last split reads the tiles past the plan's, so that the output is the one a plan
// of these sequences gives (up to the order of the merges). With a combine and its partials, without one (250
// sequences: one split per pair over more pairs than a wave holds, each pair's CTA writing its output), and from a
// plan made when every sequence was still in its tail.
TEST(DecodeAttention, ReadsEveryTileOfASequenceThatOutgrewItsPlan) {
  KVARN_SKIP_WITHOUT_GPU();
  const int d = 128, q_heads = 8, kv_heads = 2;
  struct Case {
    std::vector<SeqSpec> specs;
    std::vector<int> planned;  // each sequence's full tiles when the plan was made
    int tiles_per_split;
  };
  std::vector<Case> cases = {{{{20, 5}, {1, 3}}, {4, 1}, 2}, {{{3, 10}, {0, 5}}, {0, 0}, 0}};
  cases.push_back({std::vector<SeqSpec>(250, SeqSpec{1, 3}), std::vector<int>(250, 1), 0});
  cases.back().specs[0] = {20, 5};
  const uint32_t seed = test::test_seed();
  for (const Case& c : cases) {
    const int num_seqs = static_cast<int>(c.specs.size());
    SCOPED_TRACE(std::to_string(num_seqs) + " sequences, seed " + std::to_string(seed));
    std::mt19937 rng(seed);
    const test::TestCache cache = test::build_test_cache(
        "kvarn_k4v2_g128", d, kv_heads, c.specs, test::synthetic_kv_source(kv_heads, d, {.seed = seed}), rng);
    DeviceBuffer<uint8_t> dblocks(cache.blocks);
    DeviceBuffer<uint16_t> dtails(cache.tails);
    DeviceBuffer<uint16_t> dq(test::to_half(test::normal_values(size_t{1} * num_seqs * q_heads * d, 1.5f, rng)));
    DeviceBuffer<int32_t> dtables(cache.tables);
    DeviceBuffer<SequenceKvView> dviews(cache.views);
    const KvCacheLayer layer =
        make_kv_cache_layer(cache.dtype, d, cache.tile_tokens, kv_heads, dblocks.get(), dtails.get());
    auto attend = [&](const DecodeAttentionPlan& plan) {
      DeviceBuffer<uint16_t> dout(dq.size());
      DeviceBuffer<uint8_t> workspace(plan.workspace_bytes);
      workspace.poison();
      dout.poison();
      decode_attention(layer, {dq.get(), dout.get(), dviews.get(), dtables.get(), num_seqs, q_heads, 0.1f, false},
                       plan, workspace.get(), nullptr);
      KVARN_CUDA_CHECK(cudaDeviceSynchronize());
      return test::to_float(dout.download());
    };
    std::vector<int> seq_tiles;
    for (const SeqSpec& spec : c.specs) seq_tiles.push_back(spec.tiles);
    const auto kept = attend(plan_decode_attention(layer, c.planned, q_heads, c.tiles_per_split));
    const auto fresh = attend(plan_decode_attention(layer, seq_tiles, q_heads));
    for (int row = 0; row < num_seqs * q_heads; ++row) {
      double diff2 = 0, ref2 = 0;
      for (int i = row * d; i < (row + 1) * d; ++i)
        diff2 += (kept[i] - fresh[i]) * (kept[i] - fresh[i]), ref2 += fresh[i] * fresh[i];
      EXPECT_LE(std::sqrt(diff2 / ref2), 2e-3) << "sequence " << row / q_heads << " q head " << row % q_heads;
    }
  }
}

// A kernel's opt-in shared memory, its occupancy and the device's properties are per device: a process that drives
// several GPUs (tensor parallelism) runs the kernels on each, the last device first (the suite's earlier tests ran
// on device 0), for each KVarN path of D = 128 and fp16. Needs 2 GPUs.
TEST(DecodeAttention, RunsOnEveryDeviceOfTheProcess) {
  KVARN_SKIP_WITHOUT_GPU();
  const uint32_t seed = test::test_seed();
  test::on_every_device([&] {
    for (const DecodeCase& c : {DecodeCase{"kvarn_k4v2_g128", 128, 2, 2}, DecodeCase{"kvarn_k4v2_g128", 128, 16, 2},
                                DecodeCase{"kvarn_k4v2_g128", 128, 32, 2}, DecodeCase{"fp16", 128, 8, 2}})
      check_decode_on_synthetic_kv(c, {{3, 100}, {0, 1}, {17, 64}, {1, 0}}, seed);
  });
}

TEST(DecodeCapturedKv, MatchesFloat64ReferenceOnRealKeysAndValues) {
  KVARN_SKIP_WITHOUT_GPU();
  const auto captured =
      test::load_captured_kv((kvarn::test::shared_dir() / "golden/kvarn-test-lm/kv_capture.safetensors").string());
  if (captured.empty()) GTEST_SKIP() << "kv_capture.safetensors not found under " << kvarn::test::shared_dir();
  const uint32_t seed = test::test_seed();
  for (const std::string layer : {"layer0", "layer4", "layer7"}) {
    const auto& ck = captured.at(layer + ".k");
    const auto& cv = captured.at(layer + ".v");
    const int kv_heads = ck.shape[0], d = ck.shape[2];
    const KvSource kv = test::captured_kv_source(ck, cv);
    const std::vector<SeqSpec> specs = {{16, 0}, {7, 104}, {1, 1}, {0, 127}};
    for (const int group : {4, 8, 16}) {  // the KVarN kernels' hi + lo query, fp16 query, heads as rows
      const int q_heads = group * kv_heads;
      std::mt19937 rng(seed);
      const std::vector<float> q = test::captured_queries(ck, static_cast<int>(specs.size()), q_heads, rng);
      for (const char* dtype : {"kvarn_k4v2_g128", "kvarn_k4v4_g128", "fp16"})
        check_decode({dtype, d, q_heads, kv_heads}, specs, kv, q, seed);
    }
  }
}

}  // namespace
}  // namespace kvarn::cuda
