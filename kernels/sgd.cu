// SGD with momentum, weight decay, dampening and Nesterov, as torch.optim.SGD.
#include "common.cuh"

// One pass over a parameter: reads p, g (and buf), writes p_out (and buf_out).
//   d = g + weight_decay * p                       (when weight_decay != 0)
//   momentum != 0: buf' = first ? d : momentum * buf + (1 - dampening) * d
//                  d    = nesterov ? d + momentum * buf' : buf'
//   p' = p - lr * d
// one_minus_dampening is computed by the host in double, as PyTorch's alpha.
// With momentum == 0, buf and buf_out are never touched (callers may pass any
// pointer), hence no __restrict__ on them.
extern "C" __global__ void sgd_step_f32(const float* __restrict__ p, const float* __restrict__ g, const float* buf,
                                        float* __restrict__ p_out, float* buf_out, long long n, float lr,
                                        float momentum, float weight_decay, float one_minus_dampening, int nesterov,
                                        int first) {
    KESTREL_LOOP(i, n) {
        float pi = p[i];
        float d = g[i];
        if (weight_decay != 0.f) d += weight_decay * pi;
        if (momentum != 0.f) {
            float b = first ? d : momentum * buf[i] + one_minus_dampening * d;
            buf_out[i] = b;
            d = nesterov ? d + momentum * b : b;
        }
        p_out[i] = pi - lr * d;
    }
}
