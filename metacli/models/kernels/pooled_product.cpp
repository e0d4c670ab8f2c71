// A first convolution (3x3, zero padding 1, stride 1) with its BatchNorm folded in, then 2x2 max-pooling and a
// ReLU, for images with few channels: see metacli/models/kernels/pooled_product.py for why and how it is used.
//
// Layouts: x is the zero-padded input [n, c, h + 2, w + 2]; weight is [c * 9, C] with rows in the order of a
// flattened conv weight (channel, row, column); the output and the winner are [n, h / 2, w / 2, C] (channels
// last). winner holds the position in the pooling window (0..3, row-major) whose value went through, or 4 where
// the ReLU cut it. Loops over C are innermost so that the compiler vectorises them. The kernels run on the
// calling thread: ATen's parallel_for, inlined here, would start an OpenMP team per task thread.
#include <torch/extension.h>

#include <vector>

namespace {

struct Shape {
  int64_t images, channels, padded_h, padded_w, out_h, out_w, filters;
};

Shape shape_of(const torch::Tensor& x, int64_t filters) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), (x.size(2) - 2) / 2, (x.size(3) - 2) / 2, filters};
}

// visit(tap, p) for each of the c * 9 values p of the patch under position k of window (img, a, b); tap is the
// value's row in the weight.
template <typename T, typename Visit>
inline void for_each_tap(const T* x, const Shape& s, int64_t img, int64_t a, int64_t b, int k, Visit visit) {
  for (int64_t ci = 0; ci < s.channels; ++ci) {
    const T* plane = x + (img * s.channels + ci) * s.padded_h * s.padded_w;
    for (int dy = 0; dy < 3; ++dy) {
      const T* row = plane + (2 * a + (k >> 1) + dy) * s.padded_w + 2 * b + (k & 1);
      for (int dx = 0; dx < 3; ++dx) visit((ci * 3 + dy) * 3 + dx, row[dx]);
    }
  }
}

// z[k * C + f] = shift[f] + the patch under position k of window (img, a, b) times weight[:, f].
template <typename T>
inline void window_products(const T* __restrict x, const T* __restrict weight, const T* __restrict shift,
                            const Shape& s, int64_t img, int64_t a, int64_t b, T* __restrict z) {
  const int64_t C = s.filters;
  for (int k = 0; k < 4; ++k) {
    T* __restrict zk = z + k * C;
    for (int64_t f = 0; f < C; ++f) zk[f] = shift[f];
    for_each_tap(x, s, img, a, b, k, [&](int64_t tap, T p) {
      const T* __restrict w = weight + tap * C;
#pragma omp simd
      for (int64_t f = 0; f < C; ++f) zk[f] += p * w[f];
    });
  }
}

template <typename T>
void forward_impl(const T* x, const T* weight, const T* shift, const Shape& s, T* out, uint8_t* winner) {
  const int64_t C = s.filters;
  std::vector<T> z(4 * C), arg(C);
  for (int64_t r = 0; r < s.images * s.out_h; ++r) {
    for (int64_t b = 0; b < s.out_w; ++b) {
      window_products(x, weight, shift, s, r / s.out_h, r % s.out_h, b, z.data());
      // Branch-free, so that it vectorises: the first maximal position wins and a NaN propagates, as in ATen's
      // max-pooling; z[0..C) becomes the maximum.
      T* best = z.data();
      T* at = arg.data();
#pragma omp simd
      for (int64_t f = 0; f < C; ++f) at[f] = T(0);
      for (int k = 1; k < 4; ++k) {
        const T* zk = z.data() + k * C;
        const T position = T(k);
#pragma omp simd
        for (int64_t f = 0; f < C; ++f) {
          const T v = zk[f];
          const bool take = (v > best[f]) | (v != v);
          best[f] = take ? v : best[f];
          at[f] = take ? position : at[f];
        }
      }
      T* o = out + (r * s.out_w + b) * C;
      uint8_t* won = winner + (r * s.out_w + b) * C;
#pragma omp simd
      for (int64_t f = 0; f < C; ++f) {
        const bool through = (best[f] > T(0)) | (best[f] != best[f]);
        o[f] = through ? best[f] : T(0);
        won[f] = static_cast<uint8_t>(through ? at[f] : T(4));
      }
    }
  }
}

// Gradients of the weight and shift from the output's gradient g: each window's winning patch times g.
template <typename T>
void weight_grad_impl(const T* x, const T* g, const uint8_t* winner, const Shape& s, T* d_weight, T* d_shift) {
  const int64_t C = s.filters;
  std::vector<T> masked(4 * C);
  for (int64_t r = 0; r < s.images * s.out_h; ++r) {
    const int64_t img = r / s.out_h, a = r % s.out_h;
    for (int64_t b = 0; b < s.out_w; ++b) {
      const T* gr = g + (r * s.out_w + b) * C;
      const uint8_t* won = winner + (r * s.out_w + b) * C;
      for (int k = 0; k < 4; ++k)
#pragma omp simd
        for (int64_t f = 0; f < C; ++f) masked[k * C + f] = won[f] == k ? gr[f] : T(0);
#pragma omp simd
      for (int64_t f = 0; f < C; ++f) d_shift[f] += won[f] < 4 ? gr[f] : T(0);
      for (int k = 0; k < 4; ++k) {
        const T* __restrict mk = masked.data() + k * C;
        for_each_tap(x, s, img, a, b, k, [&](int64_t tap, T p) {
          T* __restrict dw = d_weight + tap * C;
#pragma omp simd
          for (int64_t f = 0; f < C; ++f) dw[f] += p * mk[f];
        });
      }
    }
  }
}

// The adjoint of weight_grad_impl in g (for double backward): each window's winning patch times u_weight, plus
// u_shift, where a value went through.
template <typename T>
void output_grad_impl(const T* x, const T* u_weight, const T* u_shift, const uint8_t* winner, const Shape& s,
                      T* d_g) {
  const int64_t C = s.filters;
  std::vector<T> z(4 * C);
  for (int64_t r = 0; r < s.images * s.out_h; ++r) {
    for (int64_t b = 0; b < s.out_w; ++b) {
      window_products(x, u_weight, u_shift, s, r / s.out_h, r % s.out_h, b, z.data());
      const uint8_t* won = winner + (r * s.out_w + b) * C;
      T* o = d_g + (r * s.out_w + b) * C;
      for (int64_t f = 0; f < C; ++f) o[f] = won[f] < 4 ? z[won[f] * C + f] : T(0);
    }
  }
}

// The sums over every position of a 3x3 stride-1 convolution of the padded input of its patch p (k = c * 9
// values) and of p p^T, in double, from which BatchNorm's statistics of the convolution follow. An image's
// patches are gathered tap-major, so that the k (k + 1) / 2 products are long vectorised dot products.
template <typename T>
void moments_impl(const T* x, const Shape& s, double* sum, double* outer) {
  const int64_t k = s.channels * 9, rows = s.padded_h - 2, cols = s.padded_w - 2, n = rows * cols;
  std::vector<double> p(k * n);
  for (int64_t img = 0; img < s.images; ++img) {
    for (int64_t ci = 0; ci < s.channels; ++ci) {
      const T* plane = x + (img * s.channels + ci) * s.padded_h * s.padded_w;
      for (int dy = 0; dy < 3; ++dy)
        for (int dx = 0; dx < 3; ++dx) {
          double* tap = p.data() + ((ci * 3 + dy) * 3 + dx) * n;
          for (int64_t r = 0; r < rows; ++r) {
            const T* row = plane + (r + dy) * s.padded_w + dx;
            for (int64_t c = 0; c < cols; ++c) tap[r * cols + c] = row[c];
          }
        }
    }
    for (int64_t t = 0; t < k; ++t) {
      const double* __restrict a = p.data() + t * n;
      double total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < n; ++j) total += a[j];
      sum[t] += total;
      for (int64_t u = 0; u <= t; ++u) {
        const double* __restrict b = p.data() + u * n;
        double dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < n; ++j) dot += a[j] * b[j];
        outer[t * k + u] += dot;
      }
    }
  }
  for (int64_t t = 0; t < k; ++t)
    for (int64_t u = 0; u < t; ++u) outer[u * k + t] = outer[t * k + u];
}

void check_input(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.device().is_cpu(), "x: contiguous [n, c, h + 2, w + 2] on the CPU");
}

void check(const torch::Tensor& x, const torch::Tensor& weight) {
  check_input(x);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(0) == x.size(1) * 9 &&
                  weight.scalar_type() == x.scalar_type(),
              "weight: contiguous [c * 9, filters] of x's dtype");
  TORCH_CHECK(x.size(2) % 2 == 0 && x.size(3) % 2 == 0, "the unpadded image sides must be even");
}

std::vector<torch::Tensor> forward(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& shift) {
  check(x, weight);
  const Shape s = shape_of(x, weight.size(1));
  auto out = torch::empty({s.images, s.out_h, s.out_w, s.filters}, x.options());
  auto winner = torch::empty({s.images, s.out_h, s.out_w, s.filters}, x.options().dtype(torch::kUInt8));
  auto sc = shift.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pooled_product_forward", [&] {
    forward_impl<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), s,
                           out.data_ptr<scalar_t>(), winner.data_ptr<uint8_t>());
  });
  return {out, winner};
}

// The mean [k] and biased covariance [k, k] of the patches of a 3x3 stride-1 convolution of the padded input x,
// in x's dtype.
std::vector<torch::Tensor> patch_moments(const torch::Tensor& x) {
  check_input(x);
  TORCH_CHECK(x.size(2) >= 3 && x.size(3) >= 3, "x: a padded input of 3x3 at least");
  const Shape s = shape_of(x, 0);
  const int64_t k = s.channels * 9;
  auto sum = torch::zeros({k}, x.options().dtype(torch::kFloat64));
  auto outer = torch::zeros({k, k}, x.options().dtype(torch::kFloat64));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "patch_moments", [&] {
    moments_impl<scalar_t>(x.data_ptr<scalar_t>(), s, sum.data_ptr<double>(), outer.data_ptr<double>());
  });
  const double count = double(s.images * (s.padded_h - 2) * (s.padded_w - 2));
  auto mean = sum / count;
  auto covariance = outer / count - torch::outer(mean, mean);
  return {mean.to(x.scalar_type()), covariance.to(x.scalar_type())};
}

torch::Tensor or_zeros(const torch::Tensor& t, at::IntArrayRef size, const torch::Tensor& like) {
  return t.defined() ? t.contiguous() : torch::zeros(size, like.options());
}

std::vector<torch::Tensor> weight_grad(const torch::Tensor& x, const torch::Tensor& g, const torch::Tensor& winner,
                                       int64_t filters) {
  const Shape s = shape_of(x, filters);
  auto d_weight = torch::zeros({s.channels * 9, filters}, x.options());
  auto d_shift = torch::zeros({filters}, x.options());
  auto gc = g.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pooled_product_weight_grad", [&] {
    weight_grad_impl<scalar_t>(x.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), winner.data_ptr<uint8_t>(), s,
                               d_weight.data_ptr<scalar_t>(), d_shift.data_ptr<scalar_t>());
  });
  return {d_weight, d_shift};
}

torch::Tensor output_grad(const torch::Tensor& x, const torch::Tensor& u_weight, const torch::Tensor& u_shift,
                          const torch::Tensor& winner) {
  const Shape s = shape_of(x, u_weight.size(1));
  auto d_g = torch::empty({s.images, s.out_h, s.out_w, s.filters}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pooled_product_output_grad", [&] {
    output_grad_impl<scalar_t>(x.data_ptr<scalar_t>(), u_weight.data_ptr<scalar_t>(), u_shift.data_ptr<scalar_t>(),
                               winner.data_ptr<uint8_t>(), s, d_g.data_ptr<scalar_t>());
  });
  return d_g;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The weight and shift gradients from the output's gradient: linear in it, so its own backward is the adjoint
// map (output_grad). Autograd functions in C++, so that a backward never waits for the GIL.
struct WeightGrad : public torch::autograd::Function<WeightGrad> {
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& g, const torch::Tensor& x,
                               const torch::Tensor& winner) {
    ctx->save_for_backward({x, winner});
    return weight_grad(x, g, winner, g.size(-1));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const int64_t filters = saved[1].size(-1);
    auto u_weight = or_zeros(grads[0], {x.size(1) * 9, filters}, x);
    auto u_shift = or_zeros(grads[1], {filters}, x);
    return {output_grad(x, u_weight, u_shift, saved[1]), torch::Tensor(), torch::Tensor()};
  }
};

struct PooledProduct : public torch::autograd::Function<PooledProduct> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& weight,
                               const torch::Tensor& shift) {
    auto result = ::forward(x, weight, shift);
    ctx->save_for_backward({x, result[1]});
    return result[0];
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto g = or_zeros(grads[0], saved[1].sizes(), saved[0]);
    auto d = WeightGrad::apply(g, saved[0], saved[1]);
    return {torch::Tensor(), d[0], d[1]};
  }
};

torch::Tensor pooled_product(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& shift) {
  return PooledProduct::apply(x, weight.contiguous(), shift);
}

}  // namespace

// The GIL is let go while the kernels run, so that task threads run theirs side by side.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pooled_product", &pooled_product, py::call_guard<py::gil_scoped_release>());
  m.def("patch_moments", &patch_moments, py::call_guard<py::gil_scoped_release>());
}
