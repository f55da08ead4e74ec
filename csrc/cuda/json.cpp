#include "json.h"

#include <cerrno>
#include <cstdlib>
#include <stdexcept>

namespace fastvit::cuda {

namespace {

const char* kind_name(Json::Kind k) {
  switch (k) {
    case Json::Kind::Null: return "null";
    case Json::Kind::Bool: return "a boolean";
    case Json::Kind::Number: return "a number";
    case Json::Kind::String: return "a string";
    case Json::Kind::Array: return "an array";
    case Json::Kind::Object: return "an object";
  }
  return "?";
}

[[noreturn]] void type_error(const Json& j, const char* expected, const std::string& where) {
  throw std::runtime_error(where + " must be " + expected + "; got " + kind_name(j.kind));
}

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Json document() {
    Json v = value(0);
    skip_space();
    if (pos_ != s_.size()) fail("trailing characters after the JSON value");
    return v;
  }

 private:
  const std::string& s_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("invalid JSON at byte " + std::to_string(pos_) + ": " + what);
  }
  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }
  char peek() {
    skip_space();
    if (pos_ >= s_.size()) fail("unexpected end of input");
    return s_[pos_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  bool literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }

  Json value(int depth) {
    if (depth > 64) fail("nesting deeper than 64");  // the table nests 6 deep; this bounds the recursion
    Json v;
    char c = peek();
    if (c == '{') {
      v.kind = Json::Kind::Object;
      ++pos_;
      if (peek() == '}') { ++pos_; return v; }
      while (true) {
        if (peek() != '"') fail("expected an object key");
        std::string key = string();
        expect(':');
        v.object[key] = value(depth + 1);
        if (peek() == ',') { ++pos_; continue; }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.kind = Json::Kind::Array;
      ++pos_;
      if (peek() == ']') { ++pos_; return v; }
      while (true) {
        v.array.push_back(value(depth + 1));
        if (peek() == ',') { ++pos_; continue; }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.kind = Json::Kind::String;
      v.string = string();
      return v;
    }
    if (literal("true")) { v.kind = Json::Kind::Bool; v.boolean = true; return v; }
    if (literal("false")) { v.kind = Json::Kind::Bool; return v; }
    if (literal("null")) return v;
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    fail(std::string("unexpected character '") + c + "'");
  }

  Json number() {
    size_t start = pos_;
    bool integral = true;
    if (s_[pos_] == '-') ++pos_;
    while (pos_ < s_.size()) {
      char c = s_[pos_];
      if (c >= '0' && c <= '9') { ++pos_; continue; }
      if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') { integral = false; ++pos_; continue; }
      break;
    }
    std::string text = s_.substr(start, pos_ - start);
    Json v;
    v.kind = Json::Kind::Number;
    char* end = nullptr;
    v.number = std::strtod(text.c_str(), &end);
    if (end != text.c_str() + text.size()) { pos_ = start; fail("bad number '" + text + "'"); }
    if (integral) {
      errno = 0;
      long long i = std::strtoll(text.c_str(), &end, 10);
      v.is_integer = errno == 0;
      v.integer = i;
    }
    return v;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    unsigned cp = 0;
    for (int i = 0; i < 4; ++i) {
      char c = s_[pos_++];
      cp <<= 4;
      if (c >= '0' && c <= '9') cp |= c - '0';
      else if (c >= 'a' && c <= 'f') cp |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') cp |= c - 'A' + 10;
      else fail("bad \\u escape");
    }
    return cp;
  }

  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') { out += c; continue; }
      if (pos_ >= s_.size()) fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(pos_, 2, "\\u") == 0) {  // a surrogate pair
            pos_ += 2;
            unsigned low = hex4();
            if (low < 0xDC00 || low >= 0xE000) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: fail(std::string("bad escape '\\") + e + "'");
      }
    }
  }
};

}  // namespace

const Json& Json::at(const std::string& key, const std::string& where) const {
  if (kind != Kind::Object) type_error(*this, "an object", where);
  auto it = object.find(key);
  if (it == object.end()) throw std::runtime_error(where + " has no \"" + key + "\"");
  return it->second;
}

bool Json::has(const std::string& key) const { return kind == Kind::Object && object.count(key) != 0; }

int64_t Json::as_int(const std::string& where) const {
  if (kind == Kind::Bool) return boolean ? 1 : 0;
  if (kind != Kind::Number || !is_integer) type_error(*this, "an integer", where);
  return integer;
}

double Json::as_double(const std::string& where) const {
  if (kind != Kind::Number) type_error(*this, "a number", where);
  return number;
}

bool Json::as_bool(const std::string& where) const {
  if (kind != Kind::Bool) type_error(*this, "a boolean", where);
  return boolean;
}

const std::string& Json::as_string(const std::string& where) const {
  if (kind != Kind::String) type_error(*this, "a string", where);
  return string;
}

const std::vector<Json>& Json::as_array(const std::string& where) const {
  if (kind != Kind::Array) type_error(*this, "an array", where);
  return array;
}

Json parse_json(const std::string& text) { return Parser(text).document(); }

}  // namespace fastvit::cuda
