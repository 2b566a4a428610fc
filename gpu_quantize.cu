// ggml's quantizers for Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (the paths ggml_quantize_chunk takes with an imatrix) and
// Q8_0, ported statement for statement from llama.cpp's ggml/src/ggml-quants.c (MIT) so that a CUDA GPU writes
// ggml's bytes bit for bit. Every float operation is the C source's, in its order and its types; compiled
// without contraction into fused multiply-adds (nvrtc --fmad=false, gcc -ffp-contract=off), with IEEE division
// and square roots, it rounds as ggml-base does on x86-64 (built without FMA). gpu_quantize.py compiles it with
// NVRTC and checks it against ggml's own bytes before trusting it; tests/test_gpu_quantize.py compiles it for the
// CPU and holds it equal to ggml_quantize_chunk. One thread quantizes one block.
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#define QFN __device__ static inline
typedef unsigned char uint8_t;
typedef signed char int8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
#else
#include <math.h>
#include <stdint.h>
#define QFN static inline
#endif

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f
#define QMAX(a, b) ((a) > (b) ? (a) : (b))
#define QMIN(a, b) ((a) < (b) ? (a) : (b))

QFN uint32_t fp32_to_bits(float f) { union { float f; uint32_t u; } v; v.f = f; return v.u; }
QFN float fp32_from_bits(uint32_t u) { union { uint32_t u; float f; } v; v.u = u; return v.f; }

// ggml_compute_fp32_to_fp16 / ggml_compute_fp16_to_fp32 (ggml-impl.h), the software paths ggml-base uses.
QFN uint16_t fp32_to_fp16(float f) {
    const float scale_to_inf = fp32_from_bits(0x77800000u);
    const float scale_to_zero = fp32_from_bits(0x08800000u);
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = fp32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = fp32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = fp32_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

QFN float fp16_to_fp32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = fp32_from_bits(0x7800000u);
    const float normalized_value = fp32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized_value = fp32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result = sign |
        (two_w < denormalized_cutoff ? fp32_to_bits(denormalized_value) : fp32_to_bits(normalized_value));
    return fp32_from_bits(result);
}

QFN void put_half(uint8_t * p, uint16_t h) { p[0] = (uint8_t)(h & 0xFF); p[1] = (uint8_t)(h >> 8); }

QFN int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i = (int)fp32_to_bits(val);
    return (i & 0x007fffff) - 0x00400000;
}

QFN float make_qx_quants(int n, int nmax, const float * x, int8_t * L, int rmse_type, const float * qw) {
    float max = 0;
    float amax = 0;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    if (rmse_type == 0) {
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            L[i] = nmax + QMAX(-nmax, QMIN(nmax-1, l));
        }
        return 1/iscale;
    }
    bool return_early = false;
    if (rmse_type < 0) {
        rmse_type = -rmse_type;
        return_early = true;
    }
    float sumlx = 0;
    float suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = QMAX(-nmax, QMIN(nmax-1, l));
        L[i] = l + nmax;
        float w = qw ? qw[i] : rmse_type == 1 ? x[i] * x[i] : rmse_type == 2 ? 1 : rmse_type == 3 ? fabsf(x[i]) : sqrtf(fabsf(x[i]));
        sumlx += w*x[i]*l;
        suml2 += w*l*l;
    }
    float scale = suml2 ? sumlx/suml2 : 0.0f;
    if (return_early) return suml2 > 0 ? 0.5f*(scale + 1/iscale) : 1/iscale;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f*is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = QMAX(-nmax, QMIN(nmax-1, l));
            float w = qw ? qw[i] : rmse_type == 1 ? x[i] * x[i] : rmse_type == 2 ? 1 : rmse_type == 3 ? fabsf(x[i]) : sqrtf(fabsf(x[i]));
            sumlx += w*x[i]*l;
            suml2 += w*l*l;
        }
        if (suml2 > 0 && sumlx*sumlx > best*suml2) {
            for (int i = 0; i < n; ++i) {
                int l = nearest_int(iscale * x[i]);
                L[i] = nmax + QMAX(-nmax, QMIN(nmax-1, l));
            }
            scale = sumlx/suml2; best = scale*sumlx;
        }
    }
    return scale;
}

QFN float make_qkx3_quants(int n, int nmax, const float * x, const float * weights, uint8_t * L, float * the_min,
                           uint8_t * Laux, float rmin, float rdelta, int nstep, bool use_mad) {
    float min = x[0];
    float max = x[0];
    float sum_w = weights ? weights[0] : x[0]*x[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        float w = weights ? weights[i] : x[i]*x[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max <= min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax/(max - min);
    float scale = 1/iscale;
    float best_mad = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale*(x[i] - min));
        L[i] = QMAX(0, QMIN(nmax, l));
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff*diff;
        float w = weights ? weights[i] : x[i]*x[i];
        best_mad += w * diff;
    }
    if (nstep < 1) {
        *the_min = -min;
        return scale;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta*is + nmax)/(max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale*(x[i] - min));
            l = QMAX(0, QMIN(nmax, l));
            Laux[i] = l;
            float w = weights ? weights[i] : x[i]*x[i];
            sum_l  += w*l;
            sum_l2 += w*l*l;
            sum_xl += w*l*x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l)/D;
            float this_min   = (sum_l2 * sum_x - sum_l * sum_xl)/D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float mad = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff*diff;
                float w = weights ? weights[i] : x[i]*x[i];
                mad += w * diff;
            }
            if (mad < best_mad) {
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

QFN float make_qp_quants(int n, int nmax, const float * x, uint8_t * L, const float * quant_weights) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = QMAX(max, x[i]);
    if (max < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; ++i) L[i] = nearest_int(iscale * x[i]);
    float scale = 1/iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale*L[i];
        float w = quant_weights[i];
        best_mse += w*diff*diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float iscale_is = (0.1f*is + nmax)/max;
        float scale_is = 1/iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale_is*x[i]);
            l = QMIN(nmax, l);
            float diff = x[i] - scale_is*l;
            float w = quant_weights[i];
            mse += w*diff*diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0;
    float suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = QMIN(nmax, l);
        L[i] = l;
        float w = quant_weights[i];
        sumlx += w*x[i]*l;
        suml2 += w*l*l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = quant_weights[i];
            float slx = sumlx - w*x[i]*L[i];
            float sl2 = suml2 - w*L[i]*L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = QMIN(nmax, new_l);
                if (new_l != L[i]) {
                    slx += w*x[i]*new_l;
                    sl2 += w*new_l*new_l;
                    if (slx*slx*suml2 > sumlx*sumlx*sl2) {
                        L[i] = new_l; sumlx = slx; suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

QFN void get_scale_min_k4(int j, const uint8_t * q, uint8_t * d, uint8_t * m) {
    if (j < 4) {
        *d = q[j] & 63; *m = q[j + 4] & 63;
    } else {
        *d = (q[j+4] & 0xF) | ((q[j-4] >> 6) << 4);
        *m = (q[j+4] >>  4) | ((q[j-0] >> 6) << 4);
    }
}

// Each block function quantizes one super-block of 256 values (32 for Q8_0); `qw` is the imatrix of its columns.
// Layouts (ggml-common.h): Q2_K scales[16] qs[64] d dmin (84 bytes); Q3_K hmask[32] qs[64] scales[12] d (110);
// Q4_K d dmin scales[12] qs[128] (144); Q5_K d dmin scales[12] qh[32] qs[128] (176); Q6_K ql[128] qh[64]
// scales[16] d (210); Q8_0 d qs[32] (34).

QFN void block_q2_K(const float * x, const float * quant_weights, uint8_t * y) {
    uint8_t L[QK_K];
    uint8_t Laux[16];
    float mins[QK_K/16];
    float scales[QK_K/16];
    float sw[QK_K/16];
    float weight[16];
    uint8_t Ls[QK_K/16], Lm[QK_K/16];
    uint8_t * y_scales = y;
    uint8_t * y_qs = y + 16;

    for (int j = 0; j < QK_K/16; ++j) sw[j] = 0;
    float sumx2 = 0;
    for (int j = 0; j < QK_K; ++j) sumx2 += x[j]*x[j];
    float sigma2 = sumx2/QK_K;
    for (int j = 0; j < QK_K/16; ++j) {
        const float * qw = quant_weights + 16*j;
        for (int l = 0; l < 16; ++l) weight[l] = qw[l] * sqrtf(sigma2 + x[16*j + l]*x[16*j + l]);
        for (int l = 0; l < QK_K/16; ++l) sw[j] += weight[l];
        scales[j] = make_qkx3_quants(16, 3, x + 16*j, weight, L + 16*j, &mins[j], Laux, -0.9f, 0.05f, 36, false);
    }

    float dm, mm;
    dm  = make_qp_quants(QK_K/16, 15, scales, Ls, sw);
    mm  = make_qp_quants(QK_K/16, 15, mins,   Lm, sw);
    const uint16_t d16 = fp32_to_fp16(dm), dmin16 = fp32_to_fp16(mm);
    put_half(y + 80, d16);
    put_half(y + 82, dmin16);
    dm = fp16_to_fp32(d16);
    mm = fp16_to_fp32(dmin16);

    for (int j = 0; j < QK_K/16; ++j) y_scales[j] = Ls[j] | (Lm[j] << 4);

    for (int j = 0; j < QK_K/16; ++j) {
        const float d = dm * (y_scales[j] & 0xF);
        if (!d) continue;
        const float m = mm * (y_scales[j] >> 4);
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int((x[16*j + ii] + m)/d);
            l = QMAX(0, QMIN(3, l));
            L[16*j + ii] = l;
        }
    }

    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            y_qs[j/4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6);
        }
    }
}

QFN void block_q3_K(const float * x, const float * quant_weights, uint8_t * y) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    float weight[16];
    float sw[QK_K / 16];
    int8_t Ls[QK_K / 16];
    uint8_t * y_hmask = y;
    uint8_t * y_qs = y + 32;
    uint8_t * y_scales = y + 96;

    float sumx2 = 0;
    for (int j = 0; j < QK_K; ++j) sumx2 += x[j]*x[j];
    float sigma2 = 2*sumx2/QK_K;

    for (int j = 0; j < QK_K/16; ++j) {
        const float * qw = quant_weights + 16*j;
        for (int l = 0; l < 16; ++l) weight[l] = qw[l] * sqrtf(sigma2 + x[16*j+l]*x[16*j+l]);
        float sumw = 0;
        for (int l = 0; l < 16; ++l) sumw += weight[l];
        sw[j] = sumw;
        scales[j] = make_qx_quants(16, 4, x + 16*j, L + 16*j, 1, weight);
    }

    for (int j = 0; j < 12; ++j) y_scales[j] = 0;

    float d_block = make_qx_quants(QK_K/16, 32, scales, Ls, 1, sw);
    for (int j = 0; j < QK_K/16; ++j) {
        int l = Ls[j];
        if (j < 8) {
            y_scales[j] = l & 0xF;
        } else {
            y_scales[j-8] |= ((l & 0xF) << 4);
        }
        l >>= 4;
        y_scales[j%4 + 8] |= (l << (2*(j/4)));
    }
    const uint16_t d16 = fp32_to_fp16(d_block);
    put_half(y + 108, d16);

    int8_t sc;
    for (int j = 0; j < QK_K/16; ++j) {
        sc = j < 8 ? y_scales[j] & 0xF : y_scales[j-8] >> 4;
        sc = (sc | (((y_scales[8 + j%4] >> (2*(j/4))) & 3) << 4)) - 32;
        float d = fp16_to_fp32(d16) * sc;
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16*j + ii]/d);
            l = QMAX(-4, QMIN(3, l));
            L[16*j + ii] = l + 4;
        }
    }

    for (int j = 0; j < QK_K/8; ++j) y_hmask[j] = 0;
    int m = 0;
    uint8_t hm = 1;
    for (int j = 0; j < QK_K; ++j) {
        if (L[j] > 3) {
            y_hmask[m] |= hm;
            L[j] -= 4;
        }
        if (++m == QK_K/8) {
            m = 0; hm <<= 1;
        }
    }
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            y_qs[j/4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6);
        }
    }
}

// Q4_K (nmax 15) and Q5_K (nmax 31) share their scale search; they differ in the clamp of the 6-bit scales and
// in how the quants are packed.
QFN void block_q45_K(const float * x, const float * quant_weights, uint8_t * y, int nmax) {
    uint8_t L[QK_K];
    uint8_t Laux[32];
    uint8_t Ls[QK_K/32];
    uint8_t Lm[QK_K/32];
    float   weights[32];
    float   sw[QK_K/32];
    float   mins[QK_K/32];
    float   scales[QK_K/32];
    uint8_t * y_scales = y + 4;

    float sum_x2 = 0;
    for (int l = 0; l < QK_K; ++l) sum_x2 += x[l] * x[l];
    float sigma2 = 2*sum_x2/QK_K;

    for (int j = 0; j < QK_K/32; ++j) {
        const float * qw = quant_weights + 32*j;
        for (int l = 0; l < 32; ++l) weights[l] = qw[l] * sqrtf(sigma2 + x[32*j + l]*x[32*j + l]);
        float sumw = 0;
        for (int l = 0; l < 32; ++l) sumw += weights[l];
        sw[j] = sumw;
        scales[j] = make_qkx3_quants(32, nmax, x + 32*j, weights, L + 32*j, &mins[j], Laux, -0.9f, 0.05f, 36, false);
    }

    float d_block = make_qp_quants(QK_K/32, 63, scales, Ls, sw);
    float m_block = make_qp_quants(QK_K/32, 63, mins,   Lm, sw);
    for (int j = 0; j < QK_K/32; ++j) {
        uint8_t ls = Ls[j];
        uint8_t lm = Lm[j];
        if (nmax == 31) {
            ls = QMIN(63, ls);
            lm = QMIN(63, lm);
        }
        if (j < 4) {
            y_scales[j] = ls;
            y_scales[j+4] = lm;
        } else {
            y_scales[j+4] = (ls & 0xF) | ((lm & 0xF) << 4);
            y_scales[j-4] |= ((ls >> 4) << 6);
            y_scales[j-0] |= ((lm >> 4) << 6);
        }
    }
    const uint16_t d16 = fp32_to_fp16(d_block), dmin16 = fp32_to_fp16(m_block);
    put_half(y, d16);
    put_half(y + 2, dmin16);

    uint8_t sc, m;
    for (int j = 0; j < QK_K/32; ++j) {
        get_scale_min_k4(j, y_scales, &sc, &m);
        const float d = fp16_to_fp32(d16) * sc;
        if (!d) continue;
        const float dm = fp16_to_fp32(dmin16) * m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32*j + ii] + dm)/d);
            l = QMAX(0, QMIN(nmax, l));
            L[32*j + ii] = l;
        }
    }

    if (nmax == 15) {
        uint8_t * q = y + 16;
        for (int j = 0; j < QK_K; j += 64) {
            for (int l = 0; l < 32; ++l) q[l] = L[j + l] | (L[j + l + 32] << 4);
            q += 32;
        }
        return;
    }
    uint8_t * qh = y + 16;
    uint8_t * ql = y + 48;
    for (int j = 0; j < QK_K/8; ++j) qh[j] = 0;
    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < QK_K; n += 64) {
        for (int j = 0; j < 32; ++j) {
            int l1 = L[n + j];
            if (l1 > 15) {
                l1 -= 16; qh[j] |= m1;
            }
            int l2 = L[n + j + 32];
            if (l2 > 15) {
                l2 -= 16; qh[j] |= m2;
            }
            ql[j] = l1 | (l2 << 4);
        }
        m1 <<= 2; m2 <<= 2;
        ql += 32;
    }
}

QFN void block_q6_K(const float * x, const float * quant_weights, uint8_t * y) {
    int8_t L[QK_K];
    float scales[QK_K/16];
    int8_t * y_scales = (int8_t *)(y + 192);

    float max_scale = 0;
    float max_abs_scale = 0;
    for (int ib = 0; ib < QK_K/16; ++ib) {
        const float * qw = quant_weights + 16*ib;
        float scale = make_qx_quants(16, 32, x + 16*ib, L + 16*ib, 1, qw);
        scales[ib] = scale;
        const float abs_scale = fabsf(scale);
        if (abs_scale > max_abs_scale) {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }

    if (max_abs_scale < GROUP_MAX_EPS) {
        for (int j = 0; j < 210; ++j) y[j] = 0;
        put_half(y + 208, fp32_to_fp16(0.f));
        return;
    }

    float iscale = -128.f/max_scale;
    const uint16_t d16 = fp32_to_fp16(1/iscale);
    put_half(y + 208, d16);
    for (int ib = 0; ib < QK_K/16; ++ib) y_scales[ib] = QMIN(127, nearest_int(iscale*scales[ib]));

    for (int j = 0; j < QK_K/16; ++j) {
        float d = fp16_to_fp32(d16) * y_scales[j];
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16*j + ii]/d);
            l = QMAX(-32, QMIN(31, l));
            L[16*j + ii] = l + 32;
        }
    }

    uint8_t * ql = y;
    uint8_t * qh = y + 128;
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t q1 = L[j + l +  0] & 0xF;
            const uint8_t q2 = L[j + l + 32] & 0xF;
            const uint8_t q3 = L[j + l + 64] & 0xF;
            const uint8_t q4 = L[j + l + 96] & 0xF;
            ql[l+ 0] = q1 | (q3 << 4);
            ql[l+32] = q2 | (q4 << 4);
            qh[l] = (L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6);
        }
        ql += 64;
        qh += 32;
    }
}

QFN void block_q8_0(const float * x, uint8_t * y) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) {
        const float v = x[j];
        amax = QMAX(amax, fabsf(v));
    }
    const float d = amax / ((1 << 7) - 1);
    const float id = d ? 1.0f/d : 0.0f;
    put_half(y, fp32_to_fp16(d));
    for (int j = 0; j < 32; ++j) {
        const float x0 = x[j]*id;
        ((int8_t *)y)[2 + j] = (int8_t)roundf(x0);
    }
}

// ggml type ids (ggml.h) -> the block above, its values and bytes per block.
QFN int block_values(int type) { return type == 8 ? 32 : QK_K; }
QFN int block_bytes(int type) {
    switch (type) {
        case 8: return 34;
        case 10: return 84;
        case 11: return 110;
        case 12: return 144;
        case 13: return 176;
        case 14: return 210;
        default: return 0;
    }
}

QFN void quantize_block(int type, const float * x, const float * qw, uint8_t * y) {
    switch (type) {
        case 8: block_q8_0(x, y); break;
        case 10: block_q2_K(x, qw, y); break;
        case 11: block_q3_K(x, qw, y); break;
        case 12: block_q45_K(x, qw, y, 15); break;
        case 13: block_q45_K(x, qw, y, 31); break;
        case 14: block_q6_K(x, qw, y); break;
        default: break;
    }
}

// Block `i` of `n_blocks` (rows of `blocks_per_row` blocks, stored contiguously) reads the imatrix of its
// position in the row.
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
extern "C" __global__ void quantize_blocks(const float * x, const float * imatrix, uint8_t * y, int type,
                                           int n_blocks, int blocks_per_row) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_blocks) return;
    const int nv = block_values(type);
    quantize_block(type, x + i * nv, imatrix + (i % blocks_per_row) * nv, y + i * block_bytes(type));
}
#else
extern "C" void quantize_blocks(const float * x, const float * imatrix, uint8_t * y, int type, int n_blocks,
                                int blocks_per_row) {
    const int nv = block_values(type);
    for (long long i = 0; i < n_blocks; ++i) {
        quantize_block(type, x + i * nv, imatrix + (i % blocks_per_row) * nv, y + i * block_bytes(type));
    }
}
#endif
