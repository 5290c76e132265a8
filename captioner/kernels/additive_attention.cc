// Fused CPU kernels for additive (Bahdanau) attention scores, float32.
//
// Built on first use by captioner/kernels/__init__.py (g++ with TensorFlow's own compile
// flags); the decoder falls back to TensorFlow ops when it cannot be built or loaded.
//
//   AdditiveAttentionScores(keys (N, G, A), query (N, A), v (A,))
//     -> th (N, G, A) = tanh(keys + query), scores (N, G) = th . v
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

#include <algorithm>
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
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(keys, 2), c->Dim(query, 1), &a));
      TF_RETURN_IF_ERROR(c->Merge(a, c->Dim(v, 0), &a));
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
                InvalidArgument("AdditiveAttentionScores: keys (N, G, A), query (N, A) and "
                                "v (A,) expected, got ", keys.shape().DebugString(), ", ",
                                query.shape().DebugString(), ", ", v.shape().DebugString()));
    const int64_t n = keys.dim_size(0), g = keys.dim_size(1), a = keys.dim_size(2);
    OP_REQUIRES(ctx, query.dim_size(0) == n && query.dim_size(1) == a && v.dim_size(0) == a,
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
        const ConstArrayMap kr(k + row * a, a), qr(q + (row / g) * a, a);
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

REGISTER_KERNEL_BUILDER(Name("AdditiveAttentionScores").Device(DEVICE_CPU),
                        AdditiveAttentionScoresOp);
REGISTER_KERNEL_BUILDER(Name("AdditiveAttentionScoresGrad").Device(DEVICE_CPU),
                        AdditiveAttentionScoresGradOp);
