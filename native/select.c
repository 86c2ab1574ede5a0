/*
 * select.c -- exact, deterministic top-k on order-preserving float keys.
 *
 * No sort: a radix select finds the k-th largest key T and how many keys lie strictly
 * above it -- first from a histogram of the top 11 bits, then from histograms of the
 * next 11 and the last 10 bits over the shrinking set of candidates sharing the prefix
 * found so far. The selection is then every key above T plus the first (lowest-index)
 * keys equal to T until k are taken: exactly what "stable descending sort, take the
 * first k" selects. Hot loops work on blocks of ADAKV_BLK keys (vectorized at -O2).
 */
#include "adakv_internal.h"

#define ADAKV_BLK 16

void adakv__hist(const uint32_t *keys, size_t n, uint32_t *hist) {
    /* two interleaved histograms halve the store-to-load stalls on hot buckets */
    uint32_t h2[ADAKV_HIST];
    size_t i = 0;
    memset(h2, 0, sizeof h2);
    for (; i + 2 <= n; i += 2) {
        hist[keys[i] >> ADAKV_HIST_SHIFT]++;
        h2[keys[i + 1] >> ADAKV_HIST_SHIFT]++;
    }
    for (; i < n; i++) hist[keys[i] >> ADAKV_HIST_SHIFT]++;
    for (int b = 0; b < ADAKV_HIST; b++) hist[b] += h2[b];
}

/* Bucket holding the k-th largest (1 <= k <= total of hist); *cum = keys above it. */
static uint32_t adakv__bucket(const uint32_t *hist, uint32_t top, size_t k, size_t *cum) {
    size_t c = 0;
    uint32_t b = top;
    while (c + hist[b] < k) c += hist[b--];
    *cum = c;
    return b;
}

uint32_t adakv__kth_largest(const uint32_t *keys, size_t n, size_t k, const uint32_t *hist,
                            uint32_t *scratch, size_t *n_above) {
    uint32_t sub[ADAKV_HIST];
    size_t above, cum, m = 0;
    uint32_t b = adakv__bucket(hist, ADAKV_HIST - 1, k, &above), prefix;
    k -= above;
    /* candidates: the keys of bucket b */
    for (size_t i = 0; i < n; i++) {
        uint32_t v = keys[i];
        if ((v >> ADAKV_HIST_SHIFT) == b) scratch[m++] = v;
    }
    prefix = b << ADAKV_HIST_SHIFT;
    /* bits 20..10, then 9..0, over the candidates */
    for (int pass = 0; pass < 2 && m > 1; pass++) {
        const int sh = pass == 0 ? 10 : 0;
        const uint32_t mk = pass == 0 ? 0x7ffu : 0x3ffu;
        size_t j = 0;
        memset(sub, 0, (size_t)(mk + 1) * sizeof sub[0]);
        for (size_t i = 0; i < m; i++) sub[(scratch[i] >> sh) & mk]++;
        b = adakv__bucket(sub, mk, k, &cum);
        above += cum;
        k -= cum;
        prefix |= b << sh;
        for (size_t i = 0; i < m; i++) {
            uint32_t v = scratch[i];
            if (((v >> sh) & mk) == b) scratch[j++] = v;
        }
        m = j;
    }
    if (m == 1) prefix = scratch[0]; /* a single candidate is the answer */
    if (n_above) *n_above = above;
    return prefix;
}

void adakv__count(const uint32_t *keys, size_t n, uint32_t t, size_t *gt, size_t *eq) {
    uint32_t g[ADAKV_BLK] = {0}, e[ADAKV_BLK] = {0};
    size_t i = 0, sg = 0, se = 0;
    for (; i + ADAKV_BLK <= n; i += ADAKV_BLK) {
        const uint32_t *kb = keys + i;
        for (int j = 0; j < ADAKV_BLK; j++) {
            g[j] += (uint32_t)(kb[j] > t);
            e[j] += (uint32_t)(kb[j] == t);
        }
    }
    for (; i < n; i++) {
        sg += keys[i] > t;
        se += keys[i] == t;
    }
    for (int j = 0; j < ADAKV_BLK; j++) {
        sg += g[j];
        se += e[j];
    }
    *gt = sg;
    *eq = se;
}

size_t adakv__emit(const uint32_t *keys, size_t n, uint32_t t, size_t ties, int32_t *out) {
    size_t i = 0, j = 0;
    for (; i < n; i++) {
        uint32_t v = keys[i];
        if ((i & (ADAKV_BLK - 1)) == 0 && i + ADAKV_BLK <= n) {
            /* skip a whole block when none of its keys reaches t */
            uint32_t hit = 0;
            for (int q = 0; q < ADAKV_BLK; q++) hit |= (uint32_t)(keys[i + (size_t)q] >= t);
            if (!hit) {
                i += ADAKV_BLK - 1;
                continue;
            }
        }
        if (v > t) {
            out[j++] = (int32_t)i;
        } else if (v == t && ties > 0) {
            out[j++] = (int32_t)i;
            ties--;
        }
    }
    return j;
}

size_t adakv__top_rows(const uint32_t *keys, size_t n, size_t k, uint32_t *hist,
                       uint32_t *scratch, int32_t *out) {
    size_t above = 0;
    uint32_t t;
    if (k >= n) {
        for (size_t i = 0; i < n; i++) out[i] = (int32_t)i;
        return n;
    }
    if (k == 0) return 0;
    memset(hist, 0, ADAKV_HIST * sizeof hist[0]);
    adakv__hist(keys, n, hist);
    t = adakv__kth_largest(keys, n, k, hist, scratch, &above);
    return adakv__emit(keys, n, t, k - above, out);
}
