// Grouped 4-bit GEMV (gemv_grouped.h): one pool launch over G x O output rows; each group's x row is
// prepared once and its rows run through gemv_cpu's row kernels with the expert's codes and absmax.
#include "gemv_grouped.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "gemv_cpu.h"
#include "thread_pool.h"

namespace qm {

void gemv_4bit_grouped(const GemvGroupedArgs& g, Isa isa, int threads) {
  const int64_t K = g.in_features, O = g.out_features, bs = g.blocksize;
  if (bs < 32 || bs > 4096 || (bs & (bs - 1)) != 0) {
    throw std::invalid_argument("blocksize " + std::to_string(bs) + " is not supported");
  }
  if (K <= 0 || K % bs != 0) {
    throw std::invalid_argument("in_features " + std::to_string(K) + " is not a multiple of blocksize " +
                                std::to_string(bs) + ": the fused GEMV needs whole blocks per row");
  }
  if (g.groups < 1 || O < 1) throw std::invalid_argument("groups and out_features must be >= 1");
  if (g.x_stride != 0 && g.x_stride != K) throw std::invalid_argument("x_stride must be 0 or in_features");
  if (g.packed_stride < O * K / 2 || g.absmax_stride < O * K / bs) {
    throw std::invalid_argument("packed_stride / absmax_stride are smaller than one expert's weight");
  }
  for (int64_t i = 0; i < g.groups; ++i) {
    if (g.ids[i] < 0 || g.ids[i] >= g.experts) {
      throw std::invalid_argument("expert id " + std::to_string(g.ids[i]) + " of group " + std::to_string(i) +
                                  " is outside 0.." + std::to_string(g.experts - 1));
    }
  }
  isa = resolve_isa_full(isa);
  const size_t esize = g.x_dtype == DType::F32 ? 4 : 2;
  std::vector<Gemv4bitArgs> args(static_cast<size_t>(g.groups));
  std::vector<GemvX> xs(static_cast<size_t>(g.groups));
  for (int64_t i = 0; i < g.groups; ++i) {
    Gemv4bitArgs& a = args[static_cast<size_t>(i)];
    a.x = static_cast<const char*>(g.x) + static_cast<size_t>(i * g.x_stride) * esize;
    a.x_dtype = g.x_dtype;
    a.batch = 1;
    a.in_features = K;
    a.out_features = O;
    a.blocksize = bs;
    a.packed = g.packed + g.ids[i] * g.packed_stride;
    a.quant_map = g.quant_map;
    a.absmax = g.absmax + g.ids[i] * g.absmax_stride;
    a.y = static_cast<char*>(g.y) + static_cast<size_t>(i * O) * esize;
    if (g.x_stride != 0 || i == 0) gemv_prepare_x(a, isa, xs[static_cast<size_t>(i)]);
  }
  // Rows of all groups in one launch; a chunk may span groups (grain 16 = a multiple of every tile height).
  parallel_for(g.groups * O, threads, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1;) {
      const int64_t i = r / O, o0 = r % O, o1 = std::min(O, o0 + (r1 - r));
      gemv_rows(args[static_cast<size_t>(i)], xs[static_cast<size_t>(g.x_stride != 0 ? i : 0)], o0, o1, isa);
      r += o1 - o0;
    }
  });
}

}  // namespace qm
