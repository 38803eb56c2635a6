// CPU attention over a sequence's quantized tiles plus its fp16 tail, reading tiles as the spec prescribes:
// the per-channel key scales are folded into the query once per tile, so the inner loops multiply raw codes.
//   score[t] = s_tok[t] * (sum_c (q[c] * a_K[c]) * code[c][t] + sum_c q[c] * z_K[c])
//   o'[c]   += s_ch[c] * (sum_t (p[t] * a_V[t]) * code[t][c] + sum_t p[t] * z_V[t])
// Plain tiles (fp16, fp8, the tail) take the same path with unit scales. Work is split over (sequence, kv-head):
// each tile is unpacked once and serves every query row and every q head of the group (GQA).
#include "backend/cpu/cpu_backend.h"

#include "codec/hadamard.h"
#include "codec/rtn.h"
#include "util/half.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace kvarn::backend {

namespace {

std::vector<float> halves(const uint8_t* src, int n) {
  std::vector<float> out(n);
  for (int i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    out[i] = half_to_float(h);
  }
  return out;
}

// Keys of one tile: codes [D][tokens] channel-major, with their folded scales.
struct TileKeys {
  int tokens = 0;
  std::vector<float> codes, a, z, s_tok;

  void load_codes(const uint8_t* tile, const codec::TileLayout& l) {
    tokens = l.tokens;
    codes.resize(static_cast<size_t>(l.head_dim) * l.tokens);
    std::vector<uint8_t> row(l.tokens);
    for (int c = 0; c < l.head_dim; ++c) {
      codec::unpack_codes(tile + l.key_codes + c * l.key_row_bytes(), l.tokens, l.key_bits, row.data());
      std::copy(row.begin(), row.end(), codes.begin() + static_cast<size_t>(c) * l.tokens);
    }
    a = halves(tile + l.key_scale, l.head_dim);
    z = halves(tile + l.key_zero, l.head_dim);
    s_tok = halves(tile + l.key_token_scale, l.tokens);
  }

  // rows: [n][D] token-major values.
  void load_plain(const float* rows, int n, int d) {
    tokens = n;
    codes.resize(static_cast<size_t>(d) * n);
    for (int t = 0; t < n; ++t)
      for (int c = 0; c < d; ++c) codes[static_cast<size_t>(c) * n + t] = rows[static_cast<size_t>(t) * d + c];
    a.assign(d, 1.0f);
    z.assign(d, 0.0f);
    s_tok.assign(n, 1.0f);
  }

  // scores[t] = scale * q . k_t for t < tokens.
  void score(const float* q, int d, float scale, float* scores) const {
    float base = 0;
    std::fill(scores, scores + tokens, 0.0f);
    for (int c = 0; c < d; ++c) {
      const float qa = q[c] * a[c];
      base += q[c] * z[c];
      const float* code = codes.data() + static_cast<size_t>(c) * tokens;
      for (int t = 0; t < tokens; ++t) scores[t] += qa * code[t];
    }
    for (int t = 0; t < tokens; ++t) scores[t] = scale * s_tok[t] * (scores[t] + base);
  }
};

// Values of one tile: codes [tokens][D] token-major, with their folded scales.
struct TileValues {
  int tokens = 0;
  std::vector<float> codes, s_ch, a, z;

  void load_codes(const uint8_t* tile, const codec::TileLayout& l) {
    tokens = l.tokens;
    codes.resize(static_cast<size_t>(l.head_dim) * l.tokens);
    std::vector<uint8_t> row(l.head_dim);
    for (int t = 0; t < l.tokens; ++t) {
      codec::unpack_codes(tile + l.value_codes + t * l.value_row_bytes(), l.head_dim, l.value_bits, row.data());
      std::copy(row.begin(), row.end(), codes.begin() + static_cast<size_t>(t) * l.head_dim);
    }
    s_ch = halves(tile + l.value_channel_scale, l.head_dim);
    a = halves(tile + l.value_scale, l.tokens);
    z = halves(tile + l.value_zero, l.tokens);
  }

  void load_plain(const float* rows, int n, int d) {
    tokens = n;
    codes.assign(rows, rows + static_cast<size_t>(n) * d);
    s_ch.assign(d, 1.0f);
    a.assign(n, 1.0f);
    z.assign(n, 0.0f);
  }

  // out[c] += sum over the first n tokens of p[t] * v_t[c].
  void accumulate(const float* p, int n, int d, float* out, float* scratch) const {
    std::fill(scratch, scratch + d, 0.0f);
    float zero_sum = 0;
    for (int t = 0; t < n; ++t) {
      const float w = p[t] * a[t];
      zero_sum += p[t] * z[t];
      const float* code = codes.data() + static_cast<size_t>(t) * d;
      for (int c = 0; c < d; ++c) scratch[c] += w * code[c];
    }
    for (int c = 0; c < d; ++c) out[c] += s_ch[c] * (scratch[c] + zero_sum);
  }
};

}  // namespace

void CpuBackend::attention(int layer, std::span<const StepSequence> seqs, Tensor q, int q_heads, float scale,
                           Tensor out) {
  const int d = kv_shape_.head_dim, g = kv_shape_.block_size, kv_heads = kv_shape_.num_kv_heads;
  const int group = q_heads / kv_heads;
  const auto& layout = codec_->layout();
  const bool code_tiles = layout.code_tile, rotated = kv_shape_.dtype.rotated();

  pool_.parallel_for(seqs.size() * kv_heads, [&](size_t begin, size_t end) {
    TileKeys keys;
    TileValues values;
    std::vector<float> plain_k(static_cast<size_t>(g) * d), plain_v(static_cast<size_t>(g) * d), scratch(d);
    for (size_t job = begin; job < end; ++job) {
      const StepSequence& seq = seqs[job / kv_heads];
      const int kvh = static_cast<int>(job % kv_heads);
      const int tail_tokens = seq.tail_len + seq.num_rows;
      const size_t context = static_cast<size_t>(seq.num_tiles) * g + tail_tokens;
      const int queries = seq.num_rows * group;  // query j: row j / group, head kvh * group + j % group

      std::vector<float> qs(static_cast<size_t>(queries) * d), outs(static_cast<size_t>(queries) * d, 0.0f);
      for (int j = 0; j < queries; ++j) {
        const float* src = q.row(seq.first_row + j / group) + (kvh * group + j % group) * d;
        std::copy(src, src + d, qs.begin() + static_cast<size_t>(j) * d);
        if (rotated) codec::hadamard_rotate(qs.data() + static_cast<size_t>(j) * d, d);
      }
      auto load_tile = [&](int i, bool want_keys) {
        const uint8_t* bytes = tile(layer, seq.block_table[i], kvh);
        if (code_tiles) {
          want_keys ? keys.load_codes(bytes, layout) : values.load_codes(bytes, layout);
          return;
        }
        codec_->decode(bytes, plain_k.data(), plain_v.data());
        want_keys ? keys.load_plain(plain_k.data(), g, d) : values.load_plain(plain_v.data(), g, d);
      };
      auto load_tail = [&](int kind) {
        float* dst = kind == 0 ? plain_k.data() : plain_v.data();
        read_tail(layer, seq.tail_slot, kind, kvh, tail_tokens, dst);
        kind == 0 ? keys.load_plain(dst, tail_tokens, d) : values.load_plain(dst, tail_tokens, d);
      };
      auto visible = [&](int j) { return context - seq.num_rows + j / group + 1; };  // causal within the step

      std::vector<float> scores(static_cast<size_t>(queries) * context);
      for (int i = 0; i <= seq.num_tiles; ++i) {
        i < seq.num_tiles ? load_tile(i, true) : load_tail(0);
        for (int j = 0; j < queries; ++j)
          keys.score(qs.data() + static_cast<size_t>(j) * d, d, scale,
                     scores.data() + static_cast<size_t>(j) * context + static_cast<size_t>(i) * g);
      }
      for (int j = 0; j < queries; ++j) {
        float* s = scores.data() + static_cast<size_t>(j) * context;
        const size_t n = visible(j);
        const float max = *std::max_element(s, s + n);
        float sum = 0;
        for (size_t t = 0; t < n; ++t) sum += (s[t] = std::exp(s[t] - max));
        for (size_t t = 0; t < n; ++t) s[t] /= sum;
      }
      for (int i = 0; i <= seq.num_tiles; ++i) {
        i < seq.num_tiles ? load_tile(i, false) : load_tail(1);
        for (int j = 0; j < queries; ++j) {
          const size_t offset = static_cast<size_t>(i) * g;
          const int n = static_cast<int>(std::min<size_t>(values.tokens, visible(j) - offset));
          values.accumulate(scores.data() + static_cast<size_t>(j) * context + offset, n, d,
                            outs.data() + static_cast<size_t>(j) * d, scratch.data());
        }
      }
      for (int j = 0; j < queries; ++j) {
        float* o = outs.data() + static_cast<size_t>(j) * d;
        if (rotated) codec::hadamard_rotate(o, d);
        std::copy(o, o + d, out.row(seq.first_row + j / group) + (kvh * group + j % group) * d);
      }
    }
  });
}

}  // namespace kvarn::backend
