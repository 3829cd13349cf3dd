// What the ops' C++ autograd (csrc/<op>.cpp, TORCH_LIBRARY_IMPL(metadd_fast, Autograd, ...)) shares
// (docs/ops.md section 8): typed handles of the registered ops, the call of a backward op,
// and the Python dispatch modes of a forward kept for its backward.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <utility>

namespace metadd {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// metadd_fast::<name> with the C++ signature Sig (that of its CPU kernel). The schemas are
// defined by metadd_fast/ops/<op>.py at import, so the lookup waits for the first call.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The forward op's device kernel, below its autograd (inside an autograd forward).
template <typename Sig, typename... Args>
decltype(auto) call_below_autograd(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

// Whether an autograd forward records a node: grad mode is on and some differentiable input
// requires grad. Otherwise the op's device kernel is called straight away (no node, no saves).
inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(at::TensorList ts) {
  for (const at::Tensor& t : ts) {
    if (t.requires_grad()) return true;
  }
  return false;
}
template <typename... Parts>
bool records_graph(const Parts&... parts) {
  return at::GradMode::is_enabled() && (requires_grad(parts) || ...);
}

// A backward op, called from an autograd backward: through its own autograd (its registered
// derivative, or its clear error) when the gradient is itself differentiated
// (create_graph=True), else straight to its device kernel.
template <typename Sig, typename... Args>
decltype(auto) call_backward(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

// The Python dispatch modes active in a forward (backend="triton" on CPU tensors runs under
// metadd_fast.ops.registry.TritonOnCPU), restored while its backward runs, which is after the
// forward's mode has exited. Nothing is saved in plain eager calls (no mode).
struct SavedModes : torch::CustomClassHolder {
  explicit SavedModes(c10::impl::TorchDispatchModeTLS s) : state(std::move(s)) {}
  c10::impl::TorchDispatchModeTLS state;
};

inline void save_dispatch_modes(AutogradContext* ctx) {
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0) {
    ctx->saved_data["dispatch_modes"] =
        c10::IValue::make_capsule(c10::make_intrusive<SavedModes>(c10::impl::TorchDispatchModeTLS::get_state()));
  }
}

class ForwardModes {
 public:
  explicit ForwardModes(AutogradContext* ctx) {
    const auto it = ctx->saved_data.find("dispatch_modes");
    if (it == ctx->saved_data.end()) return;
    previous_ = c10::impl::TorchDispatchModeTLS::get_state();
    c10::impl::TorchDispatchModeTLS::set_state(static_cast<SavedModes*>(it->second.toCapsule().get())->state);
  }
  ~ForwardModes() {
    if (previous_.has_value()) c10::impl::TorchDispatchModeTLS::set_state(std::move(*previous_));
  }
  ForwardModes(const ForwardModes&) = delete;
  ForwardModes& operator=(const ForwardModes&) = delete;

 private:
  std::optional<c10::impl::TorchDispatchModeTLS> previous_;
};

}  // namespace metadd
