// ThreadPool::parallel_for covers every index exactly once and propagates exceptions to the caller.
#include "util/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <vector>

namespace kvarn {
namespace {

TEST(ThreadPool, CoversEveryIndexOnce) {
  ThreadPool pool(4);
  for (size_t n : {0, 1, 3, 4, 5, 1000}) {
    std::vector<std::atomic<int>> hits(n);
    pool.parallel_for(n, [&](size_t begin, size_t end) {
      for (size_t i = begin; i < end; ++i) hits[i]++;
    });
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
  }
}

TEST(ThreadPool, RethrowsWorkerExceptions) {
  ThreadPool pool(3);
  EXPECT_THROW(pool.parallel_for(9, [](size_t begin, size_t) {
    if (begin > 0) throw std::runtime_error("boom");
  }), std::runtime_error);
  int calls = 0;
  pool.parallel_for(1, [&](size_t, size_t) { ++calls; });  // still usable afterwards
  EXPECT_EQ(calls, 1);
}

}  // namespace
}  // namespace kvarn
