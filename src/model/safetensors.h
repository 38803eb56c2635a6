#pragma once
// Safetensors files, memory-mapped: an 8-byte little-endian header length, a JSON header naming each tensor's
// dtype, shape and byte range, then the data. The header is validated strictly (ranges inside the file, no
// overlaps, sizes matching shape x dtype), and every error names the file and tensor.
#include "util/mapped_file.h"

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace kvarn::model {

enum class Dtype { f32, f16, bf16 };

struct TensorView {
  std::string name;
  Dtype dtype = Dtype::f32;
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;
  size_t bytes = 0;

  int64_t numel() const;
  std::vector<float> to_float() const;
};

struct TensorEntry {
  Dtype dtype;
  std::vector<int64_t> shape;
  size_t begin;  // byte offsets within the data section
  size_t end;
};

struct SafetensorsHeader {
  std::map<std::string, TensorEntry> tensors;
  std::map<std::string, std::string> metadata;
  size_t data_offset = 0;  // where the data section starts in the file
};

// Parses and validates a whole safetensors image (header and data bounds); `source` names it in errors.
SafetensorsHeader parse_safetensors(std::span<const std::byte> file, const std::string& source);

class SafetensorsFile {
public:
  static SafetensorsFile open(const std::filesystem::path& path);

  std::vector<std::string> names() const;
  bool has(const std::string& name) const { return header_.tensors.count(name) > 0; }
  TensorView tensor(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }

private:
  SafetensorsFile(MappedFile file, SafetensorsHeader header);
  std::shared_ptr<MappedFile> file_;
  SafetensorsHeader header_;
};

// The tensors of a model folder: model.safetensors, or the shards named by model.safetensors.index.json.
class TensorStore {
public:
  static TensorStore open(const std::filesystem::path& model_dir);

  bool has(const std::string& name) const;
  TensorView tensor(const std::string& name) const;
  // Also checks the shape, naming the tensor, the expected and the actual shape on mismatch.
  TensorView tensor(const std::string& name, const std::vector<int64_t>& expected_shape) const;

private:
  std::filesystem::path dir_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> index_;  // tensor name -> file
};

}  // namespace kvarn::model
