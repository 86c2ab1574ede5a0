/*
 * select.c -- exact, deterministic top-k on order-preserving float keys.
 *
 * The top k of keys[0..n) (ties: lower index first) is every key above the k-th
 * largest key T plus the first keys equal to T: exactly what "stable descending sort,
 * take the first k" selects. No sort is needed:
 *
 *   1. a histogram of the top 11 bits of a sample (every 8th key) gives a lower bound
 *      LB that, with a safety margin, at least k keys reach;
 *   2. one scan collects the (ascending) indices of all keys >= LB -- a small superset
 *      of the top k (if fewer than k are found, an exact histogram gives the bound);
 *   3. a radix select (11/11/10 bits) over just those candidates finds T, and a pass
 *      over the candidates keeps the top k in index order.
 *
 * Hot loops work on blocks of ADAKV_BLK keys with fixed-size inner loops, which
 * compilers vectorize at -O2.
 */
#include "adakv_internal.h"

#define ADAKV_BLK 16
#define ADAKV_SAMPLE 8          /* sampling stride for the lower bound            */
#define ADAKV_SAMPLE_MIN 16384  /* below this many keys, use an exact histogram  */

void adakv__hist(const uint32_t *keys, size_t n, size_t stride, uint32_t *hist) {
    memset(hist, 0, ADAKV_HIST * sizeof hist[0]);
    for (size_t i = 0; i < n; i += stride) hist[keys[i] >> ADAKV_HIST_SHIFT]++;
}

/* Highest bucket b whose keys and those above number at least `need`; b = 0 if none. */
static uint32_t adakv__bucket(const uint32_t *hist, uint32_t top, size_t need, size_t *cum) {
    size_t c = 0;
    uint32_t b = top;
    while (b > 0 && c + hist[b] < need) c += hist[b--];
    *cum = c;
    return b;
}

uint32_t adakv__lower_bound(const uint32_t *keys, size_t n, size_t k, uint32_t *hist) {
    size_t cum1, cum2, need;
    uint32_t b1, b2;
    if (n < ADAKV_SAMPLE_MIN) {
        adakv__hist(keys, n, 1, hist);
        return adakv__bucket(hist, ADAKV_HIST - 1, k, &cum1) << ADAKV_HIST_SHIFT;
    }
    /* in sampled keys, with a margin of k/4 + 64 keys: several standard deviations of
     * the sampled count */
    need = (k + k / 4 + 64) / ADAKV_SAMPLE + 1;
    adakv__hist(keys, n, ADAKV_SAMPLE, hist);
    b1 = adakv__bucket(hist, ADAKV_HIST - 1, need, &cum1);
    if (cum1 + hist[b1] < need) return 0; /* too few samples: no bound */
    /* refine within bucket b1 by the next 11 bits of the sampled keys */
    memset(hist, 0, ADAKV_HIST * sizeof hist[0]);
    for (size_t i = 0; i < n; i += ADAKV_SAMPLE)
        if ((keys[i] >> ADAKV_HIST_SHIFT) == b1) hist[(keys[i] >> 10) & 0x7ffu]++;
    b2 = adakv__bucket(hist, ADAKV_HIST - 1, need - cum1, &cum2);
    return (b1 << ADAKV_HIST_SHIFT) | (b2 << 10);
}

uint32_t adakv__exact_bound(const uint32_t *keys, size_t n, size_t k, uint32_t *hist) {
    size_t cum;
    adakv__hist(keys, n, 1, hist);
    return adakv__bucket(hist, ADAKV_HIST - 1, k, &cum) << ADAKV_HIST_SHIFT;
}

size_t adakv__collect(const uint32_t *keys, size_t n, uint32_t lb, uint32_t base,
                      uint32_t *out) {
    size_t i = 0, m = 0;
    for (; i + ADAKV_BLK <= n; i += ADAKV_BLK) {
        const uint32_t *kb = keys + i;
        uint32_t hit = 0;
        for (int j = 0; j < ADAKV_BLK; j++) hit |= (uint32_t)(kb[j] >= lb);
        if (!hit) continue;
        for (int j = 0; j < ADAKV_BLK; j++) {
            out[m] = base + (uint32_t)(i + (size_t)j);
            m += kb[j] >= lb;
        }
    }
    for (; i < n; i++) {
        out[m] = base + (uint32_t)i;
        m += keys[i] >= lb;
    }
    return m;
}

uint32_t adakv__kth_largest(const uint32_t *keys, size_t n, size_t k, uint32_t *hist,
                            uint32_t *scratch, size_t *n_above) {
    size_t above, cum, m = 0;
    uint32_t b, prefix;
    adakv__hist(keys, n, 1, hist);
    b = adakv__bucket(hist, ADAKV_HIST - 1, k, &above);
    k -= above;
    for (size_t i = 0; i < n; i++) { /* the candidates of bucket b */
        uint32_t v = keys[i];
        scratch[m] = v;
        m += (v >> ADAKV_HIST_SHIFT) == b;
    }
    prefix = b << ADAKV_HIST_SHIFT;
    for (int pass = 0; pass < 2 && m > 1; pass++) { /* bits 20..10, then 9..0 */
        const int sh = pass == 0 ? 10 : 0;
        const uint32_t mk = pass == 0 ? 0x7ffu : 0x3ffu;
        size_t j = 0;
        memset(hist, 0, (size_t)(mk + 1) * sizeof hist[0]);
        for (size_t i = 0; i < m; i++) hist[(scratch[i] >> sh) & mk]++;
        b = adakv__bucket(hist, mk, k, &cum);
        above += cum;
        k -= cum;
        prefix |= b << sh;
        for (size_t i = 0; i < m; i++) {
            uint32_t v = scratch[i];
            scratch[j] = v;
            j += ((v >> sh) & mk) == b;
        }
        m = j;
    }
    if (m == 1) prefix = scratch[0]; /* a single candidate is the answer */
    if (n_above) *n_above = above;
    return prefix;
}

size_t adakv__top_among(const uint32_t *cand, const uint32_t *cand_keys, size_t c, size_t k,
                        uint32_t base, uint32_t *hist, uint32_t *scratch, int32_t *out) {
    size_t above = 0, ties, j = 0;
    uint32_t t;
    if (k == 0) return 0;
    if (k >= c) {
        for (size_t i = 0; i < c; i++) out[i] = (int32_t)(cand[i] - base);
        return c;
    }
    t = adakv__kth_largest(cand_keys, c, k, hist, scratch, &above);
    ties = k - above;
    for (size_t i = 0; i < c; i++) {
        uint32_t v = cand_keys[i];
        if (v > t || (v == t && ties > 0)) {
            ties -= v == t;
            out[j++] = (int32_t)(cand[i] - base);
        }
    }
    return j;
}

size_t adakv__top_rows(const uint32_t *keys, size_t n, size_t k, uint32_t *hist,
                       uint32_t *cand, uint32_t *cand_keys, uint32_t *scratch, int32_t *out) {
    size_t c;
    if (k >= n) {
        for (size_t i = 0; i < n; i++) out[i] = (int32_t)i;
        return n;
    }
    if (k == 0) return 0;
    c = adakv__collect(keys, n, adakv__lower_bound(keys, n, k, hist), 0, cand);
    if (c < k) /* the sample misled the bound: use the exact one */
        c = adakv__collect(keys, n, adakv__exact_bound(keys, n, k, hist), 0, cand);
    for (size_t i = 0; i < c; i++) cand_keys[i] = keys[cand[i]];
    return adakv__top_among(cand, cand_keys, c, k, 0, hist, scratch, out);
}
