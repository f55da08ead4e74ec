// A small JSON reader for the AOT launch table (kernels.json, written by `python -m fastvit_kernels.aot build`).
//
// The table is machine-written, a few hundred KiB at most, and read once per process, so this favours brevity over
// speed: a recursive-descent parser into a tree of Json values (RFC 8259 grammar; \uXXXX escapes outside ASCII are
// kept as UTF-8; numbers as double plus, for integers, the exact int64).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace fastvit::cuda {

struct Json {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0.0;
  int64_t integer = 0;        // the number when it is an integer literal that fits int64
  bool is_integer = false;
  std::string string;
  std::vector<Json> array;
  std::map<std::string, Json> object;

  // The member `key` of an object; throws std::runtime_error naming `where` and the key when this is not an object
  // or lacks it.
  const Json& at(const std::string& key, const std::string& where) const;
  // Whether this is an object with member `key`.
  bool has(const std::string& key) const;
  // Typed accessors: throw std::runtime_error naming `where` when the value has another type.
  int64_t as_int(const std::string& where) const;
  double as_double(const std::string& where) const;
  bool as_bool(const std::string& where) const;
  const std::string& as_string(const std::string& where) const;
  const std::vector<Json>& as_array(const std::string& where) const;
};

// Parses `text`; throws std::runtime_error with the byte offset of the first error.
Json parse_json(const std::string& text);

}  // namespace fastvit::cuda
