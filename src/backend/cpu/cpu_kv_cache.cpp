// CPU KV cache memory: appending (rotated) rows to the fp16 tails, and flushing full tails into tiles with the codec.
#include "backend/cpu/cpu_backend.h"

#include "codec/hadamard.h"
#include "util/error.h"
#include "util/half.h"

#include <cstring>
#include <vector>

namespace kvarn::backend {

void CpuBackend::allocate_kv_cache(const cache::KvCacheShape& shape) {
  kv_shape_ = shape;
  codec_.emplace(shape.dtype, shape.head_dim, shape.block_size);
  kv_.assign(shape.num_layers, {});
  for (auto& layer : kv_) {
    layer.blocks.assign(shape.block_bytes_per_layer() * shape.num_blocks, 0);
    layer.tails.assign(shape.tail_bytes_per_layer() * shape.max_seqs, 0);
  }
}

const uint8_t* CpuBackend::tile(int layer, int32_t block, int kv_head) const {
  return kv_[layer].blocks.data() + (static_cast<size_t>(block) * kv_shape_.num_kv_heads + kv_head) *
                                        codec_->layout().bytes;
}

uint8_t* CpuBackend::tail_rows(int layer, int slot, int kind, int kv_head) {
  const size_t bytes = static_cast<size_t>(kv_shape_.block_size) * kv_shape_.head_dim * kv_shape_.dtype.tail_element_bytes();
  return kv_[layer].tails.data() + ((static_cast<size_t>(slot) * 2 + kind) * kv_shape_.num_kv_heads + kv_head) * bytes;
}

void CpuBackend::read_tail(int layer, int slot, int kind, int kv_head, int n, float* out) {
  const uint8_t* rows = tail_rows(layer, slot, kind, kv_head);
  const size_t count = static_cast<size_t>(n) * kv_shape_.head_dim;
  if (kv_shape_.dtype.tail_element_bytes() == 4) {
    std::memcpy(out, rows, 4 * count);
    return;
  }
  for (size_t i = 0; i < count; ++i) {
    uint16_t h;
    std::memcpy(&h, rows + 2 * i, 2);
    out[i] = half_to_float(h);
  }
}

void CpuBackend::kv_append(int layer, std::span<const StepSequence> seqs, Tensor k, Tensor v) {
  const int d = kv_shape_.head_dim;
  std::vector<float> row(d);
  for (const auto& seq : seqs) {
    if (seq.tail_len + seq.num_rows > kv_shape_.block_size)
      throw Error("kv_append: {} rows do not fit a tail holding {} of {} tokens", seq.num_rows, seq.tail_len,
                  kv_shape_.block_size);
    for (int i = 0; i < seq.num_rows; ++i)
      for (int kind = 0; kind < 2; ++kind)
        for (int h = 0; h < kv_shape_.num_kv_heads; ++h) {
          const float* src = (kind == 0 ? k : v).row(seq.first_row + i) + h * d;
          row.assign(src, src + d);
          if (kv_shape_.dtype.rotated()) codec::hadamard_rotate(row.data(), d);
          const size_t at = static_cast<size_t>(seq.tail_len + i) * d;
          uint8_t* dst = tail_rows(layer, seq.tail_slot, kind, h);
          if (kv_shape_.dtype.tail_element_bytes() == 4) {
            std::memcpy(dst + 4 * at, row.data(), 4 * d);
            continue;
          }
          for (int c = 0; c < d; ++c) {
            const uint16_t half = float_to_half(row[c]);
            std::memcpy(dst + 2 * (at + c), &half, 2);
          }
        }
  }
}

void CpuBackend::kv_flush(std::span<const cache::TileFlush> flushes) {
  const int heads = kv_shape_.num_kv_heads, layers = kv_shape_.num_layers;
  const size_t rows = static_cast<size_t>(kv_shape_.block_size) * kv_shape_.head_dim;
  const size_t tile_bytes = codec_->layout().bytes;
  pool_.parallel_for(flushes.size() * layers * heads, [&](size_t begin, size_t end) {
    std::vector<float> keys(rows), values(rows);
    for (size_t job = begin; job < end; ++job) {
      const auto& flush = flushes[job / (layers * heads)];
      const int layer = static_cast<int>(job / heads % layers), h = static_cast<int>(job % heads);
      read_tail(layer, flush.tail_slot, 0, h, kv_shape_.block_size, keys.data());
      read_tail(layer, flush.tail_slot, 1, h, kv_shape_.block_size, values.data());
      uint8_t* dst = kv_[layer].blocks.data() + (static_cast<size_t>(flush.block) * heads + h) * tile_bytes;
      codec_->encode_stored(keys.data(), values.data(), dst);
    }
  });
}

}  // namespace kvarn::backend
