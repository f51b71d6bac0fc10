// recurformer/core/dispatch.hpp: turning run-time values into template arguments, in one place.
//
// Each axis (dtype, head_dim, conv width, ...) has one constexpr ValueList of supported values; the
// dispatcher calls a generic lambda with std::integral_constant<V> for the matching entry, so the
// list that is dispatched is exactly the list that is instantiated. An unsupported value throws an
// Error that lists the supported ones: never a silent slow fallback.
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/error.hpp"

namespace recurformer {

template <auto... Vs>
struct ValueList {};

template <class T>
struct TypeTag {
  using type = T;
};

namespace detail {
template <auto... Vs>
std::string list_values(ValueList<Vs...>) {
  std::string s;
  ((s += (s.empty() ? "" : ", ") + std::to_string(Vs)), ...);
  return s;
}

/// Whether value is one of the list's: a check that refuses a call before it writes, where the
/// dispatch itself would only refuse it when it is reached.
template <auto... Vs, class Int>
constexpr bool list_contains(ValueList<Vs...>, Int value) {
  return ((Vs == value) || ...);
}
}  // namespace detail

/// Calls f(std::integral_constant<decltype(V), V>{}) for the V in the list equal to `value`.
template <auto V0, auto... Vs, class Int, class F>
decltype(auto) dispatch_value(const char* what, ValueList<V0, Vs...> list, Int value, F&& f) {
  using R = decltype(f(std::integral_constant<decltype(V0), V0>{}));
  if constexpr (std::is_void_v<R>) {
    bool hit = false;
    auto try_one = [&](auto c) {
      if (!hit && decltype(c)::value == value) {
        hit = true;
        f(c);
      }
    };
    try_one(std::integral_constant<decltype(V0), V0>{});
    (try_one(std::integral_constant<decltype(Vs), Vs>{}), ...);
    if (!hit) fail(what, ": unsupported value ", value, " (supported: ", detail::list_values(list), ")");
  } else {
    if (value == V0) return f(std::integral_constant<decltype(V0), V0>{});
    if constexpr (sizeof...(Vs) > 0) {
      return dispatch_value(what, ValueList<Vs...>{}, value, std::forward<F>(f));
    } else {
      fail(what, ": unsupported value ", value, " (supported: ", detail::list_values(list), ")");
    }
  }
}

/// Calls f(TypeTag<T>{}) for the storage type named by `dt` (float, half or bfloat16).
template <class F>
decltype(auto) dispatch_dtype(const char* what, DType dt, F&& f) {
  switch (dt) {
    case DType::f32: return f(TypeTag<float>{});
    case DType::f16: return f(TypeTag<half>{});
    case DType::bf16: return f(TypeTag<bfloat16>{});
  }
  fail(what, ": unsupported dtype ", int(dt), " (supported: f32, f16, bf16)");
}

}  // namespace recurformer
