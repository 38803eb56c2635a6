#pragma once
// The CPU backend: fp32 math, OpenBLAS GEMM, a thread pool for attention and tile flushes. It is the reference
// every other backend is tested against, and a usable backend for small models.
#include "backend/backend.h"
#include "codec/tile_codec.h"
#include "util/thread_pool.h"

#include <optional>

namespace kvarn::backend {

class CpuBackend final : public Backend {
public:
  explicit CpuBackend(int threads);  // threads <= 0: all hardware threads

  std::string name() const override { return "cpu"; }
  int threads() const { return pool_.size(); }

  Weight upload_weight(std::vector<float> host, int rows, int cols) override;
  std::shared_ptr<float> allocate(size_t floats) override;
  void upload(const float* host, Tensor dst) override;
  void download(Tensor src, float* host) override;
  void allocate_kv_cache(const cache::KvCacheShape& shape) override;

  void embed(const Weight& table, std::span<const int32_t> ids, Tensor out) override;
  void rmsnorm(Tensor x, const Weight& gain, float eps, Tensor out) override;
  void matmul(Tensor x, const Weight& w, const Weight& bias, Tensor out) override;
  void rope(Tensor x, int heads, Tensor cos_sin) override;
  void swiglu(Tensor gate, Tensor up, Tensor out) override;
  void add(Tensor x, Tensor y) override;

  void kv_append(int layer, std::span<const StepSequence> seqs, Tensor k, Tensor v) override;
  void attention(int layer, std::span<const StepSequence> seqs, Tensor q, int q_heads, float scale,
                 Tensor out) override;
  void kv_flush(std::span<const cache::TileFlush> flushes) override;

private:
  // Layer memory: blocks [num_blocks][kv_heads][tile bytes]; tails [slots][2 (K, V)][kv_heads][G][D] fp16
  // (fp32 for the fp32 dtype).
  struct LayerKv {
    std::vector<uint8_t> blocks;
    std::vector<uint8_t> tails;
  };
  const uint8_t* tile(int layer, int32_t block, int kv_head) const;
  uint8_t* tail_rows(int layer, int slot, int kind, int kv_head);
  // Reads n tail rows of one kv-head as floats.
  void read_tail(int layer, int slot, int kind, int kv_head, int n, float* out);

  ThreadPool pool_;
  cache::KvCacheShape kv_shape_;
  std::optional<codec::TileCodec> codec_;
  std::vector<LayerKv> kv_;
};

}  // namespace kvarn::backend
