// A captured sequence of operator calls, replayed from C++ without Python: the CPU's counterpart
// of a CUDA graph for a decode step (python/fastgen/engine/step_graph.py records it).
//
// Python runs the model once under a dispatch mode that sees every operator call (fastgen's ops
// and aten's alike), and writes each call here as a node: the operator, and for each argument of
// its schema either a constant (a weight, a static input buffer, a cache, a preallocated output,
// an int) or a slot: the value some earlier node returns. replay() calls the nodes in order
// through the dispatcher, each on a stack built from its constants and the slots' current
// values, and stores what each returns into its slots. A decode step of the default model is
// ~250 calls, each ~1 us here against ~5-10 us from Python.
//
// Allocations and views of constants need no node (the recorder keeps the tensor they made as a
// constant): a step's buffers are allocated once, at capture, as a CUDA graph's memory pool is.
#include <Python.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ScalarOps.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/custom_class.h>
#include <torch/library.h>

namespace fastgen {
namespace {

// One argument of a node: a constant, one slot, or a Tensor[] of slots and constants.
struct Arg {
  enum class Kind { kConstant, kSlot, kTensorList } kind;
  c10::IValue constant;            // kConstant
  int64_t slot = -1;               // kSlot
  std::vector<int64_t> slots;      // kTensorList: per element, a slot or -1 for the next constant
  std::vector<at::Tensor> tensors; // kTensorList: the constant elements, in order
};

// Where a node's returns go: per return, the first slot and, for a Tensor[] return, its length
// (each element gets its own slot, consecutive); -1 drops the value.
struct Output {
  int64_t slot = -1;
  int64_t unpack = -1;  // -1: one value; otherwise the length of the list
};

struct Node {
  c10::OperatorHandle op;
  std::vector<Arg> args;
  std::vector<Output> outputs;
};

// Releases the GIL for the length of a replay when the caller holds it: nothing in a replay
// touches Python, and the server's other threads keep running.
class GilRelease {
 public:
  GilRelease() : state_(Py_IsInitialized() && PyGILState_Check() ? PyEval_SaveThread() : nullptr) {}
  ~GilRelease() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

class StepGraph : public torch::CustomClassHolder {
 public:
  // Starts a node calling the operator `name` ("aten::add", "fastgen::attention") of overload
  // `overload` ("" for the default); its arguments follow, one call each, in schema order.
  void begin(const std::string& name, const std::string& overload) {
    TORCH_CHECK(!open_, "StepGraph.begin: the previous node was not ended");
    auto handle = c10::Dispatcher::singleton().findSchema({name, overload});
    TORCH_CHECK(handle.has_value(), "StepGraph: no operator ", name, ".", overload);
    nodes_.push_back(Node{*handle, {}, {}});
    open_ = true;
  }

  void constant(c10::IValue value) {
    Arg arg{Arg::Kind::kConstant};
    arg.constant = coerce(std::move(value));
    current().args.push_back(std::move(arg));
  }

  void slot(int64_t slot) {
    check_slot(slot);
    Arg arg{Arg::Kind::kSlot};
    arg.slot = slot;
    current().args.push_back(std::move(arg));
  }

  // A Tensor[] argument: slots[i] >= 0 takes that slot, -1 the next of `tensors`.
  void tensor_list(std::vector<int64_t> slots, std::vector<at::Tensor> tensors) {
    int64_t constants = 0;
    for (int64_t s : slots) {
      if (s < 0) {
        ++constants;
      } else {
        check_slot(s);
      }
    }
    TORCH_CHECK(constants == static_cast<int64_t>(tensors.size()),
                "StepGraph.tensor_list: ", constants, " constant elements but ", tensors.size(),
                " tensors");
    Arg arg{Arg::Kind::kTensorList};
    arg.slots = std::move(slots);
    arg.tensors = std::move(tensors);
    current().args.push_back(std::move(arg));
  }

  // Ends the node: per return of the schema, its slot (-1: dropped) and unpack (see Output).
  void end(std::vector<int64_t> slots, std::vector<int64_t> unpack) {
    Node& node = current();
    const auto& schema = node.op.schema();
    TORCH_CHECK(node.args.size() == schema.arguments().size(), "StepGraph: ", schema.name(),
                " takes ", schema.arguments().size(), " arguments, the node has ",
                node.args.size());
    TORCH_CHECK(slots.size() == schema.returns().size() && unpack.size() == slots.size(),
                "StepGraph: ", schema.name(), " returns ", schema.returns().size(),
                " values, the node places ", slots.size());
    for (size_t i = 0; i < slots.size(); ++i) {
      Output out{slots[i], unpack[i]};
      if (out.slot >= 0) {
        num_slots_ = std::max(num_slots_, out.slot + std::max<int64_t>(out.unpack, 1));
      }
      node.outputs.push_back(out);
    }
    open_ = false;
  }

  // The replay's results: slots[i] >= 0 returns that slot, -1 the next of `tensors` (a result
  // that is a constant buffer of the capture).
  void results(std::vector<int64_t> slots, std::vector<at::Tensor> tensors) {
    results_ = Arg{Arg::Kind::kTensorList};
    for (int64_t s : slots) {
      if (s >= 0) check_slot(s);
    }
    results_.slots = std::move(slots);
    results_.tensors = std::move(tensors);
  }

  int64_t num_nodes() const { return static_cast<int64_t>(nodes_.size()); }

  std::vector<at::Tensor> replay() {
    TORCH_CHECK(!open_, "StepGraph.replay: the last node was not ended");
    GilRelease no_gil;
    c10::InferenceMode inference;  // the capture's tensors are inference tensors
    values_.resize(num_slots_);
    torch::jit::Stack stack;
    for (const Node& node : nodes_) {
      stack.clear();
      for (const Arg& arg : node.args) {
        switch (arg.kind) {
          case Arg::Kind::kConstant:
            stack.push_back(arg.constant);
            break;
          case Arg::Kind::kSlot:
            stack.push_back(values_[arg.slot]);
            break;
          case Arg::Kind::kTensorList:
            stack.emplace_back(c10::List<at::Tensor>(gather(arg)));
            break;
        }
      }
      node.op.callBoxed(&stack);
      for (size_t i = 0; i < node.outputs.size(); ++i) {
        const Output& out = node.outputs[i];
        if (out.slot < 0) continue;
        if (out.unpack < 0) {
          values_[out.slot] = std::move(stack[i]);
          continue;
        }
        auto list = stack[i].toTensorList();
        TORCH_CHECK(static_cast<int64_t>(list.size()) == out.unpack, "StepGraph: ",
                    node.op.schema().name(), " returned ", list.size(), " tensors, ", out.unpack,
                    " at capture");
        for (int64_t j = 0; j < out.unpack; ++j) values_[out.slot + j] = list.get(j);
      }
    }
    return gather(results_);
  }

 private:
  Node& current() {
    TORCH_CHECK(open_, "StepGraph: an argument outside begin() / end()");
    return nodes_.back();
  }

  void check_slot(int64_t slot) const {
    TORCH_CHECK(slot >= 0 && slot < num_slots_, "StepGraph: slot ", slot,
                " is not the output of an earlier node");
  }

  // Python's values arrive as the IValues they infer (int, float, int[]). Two need the schema's
  // type: a number where a Tensor is expected (`x * 2`) becomes the wrapped-number tensor the
  // dispatcher would have made of it, and an empty list, which infers no element type, a list of
  // the argument's element type.
  c10::IValue coerce(c10::IValue value) const {
    const Node& node = nodes_.back();
    const auto& schema_args = node.op.schema().arguments();
    TORCH_CHECK(node.args.size() < schema_args.size(), "StepGraph: too many arguments for ",
                node.op.schema().name());
    const auto& type = schema_args[node.args.size()].real_type();
    if ((value.isInt() || value.isDouble() || value.isBool()) &&
        type->kind() == c10::TypeKind::TensorType) {
      at::Tensor wrapped = c10::scalar_to_tensor(value.toScalar());
      wrapped.unsafeGetTensorImpl()->set_wrapped_number(true);
      return wrapped;
    }
    if (!value.isList() || !value.toListRef().empty()) return value;
    auto list_type = type->cast<c10::ListType>();
    if (list_type == nullptr) return value;
    auto element = list_type->getElementType();
    if (element->kind() == c10::TypeKind::IntType) return c10::List<int64_t>();
    if (element->kind() == c10::TypeKind::FloatType) return c10::List<double>();
    if (element->kind() == c10::TypeKind::BoolType) return c10::List<bool>();
    if (element->kind() == c10::TypeKind::TensorType) return c10::List<at::Tensor>();
    return c10::impl::GenericList(element);
  }

  std::vector<at::Tensor> gather(const Arg& arg) const {
    std::vector<at::Tensor> out;
    out.reserve(arg.slots.size());
    size_t next = 0;
    for (int64_t s : arg.slots) {
      out.push_back(s >= 0 ? values_[s].toTensor() : arg.tensors[next++]);
    }
    return out;
  }

  std::vector<Node> nodes_;
  Arg results_{Arg::Kind::kTensorList};
  std::vector<c10::IValue> values_;  // the slots: what the nodes of the last replay returned
  int64_t num_slots_ = 0;
  bool open_ = false;
};

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.class_<StepGraph>("StepGraph")
      .def(torch::init<>())
      .def("begin", &StepGraph::begin)
      .def("constant", &StepGraph::constant)
      .def("slot", &StepGraph::slot)
      .def("tensor_list", &StepGraph::tensor_list)
      .def("end", &StepGraph::end)
      .def("results", &StepGraph::results)
      .def("num_nodes", &StepGraph::num_nodes)
      .def("replay", &StepGraph::replay);
}

}  // namespace
}  // namespace fastgen
