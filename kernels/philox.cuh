// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC11;
// Random123's philox4x32 with 10 rounds), the counter-based generator of the device
// sampler. Mirrored bit for bit by src/rng.rs (`philox4x32_10`), so the CPU and the
// device draw the same numbers for the same (key, counter): no state to carry
// between launches, images or a resume.
#pragma once

struct Philox4 {
    unsigned int v[4];
};

__device__ __forceinline__ unsigned int philox_mulhilo(unsigned int a, unsigned int b,
                                                       unsigned int* hi) {
    unsigned long long p = (unsigned long long)a * (unsigned long long)b;
    *hi = (unsigned int)(p >> 32);
    return (unsigned int)p;
}

__device__ __forceinline__ Philox4 philox4x32_10(Philox4 ctr, unsigned int k0, unsigned int k1) {
    for (int r = 0; r < 10; ++r) {
        unsigned int hi0, hi1;
        unsigned int lo0 = philox_mulhilo(0xD2511F53u, ctr.v[0], &hi0);
        unsigned int lo1 = philox_mulhilo(0xCD9E8D57u, ctr.v[2], &hi1);
        Philox4 n;
        n.v[0] = hi1 ^ ctr.v[1] ^ k0;
        n.v[1] = lo1;
        n.v[2] = hi0 ^ ctr.v[3] ^ k1;
        n.v[3] = lo0;
        ctr = n;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return ctr;
}

// The sampler's random key of candidate `index` of image `image` at `stage` (0 RPN
// anchors, 1 RoIs) for the step key `seed`: word 0 of Philox(counter = (index, image,
// stage, 0), key = seed).
__device__ __forceinline__ unsigned int philox_sample_key(unsigned long long seed, unsigned int image,
                                                          unsigned int stage, unsigned int index) {
    Philox4 c;
    c.v[0] = index;
    c.v[1] = image;
    c.v[2] = stage;
    c.v[3] = 0u;
    return philox4x32_10(c, (unsigned int)seed, (unsigned int)(seed >> 32)).v[0];
}
