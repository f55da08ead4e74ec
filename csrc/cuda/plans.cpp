// The CUDA kernels of the fastvit::* ops: launch plans replayed without Python.
//
// `python -m fastvit_kernels.aot build` writes DIR/plans.json beside the cubin table (fastvit_kernels/aot/plans.py):
// for each op call its trace made, per compute capability, what the op's Python launcher did on the host, as a
// list of steps over numbered tensor slots (the op's tensor arguments first, at their schema positions):
//   * an ATen step: an allocation or view the launcher made (aten::empty, aten::view, ...), with its arguments;
//   * a constant step: a 0-dim tensor holding a number (what an ATen call's Scalar argument becomes, since the
//     stable ABI boxes no Scalar: the recorder rewrites such calls to their Tensor overloads);
//   * a launch step: one cubin of kernels.json, its grid, and its tensor / int / float argument lists (ops.cpp's
//     convention), the tensors as slots.
// A plan is keyed by everything the launcher's choices depended on: the op, the compute capability, and per
// argument the dtype, shape, strides and 16-byte alignment of a tensor, or the value of a scalar (plan_key below;
// aot/plans.py builds the same string). The kernel registered here for every fastvit::* schema on CUDA computes the
// key of the call, replays the plan (ATen steps through the dispatcher, launches through launch_entry) and returns
// the output slots.
//
// A call without a plan (a shape the build did not trace, or a plan the build refused: see plans.json's "refused")
// runs the Python implementation, fastvit_py::<op>, when fastvit_kernels has defined it in this process
// (fastvit_csrc::set_python_fallback); without Python it is an error that names the op, the key and the table.
//
// The table is DIR/plans.json with DIR from FASTVIT_CUBINS, read once at the first CUDA call.
#include "../fastvit.h"
#include "../schemas.h"
#include "driver.h"
#include "json.h"
#include "ops.h"
#include "table.h"

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <utility>

namespace fastvit::cuda {

namespace {

constexpr const char* kPlansFormat = "fastvit_kernels.aot.plans/1";
constexpr const char* kCubinsEnv = "FASTVIT_CUBINS";

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error("fastvit_kernels._C: " + msg); }

// ---- the op schemas' argument types -------------------------------------------------------------------------------
enum class ArgType { Tensor, OptTensor, Int, Bool, BoolList, Float, Str };

struct OpSchema {
  std::string name;  // without the namespace
  std::string qualified;  // fastvit::name
  std::vector<ArgType> args;
  size_t num_returns = 0;
};

OpSchema parse_schema(const std::string& text) {
  OpSchema s;
  size_t open = text.find('('), close = text.find(") ->");
  if (open == std::string::npos || close == std::string::npos) fail("malformed schema " + text);
  s.name = text.substr(0, open);
  s.qualified = "fastvit::" + s.name;
  std::stringstream args(text.substr(open + 1, close - open - 1));
  std::string arg;
  while (std::getline(args, arg, ',')) {
    size_t start = arg.find_first_not_of(' ');
    std::string type = arg.substr(start, arg.find(' ', start) - start);
    if (type == "Tensor") s.args.push_back(ArgType::Tensor);
    else if (type == "Tensor?") s.args.push_back(ArgType::OptTensor);
    else if (type == "SymInt" || type == "int") s.args.push_back(ArgType::Int);
    else if (type == "bool") s.args.push_back(ArgType::Bool);
    else if (type == "bool[]") s.args.push_back(ArgType::BoolList);
    else if (type == "float") s.args.push_back(ArgType::Float);
    else if (type == "str") s.args.push_back(ArgType::Str);
    else fail("schema " + s.name + ": argument type " + type + " has no plan kernel decoding");
  }
  std::string rets = text.substr(close + 4);
  s.num_returns = rets.find('(') == std::string::npos ? 1 : 1 + std::count(rets.begin(), rets.end(), ',');
  return s;
}

const std::vector<OpSchema>& schemas() {
  static const std::vector<OpSchema> all = [] {
    std::vector<OpSchema> out;
    for (const char* text : kSchemas) out.push_back(parse_schema(text));
    return out;
  }();
  return all;
}

// One decoded argument of a fastvit::* call.
struct Arg {
  ArgType type;
  std::optional<Tensor> tensor;
  int64_t integer = 0;
  bool boolean = false;
  double real = 0.0;
  std::string str;
  std::vector<bool> bools;
};

std::vector<Arg> decode(const OpSchema& s, StableIValue* stack, uint64_t num_args) {
  using torch::stable::detail::to;
  if (num_args != s.args.size())
    fail("fastvit::" + s.name + ": got " + std::to_string(num_args) + " arguments; the schema has " +
         std::to_string(s.args.size()));
  std::vector<Arg> out;
  for (size_t i = 0; i < s.args.size(); ++i) {
    Arg a{s.args[i]};
    switch (a.type) {
      case ArgType::Tensor: a.tensor = to<Tensor>(stack[i]); break;
      case ArgType::OptTensor: a.tensor = to<std::optional<Tensor>>(stack[i]); break;
      case ArgType::Int: a.integer = to<int64_t>(stack[i]); break;
      case ArgType::Bool: a.boolean = to<bool>(stack[i]); break;
      case ArgType::BoolList: a.bools = to<std::vector<bool>>(stack[i]); break;
      case ArgType::Float: a.real = to<double>(stack[i]); break;
      case ArgType::Str: a.str = to<std::string>(stack[i]); break;
    }
    out.push_back(std::move(a));
  }
  return out;
}

// The arguments back on a stack (new references: `args` keeps its own).
void encode(const std::vector<Arg>& args, StableIValue* stack) {
  using torch::stable::detail::from;
  for (size_t i = 0; i < args.size(); ++i) {
    const Arg& a = args[i];
    switch (a.type) {
      case ArgType::Tensor: stack[i] = from(*a.tensor); break;
      case ArgType::OptTensor: stack[i] = from(a.tensor); break;
      case ArgType::Int: stack[i] = from(a.integer); break;
      case ArgType::Bool: stack[i] = from(a.boolean); break;
      case ArgType::BoolList: {
        // std::vector<bool> is a bitfield with no bool*: the list is boxed from a plain array
        std::unique_ptr<bool[]> flat(new bool[a.bools.size()]);
        for (size_t k = 0; k < a.bools.size(); ++k) flat[k] = a.bools[k];
        stack[i] = from(torch::headeronly::HeaderOnlyArrayRef<bool>(flat.get(), a.bools.size()));
        break;
      }
      case ArgType::Float: stack[i] = from(a.real); break;
      case ArgType::Str: stack[i] = from(a.str); break;
    }
  }
}

// ---- the plan key (aot/plans.py: call_key builds the same string) ------------------------------------------------
const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return "f16";
    case ScalarType::BFloat16: return "bf16";
    case ScalarType::Float: return "f32";
    case ScalarType::Double: return "f64";
    case ScalarType::Int: return "i32";
    case ScalarType::Long: return "i64";
    case ScalarType::Bool: return "b8";
    case ScalarType::Byte: return "u8";
    default: return "other";
  }
}

template <typename List>
void join(std::string& out, const List& values) {
  bool first = true;
  for (auto v : values) {
    if (!first) out += ',';
    out += std::to_string(static_cast<int64_t>(v));
    first = false;
  }
}

std::string plan_key(const OpSchema& s, int cc, const std::vector<Arg>& args) {
  std::string key = s.qualified + "@" + std::to_string(cc);
  for (const Arg& a : args) {
    key += ';';
    switch (a.type) {
      case ArgType::Tensor:
      case ArgType::OptTensor:
        if (!a.tensor.has_value()) {
          key += 'N';
          break;
        }
        key += 'T';
        key += dtype_name(a.tensor->scalar_type());
        key += '[';
        join(key, a.tensor->sizes());
        key += "][";
        join(key, a.tensor->strides());
        key += "]a";
        key += reinterpret_cast<uintptr_t>(a.tensor->data_ptr()) % 16 == 0 ? '1' : '0';
        break;
      case ArgType::Int: key += 'I' + std::to_string(a.integer); break;
      case ArgType::Bool: key += a.boolean ? "B1" : "B0"; break;
      case ArgType::BoolList: key += 'L'; join(key, a.bools); break;
      case ArgType::Float: {
        uint64_t bits;
        std::memcpy(&bits, &a.real, sizeof bits);
        char hex[24];
        std::snprintf(hex, sizeof hex, "F%016" PRIx64, bits);
        key += hex;
        break;
      }
      case ArgType::Str: key += 'S' + a.str; break;
    }
  }
  return key;
}

// ---- plans.json ---------------------------------------------------------------------------------------------------
struct PlanArg {
  enum class Kind { None, Slot, Slots, Int, Ints, Float, Bool, Str, Dtype, Layout, Device, MemoryFormat } kind;
  bool optional = false;  // the schema type is Optional[...]: boxed as an optional
  int64_t integer = 0;
  double real = 0.0;
  std::string str;
  std::vector<int64_t> ints;
};

struct Step {
  bool is_launch = false;
  bool is_const = false;  // a 0-dim tensor of const_dtype holding const_value, on the op's device
  double const_value = 0.0;
  ScalarType const_dtype = ScalarType::Long;
  std::string name, overload;  // ATen step
  std::vector<PlanArg> args;
  size_t num_outputs = 0;
  std::string symbol;  // launch step
  const KernelEntry* entry = nullptr;  // its row of kernels.json, resolved when the plans are read
  std::array<int64_t, 3> grid{1, 1, 1};
  std::vector<int64_t> tensors, ints;
  std::vector<double> floats;
};

struct Plan {
  std::vector<Step> steps;
  std::vector<int64_t> outputs;
  size_t num_slots = 0;  // slots after the last step
};

struct PlanTable {
  std::string dir, file, kernels;
  std::unordered_map<std::string, Plan> plans;
  std::unordered_map<std::string, std::string> refused;  // key -> why the build made no plan
  std::string error;  // why the table could not be read (reported at each call that needs it)
};

ScalarType dtype_from(const std::string& name, const std::string& where) {
  static const std::pair<const char*, ScalarType> names[] = {
      {"f16", ScalarType::Half}, {"bf16", ScalarType::BFloat16}, {"f32", ScalarType::Float},
      {"f64", ScalarType::Double}, {"i32", ScalarType::Int}, {"i64", ScalarType::Long},
      {"b8", ScalarType::Bool}, {"u8", ScalarType::Byte}};
  for (auto& [n, t] : names)
    if (name == n) return t;
  fail(where + ": unknown dtype " + name);
}

PlanArg parse_arg(const Json& j, const std::string& where) {
  PlanArg a{PlanArg::Kind::None};
  if (j.kind == Json::Kind::Null) return a;
  a.optional = j.has("opt") && j.at("opt", where).as_bool(where);
  auto ints = [&](const Json& list) {
    std::vector<int64_t> out;
    for (const Json& v : list.as_array(where)) out.push_back(v.as_int(where));
    return out;
  };
  if (j.has("t")) { a.kind = PlanArg::Kind::Slot; a.integer = j.at("t", where).as_int(where); }
  else if (j.has("tl")) { a.kind = PlanArg::Kind::Slots; a.ints = ints(j.at("tl", where)); }
  else if (j.has("i")) { a.kind = PlanArg::Kind::Int; a.integer = j.at("i", where).as_int(where); }
  else if (j.has("il")) { a.kind = PlanArg::Kind::Ints; a.ints = ints(j.at("il", where)); }
  else if (j.has("f")) { a.kind = PlanArg::Kind::Float; a.real = j.at("f", where).as_double(where); }
  else if (j.has("b")) { a.kind = PlanArg::Kind::Bool; a.integer = j.at("b", where).as_bool(where); }
  else if (j.has("s")) { a.kind = PlanArg::Kind::Str; a.str = j.at("s", where).as_string(where); }
  else if (j.has("dtype")) {
    a.kind = PlanArg::Kind::Dtype;
    a.integer = static_cast<int64_t>(dtype_from(j.at("dtype", where).as_string(where), where));
  } else if (j.has("layout")) {
    if (j.at("layout", where).as_string(where) != "strided") fail(where + ": only the strided layout is replayed");
    a.kind = PlanArg::Kind::Layout;
  } else if (j.has("device")) {
    a.kind = PlanArg::Kind::Device;
  } else if (j.has("mf")) {
    const std::string& mf = j.at("mf", where).as_string(where);
    a.kind = PlanArg::Kind::MemoryFormat;
    if (mf == "contiguous") a.integer = static_cast<int64_t>(torch::headeronly::MemoryFormat::Contiguous);
    else if (mf == "preserve") a.integer = static_cast<int64_t>(torch::headeronly::MemoryFormat::Preserve);
    else fail(where + ": memory format " + mf + " is not replayed");
  } else {
    fail(where + ": an argument of unknown kind");
  }
  return a;
}

Plan parse_plan(const Json& j, size_t num_inputs, const std::vector<KernelEntry>& kernels, const std::string& kfile,
                const std::string& where) {
  Plan p;
  size_t slots = num_inputs;
  for (const Json& js : j.at("steps", where).as_array(where)) {
    Step st;
    if (js.has("launch")) {
      st.is_launch = true;
      st.symbol = js.at("launch", where).as_string(where);
      st.entry = &find_entry(kernels, st.symbol, kfile);
      const auto& g = js.at("grid", where).as_array(where);
      if (g.size() != 3) fail(where + ": a launch grid must have 3 extents");
      for (size_t i = 0; i < 3; ++i) st.grid[i] = g[i].as_int(where);
      for (const Json& v : js.at("tensors", where).as_array(where)) st.tensors.push_back(v.as_int(where));
      for (const Json& v : js.at("ints", where).as_array(where)) st.ints.push_back(v.as_int(where));
      for (const Json& v : js.at("floats", where).as_array(where)) st.floats.push_back(v.as_double(where));
      for (int64_t t : st.tensors)
        if (t < 0 || static_cast<size_t>(t) >= slots) fail(where + ": launch of " + st.symbol + " reads slot " +
                                                            std::to_string(t) + " before it exists");
    } else if (js.has("const")) {
      st.is_const = true;
      st.const_value = js.at("const", where).as_double(where);
      st.const_dtype = dtype_from(js.at("dtype", where).as_string(where), where);
      st.num_outputs = 1;
      slots += 1;
    } else {
      st.name = js.at("aten", where).as_string(where);
      st.overload = js.at("overload", where).as_string(where);
      for (const Json& a : js.at("args", where).as_array(where)) {
        st.args.push_back(parse_arg(a, where + " " + st.name));
        const PlanArg& pa = st.args.back();
        auto check = [&](int64_t t) {
          if (t < 0 || static_cast<size_t>(t) >= slots)
            fail(where + ": " + st.name + " reads slot " + std::to_string(t) + " before it exists");
        };
        if (pa.kind == PlanArg::Kind::Slot) check(pa.integer);
        if (pa.kind == PlanArg::Kind::Slots)
          for (int64_t t : pa.ints) check(t);
      }
      st.num_outputs = static_cast<size_t>(js.at("outputs", where).as_int(where));
      slots += st.num_outputs;
    }
    p.steps.push_back(std::move(st));
  }
  for (const Json& v : j.at("outputs", where).as_array(where)) {
    int64_t o = v.as_int(where);
    if (o < 0 || static_cast<size_t>(o) >= slots) fail(where + ": output slot " + std::to_string(o) + " does not exist");
    p.outputs.push_back(o);
  }
  p.num_slots = slots;
  return p;
}

void read_table(PlanTable& t) {
  const char* dir = std::getenv(kCubinsEnv);
  if (dir == nullptr || *dir == '\0') {
    t.error = std::string(kCubinsEnv) + " is not set: the CUDA kernels replay the launch plans of an AOT build "
              "(python -m fastvit_kernels.aot build --out DIR; then " + kCubinsEnv + "=DIR)";
    return;
  }
  t.dir = dir;
  t.file = t.dir + "/plans.json";
  t.kernels = t.dir + "/kernels.json";
  std::ifstream in(t.file, std::ios::binary);
  if (!in) {
    t.error = kCubinsEnv + std::string("=") + t.dir + " has no plans.json (rebuild it with python -m "
              "fastvit_kernels.aot build --out " + t.dir + ")";
    return;
  }
  std::stringstream text;
  text << in.rdbuf();
  try {
    Json root = parse_json(text.str());
    const std::string& format = root.at("format", t.file).as_string(t.file);
    if (format != kPlansFormat) fail(t.file + " has format " + format + "; this library reads " + kPlansFormat);
    const std::vector<KernelEntry>& kernels = load_table(t.kernels);
    std::unordered_map<std::string, size_t> inputs;
    for (const OpSchema& s : schemas()) inputs[s.qualified] = s.args.size();
    for (const Json& jp : root.at("plans", t.file).as_array(t.file)) {
      const std::string& key = jp.at("key", t.file).as_string(t.file);
      const std::string& op = jp.at("op", t.file).as_string(t.file);
      auto found = inputs.find(op);
      if (found == inputs.end()) fail(t.file + ": a plan for unknown op " + op);
      t.plans.emplace(key, parse_plan(jp, found->second, kernels, t.kernels, t.file + " (" + op + ")"));
    }
    for (const Json& jr : root.at("refused", t.file).as_array(t.file))
      t.refused.emplace(jr.at("key", t.file).as_string(t.file), jr.at("why", t.file).as_string(t.file));
  } catch (const std::exception& err) {
    t.plans.clear();
    t.error = err.what();
  }
}

const PlanTable& plan_table() {
  static PlanTable table;
  static std::once_flag once;
  std::call_once(once, [] { read_table(table); });
  return table;
}

// ---- dry run (tests on machines without a GPU) and the Python fallback switch ---------------------------------------
std::atomic<int64_t> g_dry_run_cc{0};  // > 0: CPU tensors are accepted as this compute capability; launches logged
std::atomic<bool> g_dry_run_log{true};  // dry run: log each launch (else pack its parameters, as a launch would)
std::atomic<bool> g_python_fallback{false};
std::atomic<int64_t> g_fallback_calls{0};  // calls without a plan that ran the Python implementation
std::mutex g_log_mutex;
std::vector<std::string> g_log;
// the tensor slots of the last dry-run replay; never destroyed, so no tensor outlives libtorch at process exit
std::vector<Tensor>& g_last_slots = *new std::vector<Tensor>();

int compute_capability(const Tensor& t, const std::string& op) {
  int64_t forced = g_dry_run_cc.load();
  if (forced > 0 && t.is_cpu()) return static_cast<int>(forced);
  STD_TORCH_CHECK(t.is_cuda(), op, ": the plan kernel serves CUDA tensors; got a tensor on another device");
  static std::mutex mutex;
  static std::unordered_map<int, int> known;
  int device = t.get_device_index();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(device);
  if (it != known.end()) return it->second;
  const Driver& d = driver();
  CUdevice dev;
  int major = 0, minor = 0;
  check(d.cuDeviceGet(&dev, device), "cuDeviceGet", op);
  check(d.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute", op);
  check(d.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute", op);
  return known[device] = 10 * major + minor;
}

void log_launch(const Step& st, const std::vector<Tensor>& tensors) {
  std::string line = st.symbol + "|" + std::to_string(st.grid[0]) + "," + std::to_string(st.grid[1]) + "," +
                     std::to_string(st.grid[2]) + "|";
  for (size_t i = 0; i < tensors.size(); ++i)
    line += (i ? "," : "") + std::to_string(reinterpret_cast<uintptr_t>(tensors[i].data_ptr()));
  line += "|";
  join(line, st.ints);
  line += "|";
  for (size_t i = 0; i < st.floats.size(); ++i) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%s%.17g", i ? "," : "", st.floats[i]);
    line += buf;
  }
  std::lock_guard<std::mutex> lock(g_log_mutex);
  g_log.push_back(std::move(line));
}

// ---- replay -----------------------------------------------------------------------------------------------------
StableIValue box(const PlanArg& a, const std::vector<std::optional<Tensor>>& slots, const Tensor& device_of,
                 const std::string& op, const Step& st) {
  using torch::stable::detail::from;
  auto slot = [&](int64_t i) -> const Tensor& {
    if (!slots[i].has_value()) fail(op + " " + st.name + ": slot " + std::to_string(i) + " holds no tensor");
    return *slots[i];
  };
  auto boxed = [&](auto value) { return a.optional ? from(std::optional<decltype(value)>(value)) : from(value); };
  switch (a.kind) {
    case PlanArg::Kind::None: return from(std::nullopt);
    case PlanArg::Kind::Slot: return boxed(slot(a.integer));
    case PlanArg::Kind::Slots: {
      std::vector<Tensor> list;
      for (int64_t i : a.ints) list.push_back(slot(i));
      return boxed(list);
    }
    case PlanArg::Kind::Int: return boxed(a.integer);
    case PlanArg::Kind::Ints: return boxed(a.ints);
    case PlanArg::Kind::Float: return boxed(a.real);
    case PlanArg::Kind::Bool: return boxed(a.integer != 0);
    case PlanArg::Kind::Str: return boxed(a.str);
    case PlanArg::Kind::Dtype: return boxed(static_cast<ScalarType>(a.integer));
    case PlanArg::Kind::Layout: return boxed(torch::headeronly::Layout::Strided);
    case PlanArg::Kind::Device:
      return boxed(torch::stable::Device(device_of.is_cuda() ? torch::headeronly::DeviceType::CUDA
                                                             : torch::headeronly::DeviceType::CPU,
                                         device_of.is_cuda() ? device_of.get_device_index() : -1));
    case PlanArg::Kind::MemoryFormat: return boxed(static_cast<torch::headeronly::MemoryFormat>(a.integer));
  }
  fail(op + " " + st.name + ": unreachable argument kind");
}

std::vector<Tensor> replay(const Plan& plan, const PlanTable& table, const std::vector<Arg>& args,
                           const Tensor& device_of, const std::string& op) {
  using torch::stable::detail::to;
  std::vector<std::optional<Tensor>> slots(args.size());
  slots.reserve(plan.num_slots);
  for (size_t i = 0; i < args.size(); ++i) slots[i] = args[i].tensor;
  bool dry = g_dry_run_cc.load() > 0 && device_of.is_cpu();
  for (const Step& st : plan.steps) {
    if (st.is_launch) {
      std::vector<Tensor> tensors;
      for (int64_t i : st.tensors) tensors.push_back(*slots[i]);
      if (!dry) launch_entry(*st.entry, st.grid, tensors, st.ints, st.floats, op);
      else if (g_dry_run_log.load()) log_launch(st, tensors);
      else pack_entry(*st.entry, tensors, st.ints, st.floats, op);
      continue;
    }
    if (st.is_const) {
      // the stable ABI passes no Scalar: a number a launcher's ATen call took as one meets it as a 0-dim tensor
      const std::vector<int64_t> scalar_shape;
      Tensor t = torch::stable::new_empty(device_of, scalar_shape, st.const_dtype);
      torch::stable::fill_(t, st.const_value);
      slots.push_back(t);
      continue;
    }
    std::vector<StableIValue> stack(std::max(st.args.size(), st.num_outputs));
    for (size_t i = 0; i < st.args.size(); ++i) stack[i] = box(st.args[i], slots, device_of, op, st);
    STD_TORCH_CHECK(torch_call_dispatcher(st.name.c_str(), st.overload.c_str(), stack.data(), TORCH_ABI_VERSION) ==
                        AOTI_TORCH_SUCCESS,
                    "fastvit_kernels._C: ", op, ": the plan's ATen step ", st.name, ".", st.overload, " failed");
    for (size_t i = 0; i < st.num_outputs; ++i) slots.push_back(to<Tensor>(stack[i]));
  }
  std::vector<Tensor> out;
  for (int64_t o : plan.outputs) out.push_back(*slots[o]);
  if (dry) {  // kept for plan_last_slots: the tests compare the replayed values with Python's
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_last_slots.clear();
    for (const auto& t : slots)
      if (t.has_value()) g_last_slots.push_back(*t);
  }
  return out;
}

void run_op(size_t index, StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  using torch::stable::detail::from;
  const OpSchema& s = schemas()[index];
  const std::string& op = s.qualified;
  std::vector<Arg> args = decode(s, stack, num_args);
  const Tensor* device_of = nullptr;
  for (const Arg& a : args)
    if (a.tensor.has_value()) {
      device_of = &*a.tensor;
      break;
    }
  STD_TORCH_CHECK(device_of != nullptr, op, ": no tensor argument");
  const PlanTable& table = plan_table();
  std::string key = plan_key(s, compute_capability(*device_of, op), args);
  if (table.error.empty()) {
    auto found = table.plans.find(key);
    if (found != table.plans.end()) {
      std::vector<Tensor> out = replay(found->second, table, args, *device_of, op);
      STD_TORCH_CHECK(out.size() == num_outputs, op, ": the plan returns ", out.size(), " tensors; the schema ",
                      num_outputs);
      for (size_t i = 0; i < out.size(); ++i) stack[i] = from(out[i]);
      return;
    }
  }
  std::string why = !table.error.empty() ? table.error
                    : table.refused.count(key) ? "the build refused a plan for it: " + table.refused.at(key)
                                               : "the build traced no call like it";
  if (g_python_fallback.load()) {
    g_fallback_calls.fetch_add(1);
    std::vector<StableIValue> fallback(std::max<uint64_t>(num_args, num_outputs));
    encode(args, fallback.data());
    std::string name = "fastvit_py::" + s.name;
    STD_TORCH_CHECK(torch_call_dispatcher(name.c_str(), "", fallback.data(), TORCH_ABI_VERSION) == AOTI_TORCH_SUCCESS,
                    "fastvit_kernels._C: ", op, ": no launch plan (", why, "), and its Python implementation ", name,
                    " failed");
    for (size_t i = 0; i < num_outputs; ++i) stack[i] = fallback[i];
    return;
  }
  fail(op + ": no launch plan for this call in " + (table.file.empty() ? std::string("(no table)") : table.file) +
       " (" + why + "), and no Python implementation to fall back to (fastvit_kernels is not imported). Rebuild the "
       "table with python -m fastvit_kernels.aot build for this model, dtype and batch. Call key: " + key);
}

template <size_t I>
void plan_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  run_op(I, stack, num_args, num_outputs);
}

using BoxedKernel = void (*)(StableIValue*, uint64_t, uint64_t);

template <size_t... I>
std::array<BoxedKernel, sizeof...(I)> make_kernels(std::index_sequence<I...>) {
  return {&plan_kernel<I>...};
}

// ---- private ops -------------------------------------------------------------------------------------------------
void set_python_fallback(bool on) { g_python_fallback.store(on); }

void plan_dry_run(int64_t cc, bool log) {
  g_dry_run_log.store(log);
  g_dry_run_cc.store(cc);
}

std::vector<std::string> plan_log() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  std::vector<std::string> out;
  out.swap(g_log);
  return out;
}

// The tensor slots of the last dry-run replay (argument slots first), handed over (and forgotten here).
std::vector<Tensor> plan_last_slots() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  std::vector<Tensor> out;
  out.swap(g_last_slots);
  return out;
}

// [plans loaded, calls the build refused, calls that ran the Python implementation so far in this process] of
// the table FASTVIT_CUBINS names, reading it now if not read yet; an unreadable table raises its error.
std::vector<int64_t> plan_counts() {
  const PlanTable& t = plan_table();
  STD_TORCH_CHECK(t.error.empty(), "fastvit_kernels._C: ", t.error);
  return {static_cast<int64_t>(t.plans.size()), static_cast<int64_t>(t.refused.size()), g_fallback_calls.load()};
}

}  // namespace

}  // namespace fastvit::cuda

STABLE_TORCH_LIBRARY_FRAGMENT(fastvit_csrc, m) {
  m.def("set_python_fallback(bool on) -> ()");
  m.def("plan_dry_run(int cc, bool log=True) -> ()");
  m.def("plan_log() -> str[]");
  m.def("plan_counts() -> int[]");
  m.def("plan_last_slots() -> Tensor[]");
}

STABLE_TORCH_LIBRARY_IMPL(fastvit_csrc, CompositeExplicitAutograd, m) {
  m.impl("set_python_fallback", TORCH_BOX(&fastvit::cuda::set_python_fallback));
  m.impl("plan_dry_run", TORCH_BOX(&fastvit::cuda::plan_dry_run));
  m.impl("plan_log", TORCH_BOX(&fastvit::cuda::plan_log));
  m.impl("plan_counts", TORCH_BOX(&fastvit::cuda::plan_counts));
  m.impl("plan_last_slots", TORCH_BOX(&fastvit::cuda::plan_last_slots));
}

STABLE_TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  static const auto kernels = fastvit::cuda::make_kernels(std::make_index_sequence<fastvit::kNumSchemas>{});
  const auto& all = fastvit::cuda::schemas();
  for (size_t i = 0; i < all.size(); ++i) m.impl(all[i].name.c_str(), kernels[i]);
}
