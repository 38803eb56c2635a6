#pragma once
// The text pipeline stages of a tokenizer.json, built from their JSON: normalizer (text -> text), pre-tokenizer
// (text -> words) and decoder (tokens -> text). Unknown or unsupported types are errors naming the JSON path.
#include <nlohmann/json_fwd.hpp>

#include <functional>
#include <string>
#include <vector>

namespace kvarn::tokenizer {

using Normalizer = std::function<std::string(std::string)>;
using PreTokenizer = std::function<std::vector<std::string>(std::vector<std::string>)>;
using Decoder = std::function<std::vector<std::string>(std::vector<std::string>)>;

Normalizer make_normalizer(const nlohmann::json& config, const std::string& where);
PreTokenizer make_pre_tokenizer(const nlohmann::json& config, const std::string& where);
Decoder make_decoder(const nlohmann::json& config, const std::string& where);

}  // namespace kvarn::tokenizer
