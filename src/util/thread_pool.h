#pragma once
// A fixed pool of worker threads for data-parallel loops. parallel_for splits [0, n) into contiguous chunks,
// one per thread (the calling thread takes the first), and returns when all are done. Exceptions thrown by
// the body are rethrown on the calling thread.
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kvarn {

class ThreadPool {
public:
  explicit ThreadPool(int threads);  // threads <= 0: all hardware threads
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // body(begin, end) is called on disjoint chunks covering [0, n).
  void parallel_for(size_t n, const std::function<void(size_t begin, size_t end)>& body);

private:
  void worker_loop(int index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  const std::function<void(size_t, size_t)>* body_ = nullptr;
  size_t n_ = 0;
  size_t generation_ = 0;
  int pending_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

}  // namespace kvarn
