// CUDA twins of cache.rs (reshape_and_cache) and attention.rs (paged_attention).
// Compiled at first use with NVRTC (see cuda.rs); no CUDA headers are included, so the
// f16/bf16 conversions are spelled out: f16 through PTX's cvt, bf16 by bits with
// round-to-nearest-even (what the `half` crate does on the CPU).
//
// Layouts as on the CPU: cache (num_blocks, block_size, kv_heads, head_dim); key/value
// (num_tokens, kv_heads, head_dim) f32; query/out (num_queries, num_heads, head_dim) f32.
// Every index was checked on the host before launch.

typedef unsigned short u16;

struct half_t { u16 bits; };
struct bf16_t { u16 bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(half_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
__device__ __forceinline__ float to_f32(bf16_t x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ half_t from_f32<half_t>(float x) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    unsigned int u = __float_as_uint(x);
    bf16_t b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (u16)((u >> 16) | 0x0040u);  // quiet NaN, sign kept
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        b.bits = (u16)(u >> 16);
    }
    return b;
}

// One thread block per token; threads stride over kv_heads * head_dim.
// slot_mapping[t] < 0: padding, skipped.
template <typename T>
__device__ void reshape_and_cache(const float* __restrict__ key,
                                  const float* __restrict__ value,
                                  T* __restrict__ key_cache,
                                  T* __restrict__ value_cache,
                                  const long long* __restrict__ slot_mapping,
                                  int token_elems) {
    const int t = blockIdx.x;
    const long long slot = slot_mapping[t];
    if (slot < 0) return;
    const float* k = key + (long long)t * token_elems;
    const float* v = value + (long long)t * token_elems;
    T* kc = key_cache + slot * token_elems;
    T* vc = value_cache + slot * token_elems;
    for (int i = threadIdx.x; i < token_elems; i += blockDim.x) {
        kc[i] = from_f32<T>(k[i]);
        vc[i] = from_f32<T>(v[i]);
    }
}

#define WARPS 4
#define MAX_HEAD_DIM 256
#define PER_LANE (MAX_HEAD_DIM / 32)

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// One thread block (WARPS warps) per (query, head). Warp w takes the context tokens
// w, w + WARPS, ...; lane l holds dims l, l + 32, ... of the query and of its running
// output. Each warp keeps its own running max and denominator (online softmax); the
// warps' partial results are merged through shared memory at the end.
template <typename T>
__device__ void paged_attention(float* __restrict__ out,
                                const float* __restrict__ query,
                                const T* __restrict__ key_cache,
                                const T* __restrict__ value_cache,
                                const unsigned int* __restrict__ block_tables,
                                const unsigned int* __restrict__ query_seq,
                                const unsigned int* __restrict__ context_lens,
                                int num_heads, int kv_heads, int head_dim, int block_size,
                                int max_blocks_per_seq, float scale) {
    const int qi = blockIdx.x;
    const int h = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int kvh = h / (num_heads / kv_heads);
    const int token_elems = kv_heads * head_dim;
    const int len = (int)context_lens[qi];
    const unsigned int* table = block_tables + (long long)query_seq[qi] * max_blocks_per_seq;

    const float* q = query + ((long long)qi * num_heads + h) * head_dim;
    float qr[PER_LANE];
    float acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int d = lane + 32 * i;
        qr[i] = d < head_dim ? q[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = __int_as_float(0xff800000);  // -inf
    float l = 0.0f;
    for (int j = warp; j < len; j += WARPS) {
        const long long slot = (long long)table[j / block_size] * block_size + j % block_size;
        const long long base = slot * token_elems + (long long)kvh * head_dim;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) s += qr[i] * to_f32(key_cache[base + d]);
        }
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);
        const float w = expf(s - m_new);
        l = l * corr + w;
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] = acc[i] * corr + w * to_f32(value_cache[base + d]);
        }
        m = m_new;
    }

    __shared__ float s_m[WARPS];
    __shared__ float s_l[WARPS];
    __shared__ float s_acc[WARPS][MAX_HEAD_DIM];
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int d = lane + 32 * i;
        if (d < head_dim) s_acc[warp][d] = acc[i];
    }
    __syncthreads();
    float m_all = __int_as_float(0xff800000);
    for (int w = 0; w < WARPS; w++) m_all = fmaxf(m_all, s_m[w]);
    float l_all = 0.0f;
    for (int w = 0; w < WARPS; w++) {
        // A warp that saw no token has m = -inf and l = 0: it contributes nothing.
        if (s_l[w] > 0.0f) l_all += s_l[w] * expf(s_m[w] - m_all);
    }
    float* o = out + ((long long)qi * num_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f;
        for (int w = 0; w < WARPS; w++) {
            if (s_l[w] > 0.0f) sum += s_acc[w][d] * expf(s_m[w] - m_all);
        }
        o[d] = sum / l_all;
    }
}

#define INSTANTIATE(NAME, T)                                                                \
    extern "C" __global__ void reshape_and_cache_##NAME(                                    \
        const float* key, const float* value, T* key_cache, T* value_cache,                 \
        const long long* slot_mapping, int token_elems) {                                   \
        reshape_and_cache<T>(key, value, key_cache, value_cache, slot_mapping, token_elems);\
    }                                                                                       \
    extern "C" __global__ void paged_attention_##NAME(                                      \
        float* out, const float* query, const T* key_cache, const T* value_cache,           \
        const unsigned int* block_tables, const unsigned int* query_seq,                    \
        const unsigned int* context_lens, int num_heads, int kv_heads, int head_dim,        \
        int block_size, int max_blocks_per_seq, float scale) {                              \
        paged_attention<T>(out, query, key_cache, value_cache, block_tables, query_seq,     \
                           context_lens, num_heads, kv_heads, head_dim, block_size,         \
                           max_blocks_per_seq, scale);                                      \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f16, half_t)
INSTANTIATE(bf16, bf16_t)
