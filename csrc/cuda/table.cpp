// kernels.json -> KernelEntry, and the parameter buffer image (table.h).
#include "table.h"

#include "json.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

namespace fastvit::cuda {

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error("fastvit_kernels._C: " + msg); }

uint32_t align_up(uint32_t x, uint32_t a) { return (x + a - 1) / a * a; }

uint32_t u32(const Json& j, const std::string& where) {
  int64_t v = j.as_int(where);
  if (v < 0 || v > 0xFFFFFFFFll) fail(where + " must be in [0, 2^32); got " + std::to_string(v));
  return static_cast<uint32_t>(v);
}

std::shared_ptr<TensorDescMeta> desc_meta(const Json& j, const std::string& where) {
  auto m = std::make_shared<TensorDescMeta>();
  m->swizzle = static_cast<int>(j.at("swizzle", where).as_int(where + ".swizzle"));
  m->elem_size = static_cast<int>(j.at("elem_size", where).as_int(where + ".elem_size"));
  m->elem_type = static_cast<int>(j.at("elem_type", where).as_int(where + ".elem_type"));
  for (const Json& b : j.at("block_size", where).as_array(where + ".block_size"))
    m->block_size.push_back(b.as_int(where + ".block_size[]"));
  if (j.has("fp4_padded")) m->fp4_padded = j.at("fp4_padded", where).as_bool(where + ".fp4_padded");
  if (j.has("is_im2col")) m->is_im2col = j.at("is_im2col", where).as_bool(where + ".is_im2col");
  return m;
}

KernelEntry parse_row(const Json& row, const std::string& dir, const std::string& where) {
  KernelEntry k;
  k.symbol = row.at("symbol", where).as_string(where + ".symbol");
  std::string w = where + " (" + k.symbol + ")";
  k.entry = row.at("entry", w).as_string(w + ".entry");
  std::string cubin = row.at("cubin", w).as_string(w + ".cubin");
  if (cubin.empty() || cubin.find('/') != std::string::npos) fail(w + ".cubin must be a file name; got '" + cubin + "'");
  k.cubin_path = dir.empty() ? cubin : dir + "/" + cubin;
  k.cc = static_cast<int>(row.at("cc", w).as_int(w + ".cc"));
  k.num_warps = static_cast<int>(row.at("num_warps", w).as_int(w + ".num_warps"));
  k.num_ctas = static_cast<int>(row.at("num_ctas", w).as_int(w + ".num_ctas"));
  if (k.num_warps < 1 || k.num_warps > 32 || k.num_ctas < 1 || k.num_ctas > 16)
    fail(w + ": num_warps must be in [1, 32] and num_ctas in [1, 16]; got " + std::to_string(k.num_warps) + ", " +
         std::to_string(k.num_ctas));
  k.shared_bytes = u32(row.at("shared_bytes", w), w + ".shared_bytes");
  k.static_shared_bytes = u32(row.at("static_shared_bytes", w), w + ".static_shared_bytes");
  k.needs_shared_optin = row.at("needs_shared_optin", w).as_bool(w + ".needs_shared_optin");
  if (row.has("launch_cooperative_grid"))
    k.launch_cooperative_grid = row.at("launch_cooperative_grid", w).as_bool(w + ".launch_cooperative_grid");
  if (row.has("launch_pdl")) k.launch_pdl = row.at("launch_pdl", w).as_bool(w + ".launch_pdl");
  const Json& scratch = row.at("scratch", w);
  k.global_scratch_bytes = u32(scratch.at("global_bytes", w + ".scratch"), w + ".scratch.global_bytes");
  k.global_scratch_align = u32(scratch.at("global_align", w + ".scratch"), w + ".scratch.global_align");
  k.profile_scratch_bytes = u32(scratch.at("profile_bytes", w + ".scratch"), w + ".scratch.profile_bytes");
  k.profile_scratch_align = u32(scratch.at("profile_align", w + ".scratch"), w + ".scratch.profile_align");
  // Each parameter must sit where its size and alignment put it after the previous one (the PTX parameter layout
  // the build checked against the cubin): a table edited by hand, or from another layout rule, is refused here
  // rather than launched with arguments at the wrong offsets.
  uint32_t end = 0;
  const auto& params = row.at("params", w).as_array(w + ".params");
  for (size_t i = 0; i < params.size(); ++i) {
    std::string pw = w + ".params[" + std::to_string(i) + "]";
    const Json& p = params[i];
    ParamSpec s = param_spec(p.at("name", pw).as_string(pw + ".name"), p.at("type", pw).as_string(pw + ".type"),
                             p.at("role", pw).as_string(pw + ".role"), u32(p.at("offset", pw), pw + ".offset"));
    uint32_t size = u32(p.at("size", pw), pw + ".size"), align = u32(p.at("align", pw), pw + ".align");
    if (size != s.bytes || align != s.align || s.offset != align_up(end, s.align))
      fail(pw + " (" + s.name + ": " + s.type + ") has size " + std::to_string(size) + ", align " +
           std::to_string(align) + ", offset " + std::to_string(s.offset) + "; its type gives size " +
           std::to_string(s.bytes) + ", align " + std::to_string(s.align) + ", offset " +
           std::to_string(align_up(end, s.align)));
    if (s.kind == ParamKind::TmaDesc) s.desc = desc_meta(p.at("tensordesc_meta", pw), pw + ".tensordesc_meta");
    end = s.offset + s.bytes;
    k.params.push_back(std::move(s));
  }
  k.param_buffer_bytes = u32(row.at("param_buffer_bytes", w), w + ".param_buffer_bytes");
  if (k.param_buffer_bytes != end)
    fail(w + ".param_buffer_bytes is " + std::to_string(k.param_buffer_bytes) + "; the parameters end at " +
         std::to_string(end));
  return k;
}

}  // namespace

ParamSpec param_spec(const std::string& name, const std::string& type, const std::string& role, uint32_t offset) {
  ParamSpec s;
  s.name = name;
  s.type = type;
  s.role = role;
  s.offset = offset;
  static const std::map<std::string, std::pair<ParamKind, uint32_t>> scalars = {
      {"i1", {ParamKind::Int, 1}},    {"u1", {ParamKind::Int, 1}},     {"i8", {ParamKind::Int, 1}},
      {"u8", {ParamKind::Int, 1}},    {"i16", {ParamKind::Int, 2}},    {"u16", {ParamKind::Int, 2}},
      {"i32", {ParamKind::Int, 4}},   {"u32", {ParamKind::Int, 4}},    {"i64", {ParamKind::Int, 8}},
      {"u64", {ParamKind::Int, 8}},   {"fp16", {ParamKind::Float, 2}}, {"bf16", {ParamKind::Float, 2}},
      {"fp32", {ParamKind::Float, 4}}, {"f32", {ParamKind::Float, 4}}, {"fp64", {ParamKind::Float, 8}}};
  if (!type.empty() && type[0] == '*') {
    s.kind = ParamKind::Pointer;
    s.bytes = s.align = 8;
  } else if (type == "nvTmaDesc") {
    s.kind = ParamKind::TmaDesc;
    s.bytes = 128;
    s.align = 64;
  } else {
    auto it = scalars.find(type);
    if (it == scalars.end())
      fail("kernel parameter " + name + " has type '" + type + "' with no known size; expected a pointer, "
           "nvTmaDesc, i1..i64, u1..u64, fp16, bf16, fp32 or fp64");
    s.kind = it->second.first;
    s.bytes = s.align = it->second.second;
    s.is_signed = type[0] == 'i';
  }
  return s;
}

std::vector<KernelEntry> parse_table(const std::string& text, const std::string& dir, const std::string& what) {
  Json doc;
  try {
    doc = parse_json(text);
  } catch (const std::runtime_error& e) {
    fail(what + ": " + e.what());
  }
  try {
    const Json& format = doc.at("format", what);
    if (format.kind != Json::Kind::String || format.string != kTableFormat)
      fail(what + " has format " + (format.kind == Json::Kind::String ? "'" + format.string + "'" : "(not a string)") +
           "; this library reads '" + kTableFormat + "' (rebuild the table with the fastvit_kernels that built "
           "this library: python -m fastvit_kernels.aot build)");
    std::vector<KernelEntry> out;
    const auto& rows = doc.at("kernels", what).as_array(what + ".kernels");
    for (size_t i = 0; i < rows.size(); ++i)
      out.push_back(parse_row(rows[i], dir, what + ".kernels[" + std::to_string(i) + "]"));
    for (size_t i = 0; i < out.size(); ++i)
      for (size_t j = i + 1; j < out.size(); ++j)
        if (out[i].symbol == out[j].symbol) fail(what + " lists symbol " + out[i].symbol + " twice");
    return out;
  } catch (const std::runtime_error& e) {
    std::string msg = e.what();
    if (msg.rfind("fastvit_kernels._C: ", 0) == 0) throw;
    fail(msg);  // a Json accessor's message: it already names the table and the field
  }
}

const std::vector<KernelEntry>& load_table(const std::string& path) {
  // Entries are handed out by reference and never freed, so a launch never races a reload.
  static std::mutex mutex;
  static std::map<std::string, std::unique_ptr<std::vector<KernelEntry>>> tables;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = tables.find(path);
  if (it != tables.end()) return *it->second;
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open the launch table '" + path + "'");
  std::stringstream text;
  text << f.rdbuf();
  size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  auto table = std::make_unique<std::vector<KernelEntry>>(parse_table(text.str(), dir, path));
  return *(tables[path] = std::move(table));
}

const KernelEntry& find_entry(const std::vector<KernelEntry>& table, const std::string& symbol,
                              const std::string& what) {
  for (const KernelEntry& k : table)
    if (k.symbol == symbol) return k;
  fail(what + " has no kernel '" + symbol + "' (" + std::to_string(table.size()) + " symbols)");
}

uint16_t fp16_bits(double x) {
  uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  double a = std::fabs(x);
  if (std::isnan(x)) return sign | 0x7E00;
  if (a >= 65520.0) return sign | 0x7C00;  // the midpoint of 65504 and 2^16 and above round to infinity
  if (a < std::ldexp(1.0, -14)) {  // subnormal: units of 2^-24; 1024 units is the smallest normal, encoded alike
    return sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(a, 24)));
  }
  int e;
  std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1): a in [2^(e-1), 2^e)
  int exp = e - 1;
  // scaling by a power of two is exact, so nearbyint (round half to even) rounds the exact value once
  auto m = static_cast<uint32_t>(std::nearbyint(std::ldexp(a, 10 - exp)));  // in [1024, 2048]
  if (m == 2048) { m = 1024; ++exp; }
  return sign | static_cast<uint16_t>(((exp + 15) << 10) | (m - 1024));
}

std::vector<uint8_t> pack_params(const std::vector<ParamSpec>& layout, const std::vector<ParamValue>& values,
                                 const std::string& what) {
  if (layout.size() != values.size())
    fail(what + ": " + std::to_string(layout.size()) + " kernel parameters but " + std::to_string(values.size()) +
         " values");
  uint32_t size = 0;
  for (const ParamSpec& s : layout) size = std::max(size, s.offset + s.bytes);
  std::vector<uint8_t> buf(size, 0);
  for (size_t i = 0; i < layout.size(); ++i) {
    const ParamSpec& s = layout[i];
    const ParamValue& v = values[i];
    uint8_t* dst = buf.data() + s.offset;
    uint64_t bits = 0;  // the value's little-endian bytes, the low s.bytes of them written
    switch (s.kind) {
      case ParamKind::Pointer:
        bits = v.pointer;
        break;
      case ParamKind::Int: {
        int64_t x = v.integer;
        unsigned width = s.type == "i1" || s.type == "u1" ? 1 : 8 * s.bytes;
        bool ok;
        if (width == 64) ok = true;  // u64 above INT64_MAX arrives as its two's-complement bits
        else if (s.is_signed && width > 1) ok = x >= -(int64_t(1) << (width - 1)) && x < (int64_t(1) << (width - 1));
        else ok = x >= 0 && x < (int64_t(1) << width);
        if (!ok)
          fail(what + ": parameter " + s.name + " (" + s.type + ") = " + std::to_string(x) + " is out of range");
        bits = static_cast<uint64_t>(x);
        break;
      }
      case ParamKind::Float:
        if (s.type == "fp64") {
          std::memcpy(&bits, &v.real, 8);
        } else if (s.type == "fp16") {
          bits = fp16_bits(v.real);
          // a finite value that rounds past 65504 would silently become infinity; Triton's launcher refuses it too
          if (std::isfinite(v.real) && (bits & 0x7FFF) == 0x7C00)
            fail(what + ": parameter " + s.name + " (fp16) = " + std::to_string(v.real) + " is out of fp16 range");
        } else {
          float f = static_cast<float>(v.real);
          uint32_t u;
          std::memcpy(&u, &f, 4);
          bits = s.type == "bf16" ? u >> 16 : u;
        }
        break;
      case ParamKind::TmaDesc:
        if (v.bytes.size() != s.bytes)
          fail(what + ": parameter " + s.name + " needs a " + std::to_string(s.bytes) + "-byte descriptor; got " +
               std::to_string(v.bytes.size()) + " bytes");
        std::memcpy(dst, v.bytes.data(), s.bytes);
        continue;
    }
    for (uint32_t b = 0; b < s.bytes; ++b) dst[b] = static_cast<uint8_t>(bits >> (8 * b));
  }
  return buf;
}

}  // namespace fastvit::cuda
