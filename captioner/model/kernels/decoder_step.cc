// Fused CPU kernels for the decoder step, float32: additive (Bahdanau) attention scores
// and the GRU update, each with its backward op.
//
// Built on first use by captioner/kernels/__init__.py (g++ with TensorFlow's own compile
// flags); the decoder falls back to TensorFlow ops when it cannot be built or loaded.
//
//   AdditiveAttentionScores(keys (N, G, A), query (N, K), v (A,)), K >= A
//     -> th (N, G, A) = tanh(keys + q), scores (N, G) = th . v, where q = query[:, :A]
//        (the query can be the whole output of the step's fused matmul h [W2 | U_r])
//   AdditiveAttentionScoresGrad(th (N, G, A), ds (N, G), v (A,), acc (B, G, A)), B >= N
//     -> dq (N, A) = v * sum_g ds (1 - th^2), dv (A,) = sum_{n,g} ds th,
//        acc_out (B, G, A) = acc with acc[:N] += ds th^2
//
// The TensorFlow-op version of the same math reads or writes every (N, G, A) tensor once
// per op, about 14 passes per decoder step (forward and backward); these do 4: read keys,
// write th; read th, update acc in place. Each row of A values is processed while it is in
// cache; tanh is Eigen's vectorised float tanh, the one TensorFlow's Tanh op uses. Work is
// split over images (rows n), so sums over cells run in a fixed order and the results do
// not depend on the number of threads.
//
//   GruUpdate(x (N, 3U), hq (N, K), bias (3U,), h (N, U)), K >= 3U
//     -> h_new (N, U), gates (N, 4U) = [z, r, n, hh]: Keras' reset_after GRU with the
//        recurrent projection hr = hq[:, K-3U:] + bias (hq's first K-3U columns are the
//        attention query, from the same matmul): z = sigmoid(x_z + hr_z),
//        r = sigmoid(x_r + hr_r), hh = hr_h, n = tanh(x_h + r hh), h_new = z h + (1 - z) n
//   GruUpdateGrad(dh (N, U), h (N, U), gates (N, 4U))
//     -> dx (N, 3U), dhr (N, 3U) (gradients of x and hr) and dh_direct = dh z (N, U)
//
// The TensorFlow-op version is ~15 small ops each way (splits, slices, sigmoids, ...).
//
//   SoftmaxXent(logits (N, V), labels (N,) int32)
//     -> loss (N,) = logsumexp(logits) - logits[label], backprop (N, V) = softmax - onehot
//   TensorFlow's SparseSoftmaxCrossEntropyWithLogits computes the same; this one handles
//   each row while it is in cache (max, exp into backprop, scale) on all threads.

#include <algorithm>
#include <cmath>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"
#include "Eigen/Core"

namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
using ArrayMap = Eigen::Map<Eigen::ArrayXf>;
using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf>;

// Work-sharding cost of one (n, g) row of A values, in the units Shard expects (~cycles).
int64_t RowCost(int64_t a) { return 20 * a; }

void ShardRows(OpKernelContext* ctx, int64_t rows, int64_t cost_per_row,
               const std::function<void(int64_t, int64_t)>& work) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers->num_threads, workers->workers, rows, cost_per_row, work);
}

}  // namespace

REGISTER_OP("AdditiveAttentionScores")
    .Input("keys: float")
    .Input("query: float")
    .Input("v: float")
    .Output("th: float")
    .Output("scores: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle keys, query, v;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &keys));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &query));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &v));
      DimensionHandle n, a;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(keys, 0), c->Dim(query, 0), &n));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(keys, 2), c->Dim(v, 0), &a));
      c->set_output(0, c->MakeShape({n, c->Dim(keys, 1), a}));
      c->set_output(1, c->MakeShape({n, c->Dim(keys, 1)}));
      return Status();
    });

REGISTER_OP("AdditiveAttentionScoresGrad")
    .Input("th: float")
    .Input("ds: float")
    .Input("v: float")
    .Input("acc: float")
    .Output("dq: float")
    .Output("dv: float")
    .Output("acc_out: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle th, ds, v, acc;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &th));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &ds));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &v));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 3, &acc));
      DimensionHandle n, g, a;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(th, 0), c->Dim(ds, 0), &n));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(th, 1), c->Dim(ds, 1), &g));
      TF_RETURN_IF_ERROR(c->Merge(g, c->Dim(acc, 1), &g));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(th, 2), c->Dim(v, 0), &a));
      TF_RETURN_IF_ERROR(c->Merge(a, c->Dim(acc, 2), &a));
      c->set_output(0, c->MakeShape({n, a}));
      c->set_output(1, c->MakeShape({a}));
      c->set_output(2, acc);
      return Status();
    });

class AdditiveAttentionScoresOp : public OpKernel {
 public:
  explicit AdditiveAttentionScoresOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& keys = ctx->input(0);
    const Tensor& query = ctx->input(1);
    const Tensor& v = ctx->input(2);
    OP_REQUIRES(ctx, keys.dims() == 3 && query.dims() == 2 && v.dims() == 1,
                InvalidArgument("AdditiveAttentionScores: keys (N, G, A), query (N, K) and "
                                "v (A,) expected, got ", keys.shape().DebugString(), ", ",
                                query.shape().DebugString(), ", ", v.shape().DebugString()));
    const int64_t n = keys.dim_size(0), g = keys.dim_size(1), a = keys.dim_size(2);
    const int64_t kq = query.dim_size(1);
    OP_REQUIRES(ctx, query.dim_size(0) == n && kq >= a && v.dim_size(0) == a,
                InvalidArgument("AdditiveAttentionScores: shapes do not agree: keys ",
                                keys.shape().DebugString(), ", query ",
                                query.shape().DebugString(), ", v ", v.shape().DebugString()));
    Tensor* th = nullptr;
    Tensor* scores = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, g, a}), &th));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n, g}), &scores));
    const float* k = keys.flat<float>().data();
    const float* q = query.flat<float>().data();
    const ConstArrayMap vv(v.flat<float>().data(), a);
    float* t = th->flat<float>().data();
    float* s = scores->flat<float>().data();
    ShardRows(ctx, n * g, RowCost(a), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const ConstArrayMap kr(k + row * a, a), qr(q + (row / g) * kq, a);
        ArrayMap tr(t + row * a, a);
        tr = (kr + qr).tanh();
        s[row] = (tr * vv).sum();
      }
    });
  }
};

class AdditiveAttentionScoresGradOp : public OpKernel {
 public:
  explicit AdditiveAttentionScoresGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& th = ctx->input(0);
    const Tensor& ds = ctx->input(1);
    const Tensor& v = ctx->input(2);
    const Tensor& acc = ctx->input(3);
    OP_REQUIRES(ctx, th.dims() == 3 && ds.dims() == 2 && v.dims() == 1 && acc.dims() == 3,
                InvalidArgument("AdditiveAttentionScoresGrad: th (N, G, A), ds (N, G), v (A,)"
                                " and acc (B, G, A) expected, got ", th.shape().DebugString(),
                                ", ", ds.shape().DebugString(), ", ", v.shape().DebugString(),
                                ", ", acc.shape().DebugString()));
    const int64_t n = th.dim_size(0), g = th.dim_size(1), a = th.dim_size(2);
    OP_REQUIRES(ctx, ds.dim_size(0) == n && ds.dim_size(1) == g && v.dim_size(0) == a &&
                         acc.dim_size(0) >= n && acc.dim_size(1) == g && acc.dim_size(2) == a,
                InvalidArgument("AdditiveAttentionScoresGrad: shapes do not agree: th ",
                                th.shape().DebugString(), ", ds ", ds.shape().DebugString(),
                                ", v ", v.shape().DebugString(), ", acc ",
                                acc.shape().DebugString()));
    Tensor* dq = nullptr;
    Tensor* dv = nullptr;
    Tensor* acc_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, a}), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({a}), &dv));
    // acc is updated in place when TensorFlow lets this op own its buffer, else copied.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({3}, 2, acc.shape(), &acc_out));
    const float* accin = acc.flat<float>().data();
    float* m = acc_out->flat<float>().data();
    if (m != accin) std::copy(accin, accin + acc.NumElements(), m);

    const float* t = th.flat<float>().data();
    const float* d = ds.flat<float>().data();
    const ConstArrayMap vv(v.flat<float>().data(), a);
    // Per image: dq_n = v * sum_g ds (1 - th^2); its share of dv; acc_n += ds th^2.
    Tensor dv_rows;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({n, a}),
                                           &dv_rows));
    float* dvr = dv_rows.flat<float>().data();
    float* dqp = dq->flat<float>().data();
    ShardRows(ctx, n, g * RowCost(a), [&](int64_t begin, int64_t end) {
      Eigen::ArrayXf sq(a);
      for (int64_t i = begin; i < end; ++i) {
        ArrayMap dq_i(dqp + i * a, a), dv_i(dvr + i * a, a);
        dq_i.setZero();
        dv_i.setZero();
        float ds_sum = 0.0f;
        for (int64_t j = 0; j < g; ++j) {
          const int64_t row = i * g + j;
          const float w = d[row];
          const ConstArrayMap tr(t + row * a, a);
          ArrayMap mr(m + row * a, a);
          sq = tr.square();
          mr += w * sq;
          dq_i -= w * sq;
          dv_i += w * tr;
          ds_sum += w;
        }
        dq_i = (dq_i + ds_sum) * vv;
      }
    });
    ArrayMap dv_out(dv->flat<float>().data(), a);
    dv_out.setZero();
    for (int64_t i = 0; i < n; ++i) dv_out += ConstArrayMap(dvr + i * a, a);
  }
};

REGISTER_OP("GruUpdate")
    .Input("x: float")
    .Input("hq: float")
    .Input("bias: float")
    .Input("h: float")
    .Output("h_new: float")
    .Output("gates: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, hq, bias, h;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &hq));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &bias));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &h));
      DimensionHandle n, u3, u4;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 0), c->Dim(hq, 0), &n));
      TF_RETURN_IF_ERROR(c->Merge(n, c->Dim(h, 0), &n));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), c->Dim(bias, 0), &u3));
      TF_RETURN_IF_ERROR(c->Multiply(c->Dim(h, 1), 4, &u4));
      c->set_output(0, c->MakeShape({n, c->Dim(h, 1)}));
      c->set_output(1, c->MakeShape({n, u4}));
      return Status();
    });

REGISTER_OP("GruUpdateGrad")
    .Input("dh: float")
    .Input("h: float")
    .Input("gates: float")
    .Output("dx: float")
    .Output("dhr: float")
    .Output("dh_direct: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle dh, h, gates;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &dh));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &h));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &gates));
      TF_RETURN_IF_ERROR(c->Merge(dh, h, &dh));
      DimensionHandle n, u3;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(dh, 0), c->Dim(gates, 0), &n));
      TF_RETURN_IF_ERROR(c->Multiply(c->Dim(dh, 1), 3, &u3));
      c->set_output(0, c->MakeShape({n, u3}));
      c->set_output(1, c->MakeShape({n, u3}));
      c->set_output(2, c->MakeShape({n, c->Dim(dh, 1)}));
      return Status();
    });

class GruUpdateOp : public OpKernel {
 public:
  explicit GruUpdateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& hq = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    const Tensor& h = ctx->input(3);
    OP_REQUIRES(ctx, x.dims() == 2 && hq.dims() == 2 && bias.dims() == 1 && h.dims() == 2,
                InvalidArgument("GruUpdate: x (N, 3U), hq (N, K), bias (3U,) and h (N, U) "
                                "expected, got ", x.shape().DebugString(), ", ",
                                hq.shape().DebugString(), ", ", bias.shape().DebugString(),
                                ", ", h.shape().DebugString()));
    const int64_t n = h.dim_size(0), u = h.dim_size(1), k = hq.dim_size(1);
    OP_REQUIRES(ctx, x.dim_size(0) == n && hq.dim_size(0) == n && x.dim_size(1) == 3 * u &&
                         bias.dim_size(0) == 3 * u && k >= 3 * u,
                InvalidArgument("GruUpdate: shapes do not agree: x ", x.shape().DebugString(),
                                ", hq ", hq.shape().DebugString(), ", bias ",
                                bias.shape().DebugString(), ", h ", h.shape().DebugString()));
    Tensor* h_new = nullptr;
    Tensor* gates = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, u}), &h_new));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n, 4 * u}), &gates));
    const float* xp = x.flat<float>().data();
    const float* hqp = hq.flat<float>().data();
    const float* hp = h.flat<float>().data();
    const float* bp = bias.flat<float>().data();
    float* out = h_new->flat<float>().data();
    float* gp = gates->flat<float>().data();
    const int64_t off = k - 3 * u;  // the recurrent part's first column in hq
    ShardRows(ctx, n, 3 * RowCost(u), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float* xr = xp + i * 3 * u;
        const float* hr = hqp + i * k + off;
        float* g = gp + i * 4 * u;
        ArrayMap z(g, u), r(g + u, u), nn(g + 2 * u, u), hh(g + 3 * u, u);
        z = (ConstArrayMap(xr, u) + ConstArrayMap(hr, u) + ConstArrayMap(bp, u)).logistic();
        r = (ConstArrayMap(xr + u, u) + ConstArrayMap(hr + u, u) +
             ConstArrayMap(bp + u, u)).logistic();
        hh = ConstArrayMap(hr + 2 * u, u) + ConstArrayMap(bp + 2 * u, u);
        nn = (ConstArrayMap(xr + 2 * u, u) + r * hh).tanh();
        const ConstArrayMap hprev(hp + i * u, u);
        ArrayMap(out + i * u, u) = z * hprev + (1.0f - z) * nn;
      }
    });
  }
};

class GruUpdateGradOp : public OpKernel {
 public:
  explicit GruUpdateGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dh = ctx->input(0);
    const Tensor& h = ctx->input(1);
    const Tensor& gates = ctx->input(2);
    OP_REQUIRES(ctx, dh.dims() == 2 && h.dims() == 2 && gates.dims() == 2 &&
                         dh.shape() == h.shape() && gates.dim_size(0) == h.dim_size(0) &&
                         gates.dim_size(1) == 4 * h.dim_size(1),
                InvalidArgument("GruUpdateGrad: dh (N, U), h (N, U) and gates (N, 4U) "
                                "expected, got ", dh.shape().DebugString(), ", ",
                                h.shape().DebugString(), ", ", gates.shape().DebugString()));
    const int64_t n = h.dim_size(0), u = h.dim_size(1);
    Tensor* dx = nullptr;
    Tensor* dhr = nullptr;
    Tensor* dh_direct = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, 3 * u}), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n, 3 * u}), &dhr));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({n, u}), &dh_direct));
    const float* dhp = dh.flat<float>().data();
    const float* hp = h.flat<float>().data();
    const float* gp = gates.flat<float>().data();
    float* dxp = dx->flat<float>().data();
    float* dhrp = dhr->flat<float>().data();
    float* ddp = dh_direct->flat<float>().data();
    ShardRows(ctx, n, 3 * RowCost(u), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float* g = gp + i * 4 * u;
        const ConstArrayMap z(g, u), r(g + u, u), nn(g + 2 * u, u), hh(g + 3 * u, u);
        const ConstArrayMap d(dhp + i * u, u), hprev(hp + i * u, u);
        ArrayMap dz(dxp + i * 3 * u, u), dr(dxp + i * 3 * u + u, u),
            dn(dxp + i * 3 * u + 2 * u, u);
        dn = d * (1.0f - z) * (1.0f - nn * nn);  // through the tanh
        dz = d * (hprev - nn) * z * (1.0f - z);
        dr = dn * hh * r * (1.0f - r);
        float* dhr_i = dhrp + i * 3 * u;
        ArrayMap(dhr_i, u) = dz;
        ArrayMap(dhr_i + u, u) = dr;
        ArrayMap(dhr_i + 2 * u, u) = dn * r;
        ArrayMap(ddp + i * u, u) = d * z;
      }
    });
  }
};

REGISTER_OP("SoftmaxXent")
    .Input("logits: float")
    .Input("labels: int32")
    .Output("loss: float")
    .Output("backprop: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle logits, labels;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &logits));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &labels));
      DimensionHandle n;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(logits, 0), c->Dim(labels, 0), &n));
      c->set_output(0, c->Vector(n));
      c->set_output(1, c->MakeShape({n, c->Dim(logits, 1)}));
      return Status();
    });

class SoftmaxXentOp : public OpKernel {
 public:
  explicit SoftmaxXentOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& logits = ctx->input(0);
    const Tensor& labels = ctx->input(1);
    OP_REQUIRES(ctx, logits.dims() == 2 && labels.dims() == 1 &&
                         labels.dim_size(0) == logits.dim_size(0),
                InvalidArgument("SoftmaxXent: logits (N, V) and labels (N,) expected, got ",
                                logits.shape().DebugString(), ", ",
                                labels.shape().DebugString()));
    const int64_t n = logits.dim_size(0), v = logits.dim_size(1);
    const int32_t* lab = labels.flat<int32_t>().data();
    for (int64_t i = 0; i < n; ++i) {
      OP_REQUIRES(ctx, lab[i] >= 0 && lab[i] < v,
                  InvalidArgument("SoftmaxXent: label ", lab[i], " at row ", i,
                                  " is outside the valid range [0, ", v, ")"));
    }
    Tensor* loss = nullptr;
    Tensor* backprop = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n}), &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n, v}), &backprop));
    const float* x = logits.flat<float>().data();
    float* lp = loss->flat<float>().data();
    float* bp = backprop->flat<float>().data();
    ShardRows(ctx, n, 2 * RowCost(v), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const ConstArrayMap xr(x + i * v, v);
        ArrayMap br(bp + i * v, v);
        const float top = xr.maxCoeff();
        br = (xr - top).exp();
        const float sum = br.sum();
        br *= 1.0f / sum;
        br(lab[i]) -= 1.0f;
        lp[i] = std::log(sum) + top - xr(lab[i]);
      }
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("SoftmaxXent").Device(DEVICE_CPU), SoftmaxXentOp);
REGISTER_KERNEL_BUILDER(Name("GruUpdate").Device(DEVICE_CPU), GruUpdateOp);
REGISTER_KERNEL_BUILDER(Name("GruUpdateGrad").Device(DEVICE_CPU), GruUpdateGradOp);
REGISTER_KERNEL_BUILDER(Name("AdditiveAttentionScores").Device(DEVICE_CPU),
                        AdditiveAttentionScoresOp);
REGISTER_KERNEL_BUILDER(Name("AdditiveAttentionScoresGrad").Device(DEVICE_CPU),
                        AdditiveAttentionScoresGradOp);
