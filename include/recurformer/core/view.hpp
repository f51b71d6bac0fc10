// recurformer/core/view.hpp: non-owning strided views, the only way kernels see memory.
//
// A View<T, N> is a pointer, N extents and N element strides (int64, so no index overflows past
// 2^31 elements). Kernels take plain structs of views by value; the caller owns the memory. Strides
// let one kernel read a cache slot, a packed batch or a slice of a larger tensor without copies.
// A view whose data is null is "absent" (for optional operands).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "recurformer/core/config.hpp"
#include "recurformer/core/error.hpp"

namespace recurformer {

template <class T, int N>
struct View {
  static_assert(N >= 1, "a view has at least one dimension");
  T* data = nullptr;
  int64_t shape[N] = {};
  int64_t stride[N] = {};  // in elements

  static constexpr int rank = N;

  RF_HOST_DEVICE bool present() const { return data != nullptr; }
  RF_HOST_DEVICE int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < N; ++d) n *= shape[d];
    return n;
  }
  template <class... I>
  RF_HOST_DEVICE int64_t offset(I... idx) const {
    static_assert(sizeof...(I) == N, "one index per dimension");
    const int64_t i[N] = {int64_t(idx)...};
    int64_t o = 0;
    for (int d = 0; d < N; ++d) o += i[d] * stride[d];
    return o;
  }
  template <class... I>
  RF_HOST_DEVICE T& operator()(I... idx) const {
    return data[offset(idx...)];
  }
  template <class... I>
  RF_HOST_DEVICE T* ptr(I... idx) const {
    return data + offset(idx...);
  }
  /// True when the view is dense row-major (last dimension fastest).
  RF_HOST_DEVICE bool contiguous() const {
    int64_t s = 1;
    for (int d = N - 1; d >= 0; --d) {
      if (shape[d] != 1 && stride[d] != s) return false;
      s *= shape[d];
    }
    return true;
  }
  /// The view as a view of const elements (only for views of mutable elements).
  template <class U = T, std::enable_if_t<!std::is_const<U>::value, int> = 0>
  RF_HOST_DEVICE operator View<const U, N>() const {
    View<const U, N> v;
    v.data = data;
    for (int d = 0; d < N; ++d) {
      v.shape[d] = shape[d];
      v.stride[d] = stride[d];
    }
    return v;
  }
};

/// A dense row-major view of `data` with the given extents.
template <class T, int N>
View<T, N> make_view(T* data, const int64_t (&shape)[N]) {
  View<T, N> v;
  v.data = data;
  int64_t s = 1;
  for (int d = N - 1; d >= 0; --d) {
    v.shape[d] = shape[d];
    v.stride[d] = s;
    s *= shape[d];
  }
  return v;
}

/// A view with explicit extents and element strides.
template <class T, int N>
View<T, N> make_strided_view(T* data, const int64_t (&shape)[N], const int64_t (&stride)[N]) {
  View<T, N> v;
  v.data = data;
  for (int d = 0; d < N; ++d) {
    v.shape[d] = shape[d];
    v.stride[d] = stride[d];
  }
  return v;
}

namespace detail {
inline std::string shape_string(const int64_t* s, int n) {
  std::string r = "[";
  for (int d = 0; d < n; ++d) r += (d ? ", " : "") + std::to_string(s[d]);
  return r + "]";
}

/// Throws "op: name has shape [..], expected [..]" when the view's extents differ; -1 in
/// `expected` matches any extent. An absent view fails too (use check_optional_shape).
template <class T, int N>
void check_shape(const char* op, const char* name, const View<T, N>& v,
                 const int64_t (&expected)[N]) {
  RF_CHECK(v.data != nullptr, op, ": ", name, " is required but absent (null data)");
  for (int d = 0; d < N; ++d) {
    if (expected[d] >= 0 && v.shape[d] != expected[d])
      fail(op, ": ", name, " has shape ", shape_string(v.shape, N), ", expected ",
           shape_string(expected, N));
    RF_CHECK(v.shape[d] >= 0, op, ": ", name, " has a negative extent in dimension ", d);
  }
  // Extents from a file or a caller can be huge: the elements, and the bytes from the first to the
  // last one, must be countable in int64, or index arithmetic downstream would wrap.
  int64_t count = 1, span = 0;
  bool ok = true;
  for (int d = 0; d < N && ok; ++d) {
    if (v.shape[d] == 0) return;  // an empty view reads nothing
    int64_t step = 0;
    ok = !__builtin_mul_overflow(count, v.shape[d], &count) &&
         v.stride[d] != INT64_MIN &&
         !__builtin_mul_overflow(v.shape[d] - 1, v.stride[d] < 0 ? -v.stride[d] : v.stride[d], &step) &&
         !__builtin_add_overflow(span, step, &span);
  }
  int64_t bytes = 0;
  ok = ok && !__builtin_mul_overflow(span + 1, int64_t(sizeof(T)), &bytes);
  RF_CHECK(ok, op, ": ", name, " of shape ", shape_string(v.shape, N), " holds more elements than 64-bit sizes count");
}
template <class T, int N>
void check_optional_shape(const char* op, const char* name, const View<T, N>& v,
                          const int64_t (&expected)[N]) {
  if (v.data) check_shape(op, name, v, expected);
}
/// Throws unless the view's last dimension is unit-stride (what the vector loops need).
template <class T, int N>
void check_inner_contiguous(const char* op, const char* name, const View<T, N>& v) {
  RF_CHECK(!v.data || v.shape[N - 1] <= 1 || v.stride[N - 1] == 1, op, ": ", name,
           " must have unit stride in its last dimension (got stride ", v.stride[N - 1], ")");
}
}  // namespace detail

}  // namespace recurformer
