// How an op is declared once and registered for every device and for autograd.
//
// An op declaration (ops/linear.h, ops/conv2d.h, ops/plan.h) is a struct with
//   name()                     "ncsr_linear";
//   schema()                   its TORCH_LIBRARY schema (library.cpp registers it);
//   Call                       the op's arguments by name, as the kernels take them, and Result;
//   unpack(...)                the schema's arguments as C++ parameters -> Call. Its parameter list is the one
//                              C++ spelling of the signature: the dispatcher's function type is taken from it;
//   pack(call)                 the reverse, a tuple in schema order, to call the op through the dispatcher.
// A product over a nested weight splices its format's arguments (formats/<format>.h: Params, unpack, pack) into
// its own, so one declaration serves every format.
//
// impl<Op, body> is the function a device registers: it takes the schema's arguments and calls
// body(Op::unpack(...)), so kernels never spell the signature. dispatch<Op>(call) calls the op through the
// dispatcher (autograd uses it below the Autograd key).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <tuple>

namespace nestsparse {

// A parameter list, spliced into an op's signature (a format's weight arguments).
template <typename... A>
struct Params {};

namespace detail {

template <auto Unpack>
struct Unpacker;

template <typename Call, typename... A, Call (*Unpack)(A...)>
struct Unpacker<Unpack> {
  template <typename R>
  using Signature = R(A...);

  template <typename R, R (*Body)(const Call&)>
  static R flat(A... args) {
    return Body(Unpack(args...));
  }
};

}  // namespace detail

// The op's C++ function type, from its unpack's parameters and its Result.
template <typename Op>
using Signature = typename detail::Unpacker<&Op::unpack>::template Signature<typename Op::Result>;

// The function a device registers for Op: unpacks the arguments and runs body.
template <typename Op, typename Op::Result (*Body)(const typename Op::Call&)>
constexpr Signature<Op>* impl = &detail::Unpacker<&Op::unpack>::template flat<typename Op::Result, Body>;

// "<format><suffix>", e.g. "ncsr_linear": the name of an op over a format, built once per op.
template <typename Op>
const char* format_op_name(const char* format, const char* suffix) {
  static const std::string name = std::string(format) + suffix;
  return name.c_str();
}

// The schema name under the library's namespace, e.g. "nestsparse::ncsr_linear".
template <typename Op>
const std::string& qualified_name() {
  static const std::string name = std::string("nestsparse::") + Op::name();
  return name;
}

// Calls Op through the dispatcher (from the current dispatch key down: set a guard to skip autograd).
template <typename Op>
typename Op::Result dispatch(const typename Op::Call& call) {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name<Op>().c_str(), "").template typed<Signature<Op>>();
  return std::apply([](const auto&... args) { return handle.call(args...); }, Op::pack(call));
}

}  // namespace nestsparse
