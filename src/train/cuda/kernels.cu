// jobd's CUDA kernels for training: RMSNorm, rotary embeddings, SwiGLU, softmax cross-entropy
// (each with its backward), the pieces of causal attention around cuBLAS's batched matrix
// products (head split/merge, masked softmax and its backward), and AdamW. Compiled to PTX by
// build.rs (feature `cuda`) and loaded by src/train/cuda/mod.rs.
//
// Every kernel exists for f32, bf16 and f16 storage (`_f32` / `_bf16` / `_f16`); arithmetic is
// always f32. The 16-bit types are handled as their bit patterns (bf16 an unsigned short, f16 a
// struct around one, so that the two overload apart) so that no CUDA header is needed.
// Reductions use a fixed tree per block and fixed block ranges, so results do not depend on
// scheduling: the same inputs give the same bits on every run.

typedef unsigned short bf16_t;

struct f16_t {
  unsigned short bits;
};

// Dynamic shared memory (the launch's `shared_mem_bytes`); emulator.cc defines its own.
#ifndef JOBD_DYNAMIC_SHARED
#define JOBD_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long i) {
  return __uint_as_float(((unsigned)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long i, float v) {
  unsigned u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p[i] = (bf16_t)((u >> 16) | 0x40u);  // quiet NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    p[i] = (bf16_t)(u >> 16);
  }
}

// IEEE binary16, rounding to nearest even (overflow to ±inf, NaN stays NaN). On the device one
// conversion instruction each way; in the CPU emulator the same results in integer arithmetic
// (tested against the `half` crate for every f16 and a sweep of f32 bit patterns).
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float ld(const f16_t* p, long i) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i].bits));
  return f;
}
__device__ __forceinline__ void st(f16_t* p, long i, float v) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  p[i].bits = h;
}
#else
inline float ld(const f16_t* p, long i) {
  unsigned h = p[i].bits;
  unsigned sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (m << 13));  // inf, NaN
  if (e != 0) return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
  // Zero or subnormal: m · 2⁻²⁴, exact in f32.
  return __uint_as_float(sign | __float_as_uint((float)m * 5.9604644775390625e-8f));
}
inline void st(f16_t* p, long i, float v) {
  unsigned u = __float_as_uint(v);
  unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
  unsigned a = u & 0x7fffffffu;
  unsigned short h;
  if (a > 0x7f800000u) {
    h = 0x7e00u;  // quiet NaN
  } else if (a >= 0x477ff000u) {
    h = 0x7c00u;  // at or past halfway from 65504 to 2¹⁶: infinity
  } else if (a >= 0x38800000u) {
    // Normal: rebias the exponent (127 → 15), round the 13 dropped bits to nearest even.
    unsigned r = a - 0x38000000u;
    r += 0xfffu + ((r >> 13) & 1u);
    h = (unsigned short)(r >> 13);
  } else if (a < 0x33000000u) {
    h = 0;  // below half the smallest subnormal (2⁻²⁵), or exactly it (ties to even: 0)
  } else {
    // Subnormal: the 24-bit significand shifted to units of 2⁻²⁴, rounded to nearest even
    // (a carry into bit 10 gives the smallest normal, whose bits follow on).
    unsigned e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    unsigned shift = 126u - e;  // 14..24
    unsigned k = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (k & 1u))) ++k;
    h = (unsigned short)k;
  }
  p[i].bits = sign | h;
}
#endif

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float block_sum(float v, float* shared32) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  int warps = blockDim.x >> 5;
  float t = lane < warps ? shared32[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}

__device__ float block_max(float v, float* shared32) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  int warps = blockDim.x >> 5;
  float t = lane < warps ? shared32[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
  return t;
}

// ------------------------------------------------------------------------------------------
// RMSNorm: y = x · rsqrt(mean(x²) + eps) · w, one block per row.

template <typename T>
__device__ void rms_fwd(const T* x, const float* w, T* y, int rows, int d, float eps) {
  __shared__ float sh[32];
  long r = blockIdx.x;
  if (r >= rows) return;
  const long o = r * (long)d;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float v = ld(x, o + c);
    ss += v * v;
  }
  float inv = rsqrtf(block_sum(ss, sh) / d + eps);
  for (int c = threadIdx.x; c < d; c += blockDim.x) st(y, o + c, ld(x, o + c) * inv * w[c]);
}

// dx = r·w·dy − x·r³·mean(x·w·dy); the weight's gradient Σ_rows dy·x·r is summed per block of
// rows into `dw_part[block][d]` (dynamic shared memory of d floats), then by rms_dw_sum.
template <typename T>
__device__ void rms_bwd(const T* x, const float* w, const T* dy, T* dx, float* dw_part,
                        int rows, int d, float eps, int rows_per_block) {
  __shared__ float sh[32];
  JOBD_DYNAMIC_SHARED(float, acc);
  for (int c = threadIdx.x; c < d; c += blockDim.x) acc[c] = 0.0f;
  int r0 = blockIdx.x * rows_per_block;
  int r1 = min(rows, r0 + rows_per_block);
  for (int r = r0; r < r1; ++r) {
    const long o = (long)r * d;
    float ss = 0.0f, dot = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
      float xv = ld(x, o + c), g = ld(dy, o + c);
      ss += xv * xv;
      dot += xv * w[c] * g;
    }
    ss = block_sum(ss, sh);
    dot = block_sum(dot, sh);
    float inv = rsqrtf(ss / d + eps);
    float k = inv * inv * inv * dot / d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
      float xv = ld(x, o + c), g = ld(dy, o + c);
      st(dx, o + c, inv * w[c] * g - xv * k);
      acc[c] += g * xv * inv;
    }
  }
  for (int c = threadIdx.x; c < d; c += blockDim.x) dw_part[(long)blockIdx.x * d + c] = acc[c];
}

// Column sums of part[blocks][d]: 1024 threads per 32 columns, 32 lanes each summing every
// 32nd row, then lane sums added in lane order (a fixed order: the same bits every run).
extern "C" __global__ void rms_dw_sum(const float* part, float* dw, int blocks, int d) {
  __shared__ float sh[32][33];
  int col = threadIdx.x & 31, lane = threadIdx.x >> 5;
  int c = blockIdx.x * 32 + col;
  float s = 0.0f;
  if (c < d)
    for (int b = lane; b < blocks; b += 32) s += part[(long)b * d + c];
  sh[lane][col] = s;
  __syncthreads();
  if (lane == 0 && c < d) {
    float t = 0.0f;
    for (int l = 0; l < 32; ++l) t += sh[l][col];
    dw[c] = t;
  }
}

// ------------------------------------------------------------------------------------------
// Rotate-half rotary embedding of x (B, T, heads·hd) with tables (T, hd) in f32; `transpose`
// applies the inverse rotation (the backward). One block per (B·T) row, one thread per rotated
// pair of the row: the row's position is worked out once per block, and a pair's head with one
// 32-bit division (64-bit index arithmetic per element made these copies compute-bound).

template <typename T>
__device__ void rope(const T* x, const float* cos, const float* sin, T* y, long rows, int t,
                     int heads, int hd, int transpose) {
  long bt = blockIdx.x;
  if (bt >= rows) return;
  int half = hd / 2;
  int pairs = heads * half;
  int pos = (int)(bt % t);
  const float* c = cos + (long)pos * hd;
  const float* s = sin + (long)pos * hd;
  const long row = bt * heads * (long)hd;
  for (int k = threadIdx.x; k < pairs; k += blockDim.x) {
    int h = k / half, i = k - h * half;
    long base = row + (long)h * hd;
    float a = ld(x, base + i), b = ld(x, base + i + half);
    if (transpose) {
      st(y, base + i, a * c[i] + b * s[i + half]);
      st(y, base + i + half, b * c[i + half] - a * s[i]);
    } else {
      st(y, base + i, a * c[i] - b * s[i]);
      st(y, base + i + half, b * c[i + half] + a * s[i + half]);
    }
  }
}

// ------------------------------------------------------------------------------------------
// SwiGLU: y = silu(g)·u.

template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* y, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gv = ld(g, i);
  float s = 1.0f / (1.0f + __expf(-gv));
  st(y, i, gv * s * ld(u, i));
}

template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dy, T* dg, T* du, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gv = ld(g, i), uv = ld(u, i), d = ld(dy, i);
  float s = 1.0f / (1.0f + __expf(-gv));
  st(dg, i, d * uv * s * (1.0f + gv * (1.0f - s)));
  st(du, i, d * gv * s);
}

// ------------------------------------------------------------------------------------------
// Softmax cross-entropy over rows of V logits: out = mask·(lse − x[label]); a label outside the
// vocabulary gives NaN (the trainer reports a non-finite loss). One block per row.

template <typename T>
__device__ void ce_fwd(const T* x, const unsigned* labels, const float* mask, float* out,
                       float* lse_out, int n, int v) {
  __shared__ float sh[32];
  long r = blockIdx.x;
  if (r >= n) return;
  const long o = r * (long)v;
  float m = -INFINITY;
  for (int c = threadIdx.x; c < v; c += blockDim.x) m = fmaxf(m, ld(x, o + c));
  m = block_max(m, sh);
  float s = 0.0f;
  for (int c = threadIdx.x; c < v; c += blockDim.x) s += __expf(ld(x, o + c) - m);
  s = block_sum(s, sh);
  if (threadIdx.x == 0) {
    float lse = m + logf(s);
    unsigned l = labels[r];
    lse_out[r] = lse;
    out[r] = l < (unsigned)v ? mask[r] * (lse - ld(x, o + l)) : __int_as_float(0x7fc00000);
  }
}

template <typename T>
__device__ void ce_bwd(const T* x, const unsigned* labels, const float* mask, const float* lse,
                       const float* grad, T* dx, int n, int v) {
  long r = blockIdx.x;
  if (r >= n) return;
  const long o = r * (long)v;
  float k = grad[r] * mask[r], l = lse[r];
  unsigned lab = labels[r];
  for (int c = threadIdx.x; c < v; c += blockDim.x) {
    float p = __expf(ld(x, o + c) - l);
    st(dx, o + c, k * (p - (c == (int)lab ? 1.0f : 0.0f)));
  }
}

// ------------------------------------------------------------------------------------------
// Attention around batched matrix products. Projections are (B, T, heads·D); the products want
// (B·H, T, D). `heads_split` copies (B, T, hs, D) into (B, H, T, D) with each source head
// serving H/hs destination heads (grouped-query keys and values); `heads_merge` goes back,
// summing the H/hd heads that share a destination head (their gradients), from the same type
// or from f32 (dK and dV, summed over the causal blocks in f32).

// One block per destination row of D elements; the row's indices are worked out once per block.
template <typename T>
__device__ void heads_split(const T* src, T* dst, int b, int t, int hs, int h, int d) {
  long r = blockIdx.x;  // (bb, hh, p) of the destination (B, H, T, D)
  if (r >= (long)b * h * t) return;
  int p = (int)(r % t);
  long bh = r / t;
  int hh = (int)(bh % h);
  long bb = bh / h;
  int sh = hh / (h / hs);
  const long from = ((bb * t + p) * hs + sh) * d, to = r * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) st(dst, to + c, ld(src, from + c));
}

template <typename S, typename T>
__device__ void heads_merge(const S* src, T* dst, int b, int t, int hd, int h, int d) {
  long r = blockIdx.x;  // (bb, p, g) of the destination (B, T, hd, D)
  if (r >= (long)b * t * hd) return;
  int g = (int)(r % hd);
  long bp = r / hd;
  int p = (int)(bp % t);
  long bb = bp / t;
  int rep = h / hd;
  const long to = r * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float s = 0.0f;
    for (int k = 0; k < rep; ++k) s += ld(src, ((bb * h + g * rep + k) * t + p) * d + c);
    st(dst, to + c, s);
  }
}

__device__ __forceinline__ bool allowed(int i, int j, int start, int window) {
  int q = start + i;
  return j <= q && (window <= 0 || q - j < window);
}

// The softmax kernels run on one block of query rows (src/train/attention_blocks.rs): rows
// r0..r0+nrows of each of the B·H items, whose scores-like buffers hold those rows only
// ((B·H, nrows, S), f32 scores and dP, P and dS as T), for keys 0..e (the last key the block's
// rows may see: nothing beyond it is written or read). One CUDA block per row.

// p = softmax(scale·s) over the allowed keys, written as T for the P·V product; the row's
// log-sum-exp (of the scaled scores) is kept for the backward, at (B·H, T).
template <typename T>
__device__ void attn_softmax_fwd(const float* scores, T* p, float* lse, int t, int s, int start,
                                 int window, float scale, int r0, int nrows, int e) {
  __shared__ float sh[32];
  long row = blockIdx.x;
  long item = row / nrows;
  int i = r0 + (int)(row % nrows);
  const long o = row * (long)s;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < e; j += blockDim.x)
    if (allowed(i, j, start, window)) m = fmaxf(m, scores[o + j] * scale);
  m = block_max(m, sh);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < e; j += blockDim.x)
    if (allowed(i, j, start, window)) sum += __expf(scores[o + j] * scale - m);
  sum = block_sum(sum, sh);
  float l = m + logf(sum);
  for (int j = threadIdx.x; j < e; j += blockDim.x)
    st(p, o + j, allowed(i, j, start, window) ? __expf(scores[o + j] * scale - l) : 0.0f);
  if (threadIdx.x == 0) lse[item * t + i] = l;
}

// Backward of the softmax: from the recomputed scores and dP = dO·Vᵀ, writes P (for
// dV = Pᵀ·dO) and dS = scale · P ⊙ (dP − Σ dO⊙O) (for dQ and dK). The row's Σ dO⊙O is taken
// from dO and O in the (B·H, T, D) layout. Reads dP only where the key is allowed.
template <typename T>
__device__ void attn_softmax_bwd(const float* scores, const float* dp, const float* lse,
                                 const T* d_out, const T* out, T* p, T* ds, int t, int s, int d,
                                 int start, int window, float scale, int r0, int nrows, int e) {
  __shared__ float sh[32];
  long row = blockIdx.x;
  long item = row / nrows;
  int i = r0 + (int)(row % nrows);
  const long o = row * (long)s;
  const long hrow = item * t + i;
  float dot = 0.0f;
  for (int c = threadIdx.x; c < d; c += blockDim.x)
    dot += ld(d_out, hrow * d + c) * ld(out, hrow * d + c);
  dot = block_sum(dot, sh);
  float l = lse[hrow];
  for (int j = threadIdx.x; j < e; j += blockDim.x) {
    bool ok = allowed(i, j, start, window);
    float pv = ok ? __expf(scores[o + j] * scale - l) : 0.0f;
    st(p, o + j, pv);
    st(ds, o + j, ok ? scale * pv * (dp[o + j] - dot) : 0.0f);
  }
}

// ------------------------------------------------------------------------------------------
// Embedding rows: out[r] = table[ids[r]]; the backward sums the gradient rows of each token id
// (positions grouped by id on the host, in position order: deterministic, no atomics), one
// block per distinct id; rows of ids that do not occur are left as the zeros they start as.

template <typename T>
__device__ void embed_fwd(const T* table, const unsigned* ids, T* out, long n, int d) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  long r = i / d;
  int c = (int)(i - r * d);
  st(out, i, ld(table, (long)ids[r] * d + c));
}

template <typename T>
__device__ void embed_bwd(const T* dy, const unsigned* pos, const unsigned* starts,
                          const unsigned* uniq, T* dtable, int d) {
  int u = blockIdx.x;
  unsigned a = starts[u], b = starts[u + 1];
  long row = uniq[u];
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float s = 0.0f;
    for (unsigned k = a; k < b; ++k) s += ld(dy, (long)pos[k] * d + c);
    st(dtable, row * d + c, s);
  }
}

// ------------------------------------------------------------------------------------------
// Inverted dropout's mask: element i is 0 when the i-th draw of SplitMix64 from state `start`
// is below p, else `keep` — the bits src/train/kernels dropout_mask computes on the CPU (the
// draw's top 53 bits scaled by 2⁻⁵³, compared in double).

template <typename T>
__device__ void dropout_mask(T* out, long n, unsigned long long start, double p, float keep) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  unsigned long long z = start + (unsigned long long)(i + 1) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  double u = (double)(z >> 11) * (1.0 / 9007199254740992.0);
  st(out, i, u < p ? 0.0f : keep);
}

// ------------------------------------------------------------------------------------------
// AdamW in place, in one pass: both moments and the parameter, the same f32 operations per
// element as the CPU kernel (src/train/kernels adamw_step).

extern "C" __global__ void adamw_step(float* p, float* m, float* v, const float* g, long n,
                                      float beta1, float beta2, float gs, float decay,
                                      float step_size, float bc2_sqrt, float eps) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gv = g[i] * gs;
  float mi = m[i] * beta1 + gv * (1.0f - beta1);
  float vi = v[i] * beta2 + gv * gv * (1.0f - beta2);
  m[i] = mi;
  v[i] = vi;
  float denom = sqrtf(vi) / bc2_sqrt + eps;
  p[i] = p[i] * decay - mi / denom * step_size;
}

// Per-tensor sum of squares into out[slot] (f32 partials per block, summed in order by one
// block): the global gradient norm without a host round trip per tensor.
extern "C" __global__ void sum_squares_part(const float* g, long n, float* part) {
  __shared__ float sh[32];
  float s = 0.0f;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
       i += (long)gridDim.x * blockDim.x)
    s += g[i] * g[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// ------------------------------------------------------------------------------------------
// Entry points for every storage type.

#define FOR_TYPES(X) X(float, f32) X(bf16_t, bf16) X(f16_t, f16)

#define ENTRIES(T, S)                                                                          \
  extern "C" __global__ void rms_fwd_##S(const T* x, const float* w, T* y, int rows, int d,   \
                                         float eps) {                                         \
    rms_fwd(x, w, y, rows, d, eps);                                                           \
  }                                                                                            \
  extern "C" __global__ void rms_bwd_##S(const T* x, const float* w, const T* dy, T* dx,      \
                                         float* part, int rows, int d, float eps, int rpb) {  \
    rms_bwd(x, w, dy, dx, part, rows, d, eps, rpb);                                           \
  }                                                                                            \
  extern "C" __global__ void rope_##S(const T* x, const float* c, const float* s, T* y,       \
                                      long rows, int t, int heads, int hd, int tr) {          \
    rope(x, c, s, y, rows, t, heads, hd, tr);                                                 \
  }                                                                                            \
  extern "C" __global__ void swiglu_fwd_##S(const T* g, const T* u, T* y, long n) {           \
    swiglu_fwd(g, u, y, n);                                                                   \
  }                                                                                            \
  extern "C" __global__ void swiglu_bwd_##S(const T* g, const T* u, const T* dy, T* dg,       \
                                            T* du, long n) {                                  \
    swiglu_bwd(g, u, dy, dg, du, n);                                                          \
  }                                                                                            \
  extern "C" __global__ void ce_fwd_##S(const T* x, const unsigned* l, const float* m,        \
                                        float* out, float* lse, int n, int v) {               \
    ce_fwd(x, l, m, out, lse, n, v);                                                          \
  }                                                                                            \
  extern "C" __global__ void ce_bwd_##S(const T* x, const unsigned* l, const float* m,        \
                                        const float* lse, const float* g, T* dx, int n,       \
                                        int v) {                                              \
    ce_bwd(x, l, m, lse, g, dx, n, v);                                                        \
  }                                                                                            \
  extern "C" __global__ void heads_split_##S(const T* src, T* dst, int b, int t, int hs,      \
                                             int h, int d) {                                  \
    heads_split(src, dst, b, t, hs, h, d);                                                    \
  }                                                                                            \
  extern "C" __global__ void heads_merge_##S(const T* src, T* dst, int b, int t, int hd,      \
                                             int h, int d) {                                  \
    heads_merge(src, dst, b, t, hd, h, d);                                                    \
  }                                                                                            \
  extern "C" __global__ void heads_merge_from_f32_##S(const float* src, T* dst, int b, int t, \
                                                      int hd, int h, int d) {                 \
    heads_merge(src, dst, b, t, hd, h, d);                                                    \
  }                                                                                            \
  extern "C" __global__ void attn_softmax_fwd_##S(const float* sc, T* p, float* lse, int t,   \
                                                  int s, int start, int window, float scale,  \
                                                  int r0, int nrows, int e) {                 \
    attn_softmax_fwd(sc, p, lse, t, s, start, window, scale, r0, nrows, e);                   \
  }                                                                                            \
  extern "C" __global__ void embed_fwd_##S(const T* table, const unsigned* ids, T* out,     \
                                           long n, int d) {                                \
    embed_fwd(table, ids, out, n, d);                                                         \
  }                                                                                            \
  extern "C" __global__ void embed_bwd_##S(const T* dy, const unsigned* pos,                 \
                                           const unsigned* starts, const unsigned* uniq,      \
                                           T* dtable, int d) {                                \
    embed_bwd(dy, pos, starts, uniq, dtable, d);                                              \
  }                                                                                            \
  extern "C" __global__ void dropout_mask_##S(T* out, long n, unsigned long long start,      \
                                             double p, float keep) {                          \
    dropout_mask(out, n, start, p, keep);                                                     \
  }                                                                                            \
  extern "C" __global__ void attn_softmax_bwd_##S(                                             \
      const float* sc, const float* dp, const float* lse, const T* d_out, const T* out, T* p,  \
      T* ds, int t, int s, int d, int start, int window, float scale, int r0, int nrows,      \
      int e) {                                                                                 \
    attn_softmax_bwd(sc, dp, lse, d_out, out, p, ds, t, s, d, start, window, scale, r0, nrows, \
                     e);                                                                       \
  }

FOR_TYPES(ENTRIES)
