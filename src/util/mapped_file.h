#pragma once
// A read-only memory mapping of a whole file (model weights are mapped, not read).
#include <cstddef>
#include <filesystem>
#include <span>

namespace kvarn {

class MappedFile {
public:
  explicit MappedFile(const std::filesystem::path& path);  // throws kvarn::Error naming the path
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile& operator=(MappedFile&&) = delete;

  std::span<const std::byte> bytes() const { return {data_, size_}; }
  const std::filesystem::path& path() const { return path_; }

private:
  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace kvarn
