/*
 * global.c -- the cross-layer allocator (ada-kvzip-global) and selection with given
 * per-head grants.
 *
 * KVzip (Kim et al., 2025) ranks the scores of every KV pair of the model together and
 * evicts below one threshold, so layers and heads keep different numbers of rows. Here
 * that ranking is Ada-KV's allocation with the whole model as its "layer": the top
 * n_layers * n_head_kv * B' pooled scores over all heads of all layers give each head a
 * count, blended with the safeguard floor (round(count * (1 - alpha) + int(alpha * B')),
 * as in one layer), and each head keeps its top grant rows plus its window. With
 * alpha = 0 and window = 0 the kept rows are exactly KVzip's pair-level selection (with
 * ties broken deterministically: lower layer, lower head, lower row).
 *
 * The model's (layer, head) pairs are laid out as one "layer" of n_layers * n_head_kv
 * heads, so the layer-wide counting of alloc.c applies unchanged.
 */
#include "adakv_internal.h"

static int32_t adakv__global_shape(const adakv_config *cfg, int32_t n_head_kv,
                                   const int32_t *lens, int32_t *n_heads, int64_t *scored) {
    int32_t st = adakv_check_config(cfg);
    if (st != ADAKV_OK) return st;
    if (cfg->policy != ADAKV_POLICY_ADA_KVZIP_GLOBAL) return ADAKV_ERR_GLOBAL;
    if (n_head_kv < 1) return ADAKV_ERR_N_HEAD_KV;
    if ((int64_t)cfg->n_layers * n_head_kv > INT32_MAX / 2) return ADAKV_ERR_N_LAYERS;
    *n_heads = cfg->n_layers * n_head_kv;
    return adakv__check_shape(cfg, *n_heads, lens, NULL, scored, NULL);
}

size_t adakv_global_workspace_size(const adakv_config *cfg, int32_t n_head_kv,
                                   const int32_t *lens) {
    int32_t n_heads = 0;
    int64_t scored = 0;
    if (adakv__global_shape(cfg, n_head_kv, lens, &n_heads, &scored) != ADAKV_OK) return 0;
    return adakv__ws_bytes(n_heads, scored);
}

int32_t adakv_global_grants(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens,
                            const float *pooled, void *workspace, size_t workspace_size,
                            int32_t *grants) {
    int32_t n_heads = 0, bl;
    int64_t scored = 0, k;
    uint32_t *keys, *hist, *scratch, *cand, *cand_keys, *range;
    int32_t st = adakv__global_shape(cfg, n_head_kv, lens, &n_heads, &scored);
    if (st != ADAKV_OK) return st;
    if (!pooled || !workspace || !grants) return ADAKV_ERR_NULL;
    if (workspace_size < adakv__ws_bytes(n_heads, scored)) return ADAKV_ERR_WORKSPACE;
    bl = cfg->budget - cfg->window;
    k = (int64_t)n_heads * bl;
    if (scored <= k) { /* the model fits: every head keeps its scored rows */
        for (int32_t i = 0; i < n_heads; i++) grants[i] = lens[i] - adakv__win(cfg, lens[i]);
        return ADAKV_OK;
    }
    keys = (uint32_t *)adakv__ws_region(workspace, n_heads, scored, 0);
    for (int64_t i = 0; i < scored; i++) {
        uint32_t u;
        memcpy(&u, &pooled[i], sizeof u);
        if ((u & 0x7f800000u) == 0x7f800000u) return ADAKV_ERR_SCORES;
        keys[i] = adakv__key(pooled[i]);
    }
    if (bl == 0) { /* no scored row is granted (the floor is 0 too) */
        for (int32_t i = 0; i < n_heads; i++) grants[i] = 0;
        return ADAKV_OK;
    }
    hist = (uint32_t *)adakv__ws_region(workspace, n_heads, scored, 1);
    scratch = (uint32_t *)adakv__ws_region(workspace, n_heads, scored, 2);
    cand = (uint32_t *)adakv__ws_region(workspace, n_heads, scored, 3);
    cand_keys = (uint32_t *)adakv__ws_region(workspace, n_heads, scored, 4);
    range = (uint32_t *)adakv__ws_region(workspace, n_heads, scored, 5);
    adakv__ada_counts(cfg, n_heads, lens, keys, (size_t)scored, (size_t)k, hist, cand,
                      cand_keys, scratch, grants, range);
    for (int32_t i = 0; i < n_heads; i++)
        grants[i] = adakv__ada_cap(grants[i], cfg->floor_alpha, bl);
    return ADAKV_OK;
}

int32_t adakv_select_granted(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens,
                             const float *pooled, const int32_t *grants, void *workspace,
                             size_t workspace_size, int32_t *keep_counts,
                             int32_t *keep_rows, int32_t *caps, int64_t *n_evicted) {
    int64_t scored = 0, evicted = 0, pos = 0, off = 0;
    uint32_t *keys, *hist, *scratch, *cand, *cand_keys;
    int32_t st = adakv_check_config(cfg);
    if (st != ADAKV_OK) return st;
    st = adakv__check_shape(cfg, n_head_kv, lens, NULL, &scored, NULL);
    if (st != ADAKV_OK) return st;
    if (!adakv__needs_scores(cfg->policy)) return ADAKV_ERR_POLICY;
    if (!pooled || !grants || !workspace || !keep_counts || !keep_rows || !caps)
        return ADAKV_ERR_NULL;
    for (int32_t h = 0; h < n_head_kv; h++)
        if (grants[h] < 0) return ADAKV_ERR_GRANTS;
    if (workspace_size < adakv__ws_bytes(n_head_kv, scored)) return ADAKV_ERR_WORKSPACE;
    keys = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 0);
    hist = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 1);
    scratch = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 2);
    cand = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 3);
    cand_keys = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 4);
    for (int64_t i = 0; i < scored; i++) {
        uint32_t u;
        memcpy(&u, &pooled[i], sizeof u);
        if ((u & 0x7f800000u) == 0x7f800000u) return ADAKV_ERR_SCORES;
        keys[i] = adakv__key(pooled[i]);
    }
    for (int32_t h = 0; h < n_head_kv; h++) {
        const int32_t len = lens[h], win = adakv__win(cfg, len), n = len - win;
        const int32_t keep = grants[h] < n ? grants[h] : n;
        const int64_t cap = (int64_t)grants[h] + win;
        int32_t *out = keep_rows + pos;
        if (keep == n) {
            for (int32_t r = 0; r < n; r++) out[r] = r;
        } else if (keep > 0) {
            adakv__top_rows(keys + off, (size_t)n, (size_t)keep, hist, cand, cand_keys,
                            scratch, out);
        }
        for (int32_t r = n; r < len; r++) out[keep + r - n] = r; /* the window */
        keep_counts[h] = keep + win;
        caps[h] = cap > INT32_MAX ? INT32_MAX : (int32_t)(cap > keep + win ? cap : keep + win);
        evicted += len - keep_counts[h];
        pos += keep_counts[h];
        off += n;
    }
    if (n_evicted) *n_evicted = evicted;
    return ADAKV_OK;
}
