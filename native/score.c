/*
 * score.c -- the SnapKV scorer: window-attention mean, GQA aggregation, pooling; and the
 * same steps for the reconstruction scorer of the kvzip policies (identity instead of
 * the mean, max over the group; score_max.c).
 *
 * Follows the official Ada-KV code (AdaptiveSnapKVCluster.calcul_attn_sore): mean of
 * the window queries' attention over the non-window rows, then (GQA support) mean of
 * the query heads of each group, then max/avg pooling over the non-window rows only
 * (F.max_pool1d / F.avg_pool1d, stride 1, padding kernel//2, avg counting the padding).
 * Our input holds the window SUMS, so the mean is sum / n_obs. Not official: the causal
 * alignment (cfg->align) moves each pooling window to end at its row (see adakv.h).
 *
 * Arithmetic is float32 in the official order (x / n_obs per query head, left-to-right
 * sum over the group, / group; pooling sums left to right, / kernel), so the results
 * are bit-identical to the PyTorch transcription. Dividing by a power of two is done
 * as a multiplication by its (exact) reciprocal: IEEE gives the same result.
 * Hot loops work on blocks of ADAKV_BLK rows with fixed-size inner loops, which
 * compilers vectorize at -O2.
 */
#include "adakv_internal.h"

#define ADAKV_BLK 16

static int adakv__pow2(int32_t v) { return v > 0 && (v & (v - 1)) == 0; }

/* 1 if x holds a NaN or an infinity, by its exponent bits. */
static int adakv__nonfinite(const float *x, size_t n) {
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
    }
    return bad != 0;
}

/* Scale one value: x * inv when the divisor is a power of two (exact), else x / d. */
#define ADAKV_SCALE(x) (pow2 ? (x) * inv : (x) / d)

/* agg[r] = GQA aggregate of row r < n of one KV head's block [group][len].
 * Returns 1 if an input or the aggregate is not finite. */
static int adakv__aggregate(const float *restrict blk, size_t len, int32_t n, int32_t group,
                            int32_t gqa, int32_t n_obs, float *restrict agg) {
    const float d = (float)n_obs, inv = 1.0f / d, gf = (float)group, ginv = 1.0f / gf;
    const int pow2 = adakv__pow2(n_obs), gpow2 = adakv__pow2(group);
    float zin[ADAKV_BLK] = {0}, zout[ADAKV_BLK] = {0};
    int32_t r = 0;
    for (; r + ADAKV_BLK <= n; r += ADAKV_BLK) {
        float acc[ADAKV_BLK];
        const float *row = blk + r;
        if (pow2) {
            for (int j = 0; j < ADAKV_BLK; j++) acc[j] = row[j] * inv;
        } else {
            for (int j = 0; j < ADAKV_BLK; j++) acc[j] = row[j] / d;
        }
        if (gqa == ADAKV_GQA_MEAN) {
            for (int32_t g = 1; g < group; g++) {
                row = blk + (size_t)g * len + r;
                if (pow2) {
                    for (int j = 0; j < ADAKV_BLK; j++) acc[j] = acc[j] + row[j] * inv;
                } else {
                    for (int j = 0; j < ADAKV_BLK; j++) acc[j] = acc[j] + row[j] / d;
                }
            }
            if (group > 1) {
                if (gpow2) {
                    for (int j = 0; j < ADAKV_BLK; j++) acc[j] = acc[j] * ginv;
                } else {
                    for (int j = 0; j < ADAKV_BLK; j++) acc[j] = acc[j] / gf;
                }
            }
        } else {
            /* max drops NaN/-inf silently: check the inputs explicitly */
            for (int j = 0; j < ADAKV_BLK; j++) zin[j] = zin[j] + row[j] * 0.0f;
            for (int32_t g = 1; g < group; g++) {
                row = blk + (size_t)g * len + r;
                for (int j = 0; j < ADAKV_BLK; j++) {
                    float v = pow2 ? row[j] * inv : row[j] / d;
                    zin[j] = zin[j] + row[j] * 0.0f;
                    acc[j] = v > acc[j] ? v : acc[j];
                }
            }
        }
        for (int j = 0; j < ADAKV_BLK; j++) {
            agg[r + j] = acc[j];
            zout[j] = zout[j] + acc[j] * 0.0f; /* NaN iff some acc is NaN or inf */
        }
    }
    for (; r < n; r++) { /* tail, same arithmetic */
        float a = ADAKV_SCALE(blk[r]);
        for (int32_t g = 1; g < group; g++) {
            float v = ADAKV_SCALE(blk[(size_t)g * len + (size_t)r]);
            zin[0] = zin[0] + v * 0.0f;
            if (gqa == ADAKV_GQA_MEAN)
                a = a + v;
            else
                a = v > a ? v : a;
        }
        if (gqa == ADAKV_GQA_MEAN && group > 1) a = gpow2 ? a * ginv : a / gf;
        zin[0] = zin[0] + blk[r] * 0.0f;
        agg[r] = a;
        zout[0] = zout[0] + a * 0.0f;
    }
#undef ADAKV_SCALE
    for (int j = 0; j < ADAKV_BLK; j++)
        if (zin[j] != 0.0f || zout[j] != 0.0f) return 1;
    return 0;
}

/* Store a block of pooled values as floats (pf) or as selection keys (pk). */
static void adakv__store(const float *restrict v, int m, float *restrict pf,
                         uint32_t *restrict pk) {
    if (pf) {
        for (int j = 0; j < m; j++) pf[j] = v[j];
    } else {
        for (int j = 0; j < m; j++) pk[j] = adakv__key(v[j]);
    }
}

/* One pooled value at row r (edges and tails), scalar. */
static float adakv__pool_one(const float *a, int32_t n, int32_t r, int32_t kernel,
                             int32_t pooling) {
    const int32_t p = kernel / 2;
    const int32_t lo = r - p < 0 ? 0 : r - p;
    const int32_t hi = r + p >= n ? n - 1 : r + p;
    if (pooling == ADAKV_POOL_MAX) {
        float m = a[lo];
        for (int32_t j = lo + 1; j <= hi; j++) m = a[j] > m ? a[j] : m;
        return m;
    } else {
        float s = 0.0f;
        for (int32_t j = lo; j <= hi; j++) s = s + a[j];
        return s / (float)kernel;
    }
}

/* d[i] = max(x[i], y[i]) for i < m (x and y may overlap; d overlaps neither). */
static void adakv__max2(const float *restrict x, const float *restrict y, int32_t m,
                        float *restrict d) {
    int32_t i = 0;
    for (; i + ADAKV_BLK <= m; i += ADAKV_BLK)
        for (int j = 0; j < ADAKV_BLK; j++) d[i + j] = y[i + j] > x[i + j] ? y[i + j] : x[i + j];
    for (; i < m; i++) d[i] = y[i] > x[i] ? y[i] : x[i];
}

/* Max pooling of the interior rows [p, n - p) by doubling: m_2w[i] = max(m_w[i], m_w[i+w])
 * up to the largest power of two W <= kernel, then out[r] = max(m_W[r-p], m_W[r+p-W+1]),
 * two windows of W that cover [r-p, r+p]. Max is exact, so this equals the
 * left-to-right max of F.max_pool1d (up to the sign of a zero, which no ranking sees).
 * t1, t2: room for n floats each. */
static void adakv__max_pool_interior(const float *restrict a, int32_t n, int32_t kernel,
                                     float *restrict t1, float *restrict t2,
                                     float *restrict pf, uint32_t *restrict pk) {
    const int32_t p = kernel / 2;
    const float *src = a;
    int32_t w = 1, r;
    float v[ADAKV_BLK];
    while (2 * w <= kernel) { /* n > 2p >= 2w - 1, so m_2w has n - 2w + 1 >= 1 entries */
        float *dst = src == t1 ? t2 : t1;
        adakv__max2(src, src + w, n - 2 * w + 1, dst);
        src = dst;
        w *= 2;
    }
    for (r = p; r + ADAKV_BLK <= n - p; r += ADAKV_BLK) {
        adakv__max2(src + r - p, src + r + p - w + 1, ADAKV_BLK, v);
        adakv__store(v, ADAKV_BLK, pf ? pf + r : NULL, pk ? pk + r : NULL);
    }
    for (; r < n - p; r++) {
        adakv__max2(src + r - p, src + r + p - w + 1, 1, v);
        adakv__store(v, 1, pf ? pf + r : NULL, pk ? pk + r : NULL);
    }
}

/* Pool a[0..n) into pf (floats) or pk (keys). Max: the padding acts as -inf; avg:
 * left-to-right sum of the valid neighbours / kernel (count_include_pad=True).
 * t1, t2: room for n floats each. */
static void adakv__pool(const float *restrict a, int32_t n, int32_t kernel, int32_t pooling,
                        float *restrict t1, float *restrict t2, float *restrict pf,
                        uint32_t *restrict pk) {
    const int32_t p = kernel / 2;
    const float kf = (float)kernel;
    const int32_t left = p < n ? p : n; /* rows [0, left) see the left padding */
    float v[ADAKV_BLK];
    int32_t r = 0;
    for (; r < left; r++) {
        v[0] = adakv__pool_one(a, n, r, kernel, pooling);
        adakv__store(v, 1, pf ? pf + r : NULL, pk ? pk + r : NULL);
    }
    if (pooling == ADAKV_POOL_MAX && n > 2 * p) {
        adakv__max_pool_interior(a, n, kernel, t1, t2, pf, pk);
        r = n - p;
    }
    /* interior blocks: every window fully inside [0, n) */
    for (; r + ADAKV_BLK + p <= n; r += ADAKV_BLK) {
        const float *w = a + r - p;
        for (int j = 0; j < ADAKV_BLK; j++) v[j] = 0.0f;
        for (int32_t t = 0; t < kernel; t++)
            for (int j = 0; j < ADAKV_BLK; j++) v[j] = v[j] + w[j + t];
        for (int j = 0; j < ADAKV_BLK; j++) v[j] = v[j] / kf;
        adakv__store(v, ADAKV_BLK, pf ? pf + r : NULL, pk ? pk + r : NULL);
    }
    /* right edge and tail */
    for (; r < n; r++) {
        v[0] = adakv__pool_one(a, n, r, kernel, pooling);
        adakv__store(v, 1, pf ? pf + r : NULL, pk ? pk + r : NULL);
    }
}

/* Causal alignment: the window of row r is [r-k+1, r], the centered window of row r-p
 * (k = 2p+1; never clipped on the right), so move the centered values p rows on and
 * compute the first p rows, which see the left padding, from a. */
static void adakv__align_causal(const float *restrict a, int32_t n, int32_t kernel,
                                int32_t pooling, float *restrict pf, uint32_t *restrict pk) {
    const int32_t p = kernel / 2;
    const int32_t head = p < n ? p : n;
    float acc = 0.0f;
    for (int32_t r = n - 1; r >= p; r--) {
        if (pf) pf[r] = pf[r - p];
        else pk[r] = pk[r - p];
    }
    for (int32_t r = 0; r < head; r++) {
        float v;
        if (pooling == ADAKV_POOL_MAX) {
            acc = r == 0 || a[r] > acc ? a[r] : acc;
            v = acc;
        } else {
            acc = acc + a[r];
            v = acc / (float)kernel;
        }
        adakv__store(&v, 1, pf ? pf + r : NULL, pk ? pk + r : NULL);
    }
}

int32_t adakv__score_heads(const adakv_config *cfg, int32_t n_head_kv, int32_t n_q_per_kv,
                           int32_t n_obs, const int32_t *lens, const float *scores,
                           float *tmp, float *t1, float *t2, float *pooled, uint32_t *keys) {
    size_t in_off = 0, out_off = 0;
    /* the reconstruction scorer (kvzip policies, see score_max.c): its inputs are maxima
     * over the scoring queries, not window sums: no mean, the max over the group, and no
     * pooling (kernel 1) */
    const int kvzip = adakv__is_kvzip(cfg->policy);
    const int32_t gqa = kvzip ? ADAKV_GQA_MAX : cfg->gqa;
    const int32_t obs = kvzip ? 1 : n_obs;
    const int32_t kernel = kvzip ? 1 : cfg->kernel;
    for (int32_t h = 0; h < n_head_kv; h++) {
        const int32_t len = lens[h];
        const int32_t n = len - adakv__win(cfg, len);
        const float *blk = scores + in_off;
        float *pf = pooled ? pooled + out_off : NULL;
        uint32_t *pk = keys ? keys + out_off : NULL;
        /* window rows are not scored, but bad values there are still bad input */
        for (int32_t g = 0; g < n_q_per_kv; g++)
            if (adakv__nonfinite(blk + (size_t)g * (size_t)len + n, (size_t)(len - n)))
                return ADAKV_ERR_SCORES;
        if (n > 0) {
            float *agg = (kernel == 1 && pf) ? pf : tmp;
            if (adakv__aggregate(blk, (size_t)len, n, n_q_per_kv, gqa, obs, agg))
                return ADAKV_ERR_SCORES;
            if (kernel == 1) {
                if (pk) {
                    int32_t r = 0;
                    for (; r + ADAKV_BLK <= n; r += ADAKV_BLK)
                        adakv__store(agg + r, ADAKV_BLK, NULL, pk + r);
                    adakv__store(agg + r, n - r, NULL, pk + r);
                }
            } else {
                adakv__pool(agg, n, cfg->kernel, cfg->pooling, t1, t2, pf, pk);
                if (cfg->align == ADAKV_ALIGN_CAUSAL)
                    adakv__align_causal(agg, n, cfg->kernel, cfg->pooling, pf, pk);
                /* an average of huge finite values can overflow */
                if (cfg->pooling == ADAKV_POOL_AVG) {
                    if (pf && adakv__nonfinite(pf, (size_t)n)) return ADAKV_ERR_SCORES;
                    if (pk)
                        for (int32_t r = 0; r < n; r++)
                            if (pk[r] >= 0xff800000u || pk[r] <= 0x007fffffu)
                                return ADAKV_ERR_SCORES;
                }
            }
        }
        in_off += (size_t)n_q_per_kv * (size_t)len;
        out_off += (size_t)n;
    }
    return ADAKV_OK;
}

int32_t adakv_score(const adakv_config *cfg, int32_t n_head_kv, int32_t n_q_per_kv,
                    int32_t n_obs, const int32_t *lens, const float *scores,
                    void *workspace, size_t workspace_size, float *pooled) {
    int64_t scored = 0;
    int32_t st = adakv_check_config(cfg);
    if (st != ADAKV_OK) return st;
    st = adakv__check_shape(cfg, n_head_kv, lens, NULL, &scored, NULL);
    if (st != ADAKV_OK) return st;
    if (n_q_per_kv < 1) return ADAKV_ERR_N_Q_PER_KV;
    if (n_obs < 1) return ADAKV_ERR_N_OBS;
    if (!scores || !pooled || !workspace) return ADAKV_ERR_NULL;
    if (workspace_size < adakv_workspace_size(cfg, n_head_kv, lens)) return ADAKV_ERR_WORKSPACE;
    return adakv__score_heads(cfg, n_head_kv, n_q_per_kv, n_obs, lens, scores,
                              (float *)adakv__ws_region(workspace, n_head_kv, scored, 2),
                              (float *)adakv__ws_region(workspace, n_head_kv, scored, 3),
                              (float *)adakv__ws_region(workspace, n_head_kv, scored, 4),
                              pooled, NULL);
}
