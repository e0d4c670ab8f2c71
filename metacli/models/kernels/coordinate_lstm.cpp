// One update of the LSTM meta-learner for all the learner's coordinates, fused: see
// metacli/models/kernels/coordinate_lstm.py for why and how it is used.
//
// Layouts, float32 and contiguous, coordinates last: pg [2, n] (the preprocessed gradient), grad, cell, forget,
// input [n], h, c [H, n] (empty at the first update: zeros). Weights: shared [4H] (the first layer's biases plus
// its loss input, one value for all coordinates), w_in [4H, 2], w_hh [4H, H]; the gates' wf, wi [H + 2] and
// bf, bi [1]. Gate rows in nn.LSTMCell's order: input, forget, candidate, output. The coordinates go in blocks of
// kBlock whose gates stay in cache; loops over a block are innermost, so that the compiler vectorises them, and the
// products with W_hh go to ATen's matrix multiply, block by block. Elementwise work runs on the calling thread
// (the learner's tasks run on task threads), the products on that thread's share of the intra-op threads.
#include <torch/extension.h>

#include <cmath>
#include <vector>

#if defined(__x86_64__) && defined(__GLIBC__)
// glibc's vector maths (libmvec), declared so that the activations vectorise: glibc's headers declare these only
// under -ffast-math, whose other liberties (no NaN, reassociation) the kernels do not take.
extern "C" {
__attribute__((simd("notinbranch"))) float expf(float) noexcept;
__attribute__((simd("notinbranch"))) float tanhf(float) noexcept;
}
#endif

namespace {

constexpr int64_t kBlock = 512;

inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

struct Weights {
  int64_t hidden;
  const float *shared, *w_in, *wf, *wi;
  torch::Tensor w_hh;  // [4H, H], for the products, which go to ATen's matrix multiply
  float bf, bi;
};

struct Inputs {
  int64_t n;
  const float *pg, *grad, *cell, *h, *c, *forget, *input;  // h and c null at the first update
};

// One block's forward, kept for its own outputs or for the backward: g [4H][kBlock] ends as the activations
// (i, f, candidate, o), cn and tc [H][kBlock] as c_t and tanh(c_t), F and I [kBlock] as the two gates.
struct Block {
  std::vector<float> g, cn, tc, F, I;
  explicit Block(int64_t hidden)
      : g(4 * hidden * kBlock), cn(hidden * kBlock), tc(hidden * kBlock), F(kBlock), I(kBlock) {}
};

// A block's gates [4H, len] as a tensor over its buffer, and h_{t-1}'s columns [H, len] of the same coordinates.
torch::Tensor gates(Block& b, int64_t len) {
  return torch::from_blob(b.g.data(), {static_cast<int64_t>(b.g.size()) / kBlock, len}, {kBlock, 1});
}

torch::Tensor previous(const Inputs& in, const Weights& w, int64_t j0, int64_t len) {
  return torch::from_blob(const_cast<float*>(in.h) + j0, {w.hidden, len}, {in.n, 1});
}

void forward_block(const Weights& w, const Inputs& in, int64_t j0, int64_t len, Block& b) {
  const int64_t H = w.hidden, n = in.n;
  const float* pg0 = in.pg + j0;
  const float* pg1 = in.pg + n + j0;
  for (int64_t r = 0; r < 4 * H; ++r) {
    float* gr = b.g.data() + r * kBlock;
    const float s = w.shared[r], a0 = w.w_in[2 * r], a1 = w.w_in[2 * r + 1];
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) gr[j] = s + a0 * pg0[j] + a1 * pg1[j];
  }
  if (in.h != nullptr) gates(b, len).addmm_(w.w_hh, previous(in, w, j0, len));
  float zf[kBlock], zi[kBlock];
  const float *cell = in.cell + j0, *fp = in.forget + j0, *ip = in.input + j0;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    zf[j] = w.bf + w.wf[H] * cell[j] + w.wf[H + 1] * fp[j];
    zi[j] = w.bi + w.wi[H] * cell[j] + w.wi[H + 1] * ip[j];
  }
  const float zeros[kBlock] = {};
  for (int64_t k = 0; k < H; ++k) {
    float *gi = b.g.data() + k * kBlock, *gf = gi + H * kBlock, *gc = gf + H * kBlock, *go = gc + H * kBlock;
    float *ck = b.cn.data() + k * kBlock, *tk = b.tc.data() + k * kBlock;
    const float* cp = in.c == nullptr ? zeros : in.c + k * n + j0;
    const float wfk = w.wf[k], wik = w.wi[k];
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float i = sigmoid(gi[j]), f = sigmoid(gf[j]), cand = tanhf(gc[j]), o = sigmoid(go[j]);
      const float c = i * cand + f * cp[j];
      const float t = tanhf(c);
      gi[j] = i, gf[j] = f, gc[j] = cand, go[j] = o, ck[j] = c, tk[j] = t;
      zf[j] += wfk * (o * t);
      zi[j] += wik * (o * t);
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) b.F[j] = sigmoid(zf[j]), b.I[j] = sigmoid(zi[j]);
}

float* data_or_null(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

Weights weights_of(const torch::Tensor& shared, const torch::Tensor& w_in, const torch::Tensor& w_hh,
                   const torch::Tensor& wf, const torch::Tensor& bf, const torch::Tensor& wi,
                   const torch::Tensor& bi) {
  return {w_hh.size(1), shared.data_ptr<float>(), w_in.data_ptr<float>(), wf.data_ptr<float>(),
          wi.data_ptr<float>(), w_hh, bf.item<float>(), bi.item<float>()};
}

Inputs inputs_of(const torch::Tensor& pg, const torch::Tensor& grad, const torch::Tensor& cell,
                 const torch::Tensor& h, const torch::Tensor& c, const torch::Tensor& forget,
                 const torch::Tensor& input) {
  return {cell.numel(), pg.data_ptr<float>(), grad.data_ptr<float>(), cell.data_ptr<float>(), data_or_null(h),
          data_or_null(c), forget.data_ptr<float>(), input.data_ptr<float>()};
}

// {c_t (the new cell: the learner's parameters), h_t, c_t of the first layer, f_t, i_t}.
torch::autograd::variable_list forward(const torch::autograd::variable_list& x) {
  const torch::NoGradGuard no_grad;
  const Inputs in = inputs_of(x[0], x[1], x[2], x[3], x[4], x[5], x[6]);
  const Weights w = weights_of(x[7], x[8], x[9], x[10], x[11], x[12], x[13]);
  const int64_t H = w.hidden, n = in.n;
  auto cell_out = torch::empty({n}, x[2].options());
  auto h_out = torch::empty({H, n}, x[2].options()), c_out = torch::empty({H, n}, x[2].options());
  auto f_out = torch::empty({n}, x[2].options()), i_out = torch::empty({n}, x[2].options());
  float *cell_new = cell_out.data_ptr<float>(), *hn = h_out.data_ptr<float>(), *cn = c_out.data_ptr<float>();
  float *fn = f_out.data_ptr<float>(), *in_ = i_out.data_ptr<float>();
  Block b(H);
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n - j0);
    forward_block(w, in, j0, len, b);
    for (int64_t k = 0; k < H; ++k) {
      const float *ck = b.cn.data() + k * kBlock, *tk = b.tc.data() + k * kBlock;
      const float* go = b.g.data() + (3 * H + k) * kBlock;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) cn[k * n + j0 + j] = ck[j], hn[k * n + j0 + j] = go[j] * tk[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      cell_new[j0 + j] = b.F[j] * in.cell[j0 + j] - b.I[j] * in.grad[j0 + j];
      fn[j0 + j] = b.F[j], in_[j0 + j] = b.I[j];
    }
  }
  return {cell_out, h_out, c_out, f_out, i_out};
}

// The gradients of the inputs x (as forward's) from those of forward's outputs d: the forward is recomputed block by
// block, so nothing but the inputs is kept between the two. The small weights' gradients are summed in double.
torch::autograd::variable_list backward(const torch::autograd::variable_list& x,
                                        const torch::autograd::variable_list& d) {
  const torch::NoGradGuard no_grad;
  const Inputs in = inputs_of(x[0], x[1], x[2], x[3], x[4], x[5], x[6]);
  const Weights w = weights_of(x[7], x[8], x[9], x[10], x[11], x[12], x[13]);
  const int64_t H = w.hidden, n = in.n, G = 4 * H;
  const float *d_cell_new = d[0].data_ptr<float>(), *d_hn = d[1].data_ptr<float>();
  const float *d_cn = d[2].data_ptr<float>(), *d_fn = d[3].data_ptr<float>(), *d_in = d[4].data_ptr<float>();
  const auto options = x[2].options();
  auto d_cell = torch::empty({n}, options), d_forget = torch::empty({n}, options);
  auto d_input = torch::empty({n}, options);
  auto d_h = in.h ? torch::empty({H, n}, options) : torch::Tensor();
  auto d_c = in.c ? torch::empty({H, n}, options) : torch::Tensor();
  float *dcell = d_cell.data_ptr<float>(), *dfp = d_forget.data_ptr<float>(), *dip = d_input.data_ptr<float>();
  std::vector<double> s_shared(G), s_in(2 * G), s_wf(H + 2), s_wi(H + 2);
  auto d_w_hh = torch::zeros({G, H}, options);
  double s_bf = 0, s_bi = 0;
  std::vector<float> discard(kBlock);  // where dc_{t-1} goes at the first update, which has no c_{t-1}
  const float zeros[kBlock] = {};
  Block b(H);
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n - j0);
    forward_block(w, in, j0, len, b);
    float dzf[kBlock], dzi[kBlock];
    double sf = 0, si = 0, sf_cell = 0, si_cell = 0, sf_prev = 0, si_prev = 0;
#pragma omp simd reduction(+ : sf, si, sf_cell, si_cell, sf_prev, si_prev)
    for (int64_t j = 0; j < len; ++j) {
      const float F = b.F[j], I = b.I[j], cell = in.cell[j0 + j], dnew = d_cell_new[j0 + j];
      dzf[j] = (d_fn[j0 + j] + dnew * cell) * F * (1.0f - F);
      dzi[j] = (d_in[j0 + j] - dnew * in.grad[j0 + j]) * I * (1.0f - I);
      dcell[j0 + j] = dnew * F + dzf[j] * w.wf[H] + dzi[j] * w.wi[H];
      dfp[j0 + j] = dzf[j] * w.wf[H + 1];
      dip[j0 + j] = dzi[j] * w.wi[H + 1];
      sf += dzf[j], si += dzi[j];
      sf_cell += dzf[j] * cell, si_cell += dzi[j] * cell;
      sf_prev += dzf[j] * in.forget[j0 + j], si_prev += dzi[j] * in.input[j0 + j];
    }
    s_bf += sf, s_bi += si, s_wf[H] += sf_cell, s_wi[H] += si_cell, s_wf[H + 1] += sf_prev, s_wi[H + 1] += si_prev;
    // The first layer, unit by unit: its gates' activations become their pre-activations' gradients.
    for (int64_t k = 0; k < H; ++k) {
      float *gi = b.g.data() + k * kBlock, *gf = gi + H * kBlock, *gc = gf + H * kBlock, *go = gc + H * kBlock;
      const float* tk = b.tc.data() + k * kBlock;
      const float* cp = in.c ? in.c + k * n + j0 : zeros;
      float* dcp = in.c ? d_c.data_ptr<float>() + k * n + j0 : discard.data();
      const float *dh_next = d_hn + k * n + j0, *dc_next = d_cn + k * n + j0;
      const float wfk = w.wf[k], wik = w.wi[k];
      float hf = 0, hi = 0;
#pragma omp simd reduction(+ : hf, hi)
      for (int64_t j = 0; j < len; ++j) {
        const float i = gi[j], f = gf[j], cand = gc[j], o = go[j], t = tk[j];
        hf += dzf[j] * (o * t), hi += dzi[j] * (o * t);
        const float dh = dh_next[j] + dzf[j] * wfk + dzi[j] * wik;
        const float dc = dc_next[j] + dh * o * (1.0f - t * t);
        dcp[j] = dc * f;
        gi[j] = dc * cand * i * (1.0f - i);
        gf[j] = dc * cp[j] * f * (1.0f - f);
        gc[j] = dc * i * (1.0f - cand * cand);
        go[j] = dh * t * o * (1.0f - o);
      }
      s_wf[k] += hf, s_wi[k] += hi;
    }
    const float* pg0 = in.pg + j0;
    const float* pg1 = in.pg + n + j0;
    for (int64_t r = 0; r < G; ++r) {
      const float* gr = b.g.data() + r * kBlock;
      float s = 0, s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s, s0, s1)
      for (int64_t j = 0; j < len; ++j) s += gr[j], s0 += gr[j] * pg0[j], s1 += gr[j] * pg1[j];
      s_shared[r] += s, s_in[2 * r] += s0, s_in[2 * r + 1] += s1;
    }
    if (in.h == nullptr) continue;
    const auto d_gates = gates(b, len), h_prev = previous(in, w, j0, len);
    d_w_hh.addmm_(d_gates, h_prev.t());
    auto d_h_prev = torch::from_blob(d_h.data_ptr<float>() + j0, {H, len}, {n, 1});
    torch::mm_out(d_h_prev, w.w_hh.t(), d_gates);
  }
  auto as_tensor = [&](const std::vector<double>& v, std::vector<int64_t> shape) {
    return torch::tensor(v, torch::dtype(torch::kFloat64)).to(torch::kFloat32).reshape(shape);
  };
  return {d_cell,
          d_h,
          d_c,
          d_forget,
          d_input,
          as_tensor(s_shared, {G}),
          as_tensor(s_in, {G, 2}),
          d_w_hh,
          as_tensor(s_wf, {H + 2}),
          as_tensor({s_bf}, {1}),
          as_tensor(s_wi, {H + 2}),
          as_tensor({s_bi}, {1})};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

torch::Tensor or_zeros(const torch::Tensor& grad, at::IntArrayRef shape, const torch::Tensor& like) {
  return grad.defined() ? grad.contiguous() : torch::zeros(shape, like.options());
}

// An autograd function in C++, so that a backward never waits for the GIL. Its backward is not differentiable in
// turn: the learner needs first derivatives only (its gradient inputs are constants).
struct CoordinateLSTM : public torch::autograd::Function<CoordinateLSTM> {
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& pg, const torch::Tensor& grad,
                               const torch::Tensor& cell, const torch::Tensor& h, const torch::Tensor& c,
                               const torch::Tensor& forget, const torch::Tensor& input, const torch::Tensor& shared,
                               const torch::Tensor& w_in, const torch::Tensor& w_hh, const torch::Tensor& wf,
                               const torch::Tensor& bf, const torch::Tensor& wi, const torch::Tensor& bi) {
    variable_list x{pg, grad, cell, h, c, forget, input, shared, w_in, w_hh, wf, bf, wi, bi};
    ctx->save_for_backward(x);
    return ::forward(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto x = ctx->get_saved_variables();
    const int64_t H = x[9].size(1), n = x[2].numel();
    const variable_list d{or_zeros(grads[0], {n}, x[2]), or_zeros(grads[1], {H, n}, x[2]),
                          or_zeros(grads[2], {H, n}, x[2]), or_zeros(grads[3], {n}, x[2]),
                          or_zeros(grads[4], {n}, x[2])};
    auto g = ::backward(x, d);
    return {torch::Tensor(), torch::Tensor(), g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10],
            g[11]};
  }
};

variable_list update(const torch::Tensor& pg, const torch::Tensor& grad, const torch::Tensor& cell,
                     const torch::Tensor& h, const torch::Tensor& c, const torch::Tensor& forget,
                     const torch::Tensor& input, const torch::Tensor& shared, const torch::Tensor& w_in,
                     const torch::Tensor& w_hh, const torch::Tensor& wf, const torch::Tensor& bf,
                     const torch::Tensor& wi, const torch::Tensor& bi) {
  return CoordinateLSTM::apply(pg, grad, cell, h, c, forget, input, shared, w_in, w_hh, wf, bf, wi, bi);
}

}  // namespace

// The GIL is let go while the kernels run, so that task threads run theirs side by side.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("update", &update, py::call_guard<py::gil_scoped_release>());
}
