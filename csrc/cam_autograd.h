// The autograd plumbing shared by the CAM ops (metadd_fast::cam_maps in cam_maps.cpp,
// metadd_fast::cam_variance in cam_variance.cpp): what their forward saves and how the
// gradients of a CAM backward op map back onto the op's arguments (docs/ops.md section 1).
#pragma once

#include "autograd_util.h"
#include "ops.h"

namespace metadd {

// The CAM arguments after (features, heads, rows).
struct CamOptions {
  c10::SymInt out_h, out_w;
  bool relu;
  int64_t norm;
  double eps;
};

// Saves the inputs, the rectified maps R_k and ``extra`` (cam_variance's maps U); which
// features and heads need a gradient is read here, as the forward sees them.
inline void save_cam(AutogradContext* ctx, at::TensorList features, at::TensorList heads, at::TensorList rows,
                     const Tensors& rects, const at::Tensor& extra, const CamOptions& o) {
  Tensors saved;
  saved.reserve(4 * features.size() + 1);
  for (at::TensorList part : {features, heads, rows, at::TensorList(rects)}) saved.insert(saved.end(), part.begin(), part.end());
  saved.push_back(extra);
  ctx->save_for_backward(saved);
  c10::List<bool> feature_grad, head_grad;
  for (const at::Tensor& f : features) feature_grad.push_back(f.requires_grad());
  for (const at::Tensor& h : heads) head_grad.push_back(h.requires_grad());
  ctx->saved_data["k"] = static_cast<int64_t>(features.size());
  ctx->saved_data["feature_grad"] = feature_grad;
  ctx->saved_data["head_grad"] = head_grad;
  ctx->saved_data["out_h"] = o.out_h;
  ctx->saved_data["out_w"] = o.out_w;
  ctx->saved_data["relu"] = o.relu;
  ctx->saved_data["norm"] = o.norm;
  ctx->saved_data["eps"] = o.eps;
}

struct SavedCam {
  Tensors features, heads, rows, rects;
  at::Tensor extra;
  CamOptions options;
  c10::List<bool> feature_grad, head_grad;
};

inline SavedCam load_cam(AutogradContext* ctx) {
  const variable_list saved = ctx->get_saved_variables();
  const int64_t k = ctx->saved_data["k"].toInt();
  const auto part = [&](int64_t i) { return Tensors(saved.begin() + i * k, saved.begin() + (i + 1) * k); };
  auto& d = ctx->saved_data;
  return {part(0), part(1), part(2), part(3), saved[4 * k],
          {d["out_h"].toSymInt(), d["out_w"].toSymInt(), d["relu"].toBool(), d["norm"].toInt(), d["eps"].toDouble()},
          c10::impl::toTypedList<bool>(d["feature_grad"].toList()), c10::impl::toTypedList<bool>(d["head_grad"].toList())};
}

// One gradient per forward argument as the autograd Function counts them (each list element
// on its own): dA_k, dW_k where asked for (undefined elsewhere), none for rows and options.
inline variable_list cam_input_grads(const SavedCam& s, const Tensors& d_features, const Tensors& d_heads) {
  const size_t k = s.features.size();
  variable_list out(3 * k + 5);
  for (size_t i = 0; i < k; ++i) {
    if (s.feature_grad.get(i)) out[i] = d_features[i];
    if (s.head_grad.get(i)) out[k + i] = d_heads[i];
  }
  return out;
}

}  // namespace metadd
