/*
 * alloc.c -- allocators: how many scored rows each head of a layer keeps.
 *
 *   uniform  (snapkv, pyramid):  every head keeps its top B'_l.
 *   Ada-KV   (ada-snapkv, ada-pyramid): top n_head_kv*B'_l over all heads of the layer,
 *            count_h = how many fell in head h, cap_h = round(count_h*(1-a) + int(a*B'_l)).
 *   layer budgets B'_l: budget - window, or the PyramidKV schedule.
 */
#include "adakv_internal.h"

/* Python's a // b for b > 0. */
static int64_t adakv__floordiv(int64_t a, int64_t b) {
    int64_t q = a / b;
    if ((a % b != 0) && (a < 0)) q -= 1;
    return q;
}

int32_t adakv_layer_budget(const adakv_config *cfg, int32_t layer, int32_t n_head_kv,
                           const int32_t *lens, int32_t *out_budget) {
    int32_t max_n = 0;
    int64_t bp, mn, mx, steps, b;
    int32_t st = adakv_check_config(cfg);
    if (st != ADAKV_OK) return st;
    st = adakv__check_shape(cfg, n_head_kv, lens, NULL, NULL, &max_n);
    if (st != ADAKV_OK) return st;
    if (!out_budget) return ADAKV_ERR_NULL;
    bp = (int64_t)cfg->budget - cfg->window;
    if (cfg->policy != ADAKV_POLICY_PYRAMID && cfg->policy != ADAKV_POLICY_ADA_PYRAMID) {
        *out_budget = (int32_t)bp;
        return ADAKV_OK;
    }
    if (layer < 0 || layer >= cfg->n_layers) return ADAKV_ERR_LAYER;
    if (cfg->n_layers == 1) { /* no schedule with one layer (official code divides by 0) */
        *out_budget = (int32_t)bp;
        return ADAKV_OK;
    }
    /* official AdaKV (snapkv_utils.py, pyram_mode): (max + min) / 2 == B' */
    mn = bp / cfg->beta;
    mx = bp * 2 - mn;
    if (mx >= max_n) { /* the longest head's scored rows play the part of q_len - window */
        mx = max_n;
        mn = bp * 2 - mx;
    }
    steps = adakv__floordiv(mx - mn, (int64_t)cfg->n_layers - 1);
    b = mx - (int64_t)layer * steps;
    if (b < 0) b = 0;
    if (b > INT32_MAX) b = INT32_MAX;
    *out_budget = (int32_t)b;
    return ADAKV_OK;
}

void adakv__ada_counts(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens,
                       const uint32_t *keys, size_t total, size_t k, uint32_t *hist,
                       uint32_t *cand, uint32_t *cand_keys, uint32_t *scratch,
                       int32_t *counts, uint32_t *range) {
    size_t c, above = 0, ties, i = 0, end = 0;
    uint32_t t;
    /* heads are contiguous in keys: one selection over the whole layer */
    c = adakv__collect(keys, total, adakv__lower_bound(keys, total, k, hist), 0, cand);
    if (c < k) c = adakv__collect(keys, total, adakv__exact_bound(keys, total, k, hist), 0, cand);
    for (size_t j = 0; j < c; j++) cand_keys[j] = keys[cand[j]];
    t = adakv__kth_largest(cand_keys, c, k, hist, scratch, &above);
    ties = k - above;
    /* candidates are ascending, so each head's are one run */
    for (int32_t h = 0; h < n_head_kv; h++) {
        size_t gt = 0, eq = 0;
        end += (size_t)(lens[h] - adakv__win(cfg, lens[h]));
        range[2 * h] = (uint32_t)i;
        for (; i < c && cand[i] < end; i++) {
            gt += cand_keys[i] > t;
            eq += cand_keys[i] == t;
        }
        range[2 * h + 1] = (uint32_t)i;
        /* cross-head ties at the threshold go to the lower head first */
        if (eq > ties) eq = ties;
        ties -= eq;
        counts[h] = (int32_t)(gt + eq);
    }
}

int32_t adakv__ada_cap(int32_t count, double alpha, int32_t layer_budget) {
    /* official: floor_capacity = int(B' * floor_alpha) (Python float, truncation);
     * torch.round(counts * (1 - floor_alpha) + floor_capacity) on an int64 tensor
     * computes in float32 (default dtype) and rounds half to even. */
    int32_t floor_cap = (int32_t)((double)layer_budget * alpha);
    float one_minus = (float)(1.0 - alpha);
    float v = (float)count * one_minus;
    v = v + (float)floor_cap;
    return adakv__round_half_even(v);
}
