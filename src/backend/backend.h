#pragma once
// The Backend interface: the ops the model's forward pass is written against, once, for every device.
//
// Contracts shared by all backends (both are tested against the CPU reference):
// - Tensor: a row-major fp32 matrix [rows][cols] in the backend's memory; rows are tokens of the step.
// - Weight: a matrix [out][in] (or a vector, rows = 1) in the backend's preferred storage.
// - KV cache memory (pools of tiles and fp16 tail slots, see cache/kv_cache.h and codec/tile_layout.h) belongs to
//   the backend; cache::KvCache does the bookkeeping. Keys/values enter the tail after RoPE, Hadamard-rotated
//   for rotated cache dtypes; attention rotates the query and rotates its output back.
#include "cache/kv_cache.h"

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace kvarn::backend {

struct Tensor {
  float* data = nullptr;
  int rows = 0;
  int cols = 0;
  float* row(int r) const { return data + static_cast<size_t>(r) * cols; }
  Tensor first_rows(int n) const { return {data, n, cols}; }
};

struct Weight {
  std::shared_ptr<const float> data;
  int rows = 0;
  int cols = 0;
};

// One sequence of a step: its cache state before the step and its rows in the step's tensors. A step appends
// num_rows <= tail room tokens, so a sequence's new tokens always land in its tail.
struct StepSequence {
  const int32_t* block_table = nullptr;  // full tiles, oldest first
  int num_tiles = 0;
  int tail_slot = 0;
  int tail_len = 0;  // tokens already in the tail
  int first_row = 0;
  int num_rows = 0;
};

class Backend {
public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // Memory
  virtual Weight upload_weight(std::vector<float> host, int rows, int cols) = 0;
  virtual std::shared_ptr<float> allocate(size_t floats) = 0;
  virtual void upload(const float* host, Tensor dst) = 0;
  virtual void download(Tensor src, float* host) = 0;
  virtual void allocate_kv_cache(const cache::KvCacheShape& shape) = 0;

  // Math. Shapes: x, out [n][...]; weights as in Weight.
  virtual void embed(const Weight& table, std::span<const int32_t> ids, Tensor out) = 0;
  // out[r] = x[r] / rms(x[r]) * gain; out may alias x.
  virtual void rmsnorm(Tensor x, const Weight& gain, float eps, Tensor out) = 0;
  // out = x * w^T (+ bias, when bias.data).
  virtual void matmul(Tensor x, const Weight& w, const Weight& bias, Tensor out) = 0;
  // Rotary embedding in the rotate_half convention; x [n][heads*D]; cos_sin [n][D]: cos then sin, D/2 each.
  virtual void rope(Tensor x, int heads, Tensor cos_sin) = 0;
  // out = silu(gate) * up.
  virtual void swiglu(Tensor gate, Tensor up, Tensor out) = 0;
  // x += y.
  virtual void add(Tensor x, Tensor y) = 0;

  // KV cache. k, v: [n][kv_heads*D] post-RoPE; q, out: [n][q_heads*D].
  virtual void kv_append(int layer, std::span<const StepSequence> seqs, Tensor k, Tensor v) = 0;
  // Row i of a sequence (position num_tiles*G + tail_len + i) attends causally to its tiles and tail rows
  // 0..tail_len+i, after kv_append of the step. scale: the softmax scale (1/sqrt(D)).
  virtual void attention(int layer, std::span<const StepSequence> seqs, Tensor q, int q_heads, float scale,
                         Tensor out) = 0;
  // Encodes each full tail slot into its new block, for every layer and kv-head.
  virtual void kv_flush(std::span<const cache::TileFlush> flushes) = 0;
};

}  // namespace kvarn::backend
