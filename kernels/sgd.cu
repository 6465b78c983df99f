// SGD with momentum, weight decay, dampening and Nesterov, as torch.optim.SGD, over
// every parameter of a step in one launch.
#include "common.cuh"

// One element:
//   d = g + weight_decay * p                       (when weight_decay != 0)
//   momentum != 0: buf' = first ? d : momentum * buf + (1 - dampening) * d
//                  d    = nesterov ? d + momentum * buf' : buf'
//   p' = p - lr * d
// one_minus_dampening is computed by the host in double, as PyTorch's alpha.
__device__ __forceinline__ float sgd_update(float pi, float gi, const float* buf, float* buf_out, long long i,
                                            float lr, float momentum, float weight_decay,
                                            float one_minus_dampening, int nesterov, int first) {
    float d = gi;
    if (weight_decay != 0.f) d += weight_decay * pi;
    if (momentum != 0.f) {
        float b = first ? d : momentum * buf[i] + one_minus_dampening * d;
        buf_out[i] = b;
        d = nesterov ? d + momentum * b : b;
    }
    return pi - lr * d;
}

// Fields of one parameter's row in the pointer table of sgd_multi_f32.
#define SGD_P 0        // const float* parameter
#define SGD_G 1        // const float* gradient
#define SGD_BUF 2      // const float* momentum buffer (unused when first or momentum == 0)
#define SGD_P_OUT 3    // float* new parameter
#define SGD_BUF_OUT 4  // float* new momentum buffer (unused when momentum == 0)
#define SGD_N 5        // elements
#define SGD_START 6    // first element in the concatenation of all parameters
#define SGD_FIRST 7    // 1 on the parameter's first step (no buffer to read)
#define SGD_FIELDS 8

// Every parameter of a step in one launch (a multi-tensor kernel): `table` holds
// `count` rows of SGD_FIELDS i64 (pointers as integers), sorted by SGD_START, no
// row empty; a grid-stride loop runs over the `total` elements of all of them and
// finds each element's row by binary search.
extern "C" __global__ void sgd_multi_f32(const long long* __restrict__ table, int count, long long total,
                                         float lr, float momentum, float weight_decay,
                                         float one_minus_dampening, int nesterov) {
    KESTREL_LOOP(e, total) {
        int lo = 0, hi = count - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (table[SGD_FIELDS * mid + SGD_START] <= e) lo = mid;
            else hi = mid - 1;
        }
        const long long* row = table + SGD_FIELDS * lo;
        long long i = e - row[SGD_START];
        const float* p = (const float*)row[SGD_P];
        const float* g = (const float*)row[SGD_G];
        const float* buf = (const float*)row[SGD_BUF];
        float* p_out = (float*)row[SGD_P_OUT];
        float* buf_out = (float*)row[SGD_BUF_OUT];
        p_out[i] = sgd_update(p[i], g[i], buf, buf_out, i, lr, momentum, weight_decay, one_minus_dampening,
                              nesterov, (int)row[SGD_FIRST]);
    }
}
