#include "model/safetensors.h"

#include "util/error.h"
#include "util/half.h"

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>

namespace kvarn::model {

namespace {

using nlohmann::json;

size_t dtype_size(Dtype d) { return d == Dtype::f32 ? 4 : 2; }

Dtype parse_dtype(const std::string& s, const std::string& source, const std::string& tensor) {
  if (s == "F32") return Dtype::f32;
  if (s == "F16") return Dtype::f16;
  if (s == "BF16") return Dtype::bf16;
  throw Error("{}: tensor '{}' has dtype {}; supported: F32, F16, BF16", source, tensor, s);
}

}  // namespace

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<float> TensorView::to_float() const {
  std::vector<float> out(static_cast<size_t>(numel()));
  for (size_t i = 0; i < out.size(); ++i) {
    if (dtype == Dtype::f32) {
      std::memcpy(&out[i], data + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, data + 2 * i, 2);
      out[i] = dtype == Dtype::f16 ? half_to_float(h) : bf16_to_float(h);
    }
  }
  return out;
}

SafetensorsHeader parse_safetensors(std::span<const std::byte> file, const std::string& source) {
  if (file.size() < 8) throw Error("{}: {} bytes is too short for a safetensors file", source, file.size());
  uint64_t header_len;
  std::memcpy(&header_len, file.data(), 8);
  if (header_len > file.size() - 8)
    throw Error("{}: header length {} runs past the end of the file ({} bytes)", source, header_len, file.size());
  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(file.data()) + 8,
                         reinterpret_cast<const char*>(file.data()) + 8 + header_len);
  } catch (const json::exception& e) {
    throw Error("{}: invalid header JSON: {}", source, e.what());
  }
  if (!header.is_object()) throw Error("{}: header is not a JSON object", source);

  SafetensorsHeader out;
  out.data_offset = 8 + header_len;
  const size_t data_size = file.size() - out.data_offset;
  std::vector<std::pair<size_t, size_t>> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw Error("{}: __metadata__ is not an object", source);
      for (const auto& [key, value] : entry.items())
        out.metadata[key] = value.is_string() ? value.get<std::string>() : value.dump();
      continue;
    }
    if (!entry.is_object() || !entry.contains("dtype") || !entry["dtype"].is_string() || !entry.contains("shape") ||
        !entry["shape"].is_array() || !entry.contains("data_offsets") || !entry["data_offsets"].is_array() ||
        entry["data_offsets"].size() != 2)
      throw Error("{}: tensor '{}' needs dtype (string), shape (array) and data_offsets ([begin, end])", source, name);
    TensorEntry t;
    t.dtype = parse_dtype(entry["dtype"].get<std::string>(), source, name);
    size_t numel = 1;
    for (const auto& dim : entry["shape"]) {
      if (!dim.is_number_unsigned()) throw Error("{}: tensor '{}' has a bad dimension {}", source, name, dim.dump());
      const size_t size = dim.get<size_t>();
      if (size != 0 && numel > data_size / size)  // also guards the product against overflow
        throw Error("{}: tensor '{}' shape {} is larger than the {}-byte data section", source, name,
                    entry["shape"].dump(), data_size);
      t.shape.push_back(static_cast<int64_t>(size));
      numel *= size;
    }
    const auto& offsets = entry["data_offsets"];
    if (!offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned())
      throw Error("{}: tensor '{}' has non-integer data_offsets", source, name);
    t.begin = offsets[0].get<size_t>();
    t.end = offsets[1].get<size_t>();
    if (t.begin > t.end || t.end > data_size)
      throw Error("{}: tensor '{}' data_offsets [{}, {}] fall outside the {}-byte data section", source, name,
                  t.begin, t.end, data_size);
    if (t.end - t.begin != numel * dtype_size(t.dtype))
      throw Error("{}: tensor '{}' spans {} bytes but shape [{}] x {} bytes needs {}", source, name, t.end - t.begin,
                  fmt::join(t.shape, ", "), dtype_size(t.dtype), numel * dtype_size(t.dtype));
    ranges.emplace_back(t.begin, t.end);
    out.tensors.emplace(name, std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second)
      throw Error("{}: tensor data ranges overlap at byte {} of the data section", source, ranges[i].first);
  return out;
}

SafetensorsFile::SafetensorsFile(MappedFile file, SafetensorsHeader header)
    : file_(std::make_shared<MappedFile>(std::move(file))), header_(std::move(header)) {}

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  MappedFile file(path);
  auto header = parse_safetensors(file.bytes(), path.string());
  return SafetensorsFile(std::move(file), std::move(header));
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [name, _] : header_.tensors) out.push_back(name);
  return out;
}

TensorView SafetensorsFile::tensor(const std::string& name) const {
  const auto it = header_.tensors.find(name);
  if (it == header_.tensors.end()) throw Error("{}: no tensor '{}'", file_->path().string(), name);
  const TensorEntry& t = it->second;
  return {name, t.dtype, t.shape, file_->bytes().data() + header_.data_offset + t.begin, t.end - t.begin};
}

TensorStore TensorStore::open(const std::filesystem::path& dir) {
  TensorStore store;
  store.dir_ = dir;
  const auto single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
  std::vector<std::string> shards;
  if (std::filesystem::exists(index)) {
    std::ifstream in(index);
    json j;
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      throw Error("{}: invalid JSON: {}", index.string(), e.what());
    }
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw Error("{}: missing object 'weight_map' (tensor name -> shard file)", index.string());
    std::map<std::string, size_t> shard_ids;
    for (const auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) throw Error("{}: weight_map['{}'] is not a file name", index.string(), name);
      const auto [it, added] = shard_ids.emplace(file.get<std::string>(), shard_ids.size());
      if (added) shards.push_back(it->first);
      store.index_[name] = it->second;
    }
  } else if (std::filesystem::exists(single)) {
    shards.push_back("model.safetensors");
  } else {
    throw Error("{}: no model.safetensors or model.safetensors.index.json", dir.string());
  }
  for (const auto& shard : shards) store.files_.push_back(SafetensorsFile::open(dir / shard));
  if (store.index_.empty())
    for (const auto& name : store.files_[0].names()) store.index_[name] = 0;
  for (const auto& [name, file] : store.index_)
    if (!store.files_[file].has(name))
      throw Error("{}: the index puts tensor '{}' in a shard that does not hold it", dir.string(), name);
  return store;
}

bool TensorStore::has(const std::string& name) const { return index_.count(name) > 0; }

TensorView TensorStore::tensor(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) throw Error("{}: missing tensor '{}'", dir_.string(), name);
  return files_[it->second].tensor(name);
}

TensorView TensorStore::tensor(const std::string& name, const std::vector<int64_t>& expected) const {
  TensorView view = tensor(name);
  if (view.shape != expected)
    throw Error("{}: tensor '{}' has shape [{}]; expected [{}]", dir_.string(), name, fmt::join(view.shape, ", "),
                fmt::join(expected, ", "));
  return view;
}

}  // namespace kvarn::model
