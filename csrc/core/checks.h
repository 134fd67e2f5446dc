// The check macros that core/op_checks.cpp builds every op's argument checks from: each failure
// says which op, which argument (its name as written) and what it got, so a wrong call reads as
// an error message, not a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define FASTGEN_CHECK_CONTIGUOUS(op, t) \
  TORCH_CHECK((t).is_contiguous(), op, ": ", #t, " must be contiguous")
#define FASTGEN_CHECK_DIM(op, t, n) \
  TORCH_CHECK((t).dim() == (n), op, ": ", #t, " must have ", n, " dims, got shape ", (t).sizes())
#define FASTGEN_CHECK_DTYPE(op, t, dtype) \
  TORCH_CHECK((t).scalar_type() == (dtype), op, ": ", #t, " must be ", dtype, ", got ", (t).scalar_type())
#define FASTGEN_CHECK_SAME_DTYPE(op, a, b)                                                     \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), op, ": ", #a, " and ", #b,              \
              " must have the same dtype, got ", (a).scalar_type(), " and ", (b).scalar_type())
#define FASTGEN_CHECK_SAME_DEVICE(op, a, b)                                                    \
  TORCH_CHECK((a).device() == (b).device(), op, ": ", #a, " and ", #b,                        \
              " must be on the same device, got ", (a).device(), " and ", (b).device())
