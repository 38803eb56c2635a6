#include "engine/model_runner.h"

#include "util/error.h"

namespace kvarn::engine {

std::vector<std::vector<float>> ModelRunner::execute(std::span<const StepWork> work) {
  const int g = cache_.shape().block_size;
  model::ForwardBatch batch;
  int filling = 0;  // tails this step fills: each needs a block at the flush
  for (const StepWork& item : work) {
    const auto& seq = cache_.sequence(item.seq);
    const int n = static_cast<int>(item.tokens.size());
    if (n == 0 || n > cache_.tail_room(item.seq))
      throw Error("model runner: sequence {} scheduled {} tokens; its tail has room for {} (1 or more required)",
                  item.seq, n, cache_.tail_room(item.seq));
    const int first_row = static_cast<int>(batch.tokens.size()), start = seq.num_tokens(g);
    batch.seqs.push_back({seq.blocks.data(), static_cast<int>(seq.blocks.size()), seq.tail_slot, seq.tail_len,
                          first_row, n});
    for (int i = 0; i < n; ++i) {
      batch.tokens.push_back(item.tokens[i]);
      batch.positions.push_back(start + i);
      if (item.all_logits || i == n - 1) batch.logit_rows.push_back(first_row + i);
    }
    if (seq.tail_len + n == g) ++filling;
  }
  if (filling > cache_.free_blocks())
    throw Error("model runner: {} tails fill this step but only {} KV blocks are free", filling,
                cache_.free_blocks());

  const auto logits = model_.forward(batch);

  for (const StepWork& item : work) cache_.advance(item.seq, static_cast<int>(item.tokens.size()));
  const auto flushes = cache_.take_full_tails();
  if (!flushes.empty()) backend_.kv_flush(flushes);

  const size_t vocab = model_.config().vocab_size;
  std::vector<std::vector<float>> out;
  size_t row = 0;
  for (const StepWork& item : work) {
    const size_t rows = item.all_logits ? item.tokens.size() : 1;
    out.emplace_back(logits.begin() + row * vocab, logits.begin() + (row + rows) * vocab);
    row += rows;
  }
  return out;
}

}  // namespace kvarn::engine
