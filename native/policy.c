/*
 * policy.c -- the policies: scorer + allocator + selector for one layer.
 *
 * Every head keeps its window (the last min(window, len) rows). Nothing is evicted
 * while the layer fits: for the uniform allocators a head with n_h <= B'_l keeps all,
 * for Ada-KV a layer with sum_h n_h <= n_head_kv * B'_l keeps all (with equal lengths
 * both reduce to the official "skip when B' >= len - window").
 * The kvzip policies are the same allocators on the reconstruction scorer's output;
 * ada-kvzip-global allocates across layers (global.c).
 */
#include "adakv_internal.h"

/* Write rows [lo, hi) to out; returns the count. */
static int32_t adakv__range(int32_t lo, int32_t hi, int32_t *out) {
    for (int32_t r = lo; r < hi; r++) out[r - lo] = r;
    return hi > lo ? hi - lo : 0;
}

static int32_t adakv__max32(int64_t a, int64_t b) {
    int64_t m = a > b ? a : b;
    return m > INT32_MAX ? INT32_MAX : (int32_t)m;
}

/* full and streaming: no scores */
static void adakv__select_unscored(const adakv_config *cfg, int32_t n_head_kv,
                                   const int32_t *lens, int32_t *keep_counts,
                                   int32_t *keep_rows, int32_t *caps, int64_t *n_evicted) {
    int64_t pos = 0, evicted = 0;
    int32_t sinks = cfg->budget - cfg->window;
    if (sinks > cfg->n_sinks) sinks = cfg->n_sinks;
    for (int32_t h = 0; h < n_head_kv; h++) {
        const int32_t len = lens[h];
        int32_t c;
        if (cfg->policy == ADAKV_POLICY_FULL || len <= cfg->budget) {
            c = adakv__range(0, len, keep_rows + pos);
        } else { /* streaming: sinks + the most recent budget - sinks rows */
            c = adakv__range(0, sinks, keep_rows + pos);
            c += adakv__range(len - (cfg->budget - sinks), len, keep_rows + pos + c);
        }
        keep_counts[h] = c;
        caps[h] = cfg->policy == ADAKV_POLICY_FULL ? len : cfg->budget;
        evicted += len - c;
        pos += c;
    }
    if (n_evicted) *n_evicted = evicted;
}

/* Scored policies, given the keys of every head's scored rows (packed in head order)
 * and a workspace. */
static void adakv__select_keys(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens,
                               int32_t bl, int64_t scored, const uint32_t *keys,
                               void *workspace, int32_t *keep_counts, int32_t *keep_rows,
                               int32_t *caps, int64_t *n_evicted) {
    uint32_t *hist = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 1);
    uint32_t *scratch = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 2);
    uint32_t *cand = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 3);
    uint32_t *cand_keys = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 4);
    uint32_t *range = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 5);
    const int is_ada = adakv__is_ada(cfg->policy);
    /* Ada-KV evicts when the layer's scored rows exceed n_head_kv * B'_l */
    const int ada = is_ada && scored > (int64_t)n_head_kv * bl;
    int64_t evicted = 0, pos = 0, off = 0;

    if (ada && bl > 0) /* counts from the layer-wide top-k; caps[] holds them for now */
        adakv__ada_counts(cfg, n_head_kv, lens, keys, (size_t)scored,
                          (size_t)n_head_kv * (size_t)bl, hist, cand, cand_keys, scratch,
                          caps, range);
    else if (ada) /* B'_l = 0: every count is 0 (so is the floor): only windows stay */
        for (int32_t h = 0; h < n_head_kv; h++) {
            caps[h] = 0;
            range[2 * h] = range[2 * h + 1] = 0;
        }
    /* grants, kept counts and caps (known before any row is chosen) */
    for (int32_t h = 0; h < n_head_kv; h++) {
        const int32_t win = adakv__win(cfg, lens[h]), n = lens[h] - win;
        /* scored rows granted: Ada cap, uniform B'_l, or all (an Ada layer that fits) */
        const int32_t grant = ada ? adakv__ada_cap(caps[h], cfg->floor_alpha, bl) : bl;
        const int32_t keep = (is_ada && !ada) ? n : (grant < n ? grant : n);
        keep_counts[h] = keep + win;
        caps[h] = adakv__max32(keep + win, (int64_t)grant + win);
        evicted += lens[h] - keep_counts[h];
    }
    /* rows: Ada heads whose layer candidates hold their top rows first, then the rest
     * (which reuse the candidate buffers) */
    for (int pass = 0; pass < 2; pass++) {
        pos = 0;
        off = 0;
        for (int32_t h = 0; h < n_head_kv; h++) {
            const int32_t len = lens[h], win = adakv__win(cfg, len), n = len - win;
            const int32_t keep = keep_counts[h] - win;
            const int reuse = ada && (uint32_t)keep <= range[2 * h + 1] - range[2 * h];
            int32_t *out = keep_rows + pos;
            if (reuse == (pass == 0)) {
                if (reuse)
                    adakv__top_among(cand + range[2 * h], cand_keys + range[2 * h],
                                     range[2 * h + 1] - range[2 * h], (size_t)keep,
                                     (uint32_t)off, hist, scratch, out);
                else
                    adakv__top_rows(keys + off, (size_t)n, (size_t)keep, hist, cand,
                                    cand_keys, scratch, out);
                for (int32_t r = n; r < len; r++) out[keep + r - n] = r; /* the window */
            }
            pos += keep_counts[h];
            off += n;
        }
    }
    if (n_evicted) *n_evicted = evicted;
}

/* Shared argument checks; *bl receives B'_l and *scored the scored rows. */
static int32_t adakv__prepare(const adakv_config *cfg, int32_t layer, int32_t n_head_kv,
                              const int32_t *lens, int32_t *keep_counts, int32_t *keep_rows,
                              int32_t *caps, int32_t *bl, int64_t *scored) {
    int32_t st = adakv_check_config(cfg);
    if (st != ADAKV_OK) return st;
    st = adakv__check_shape(cfg, n_head_kv, lens, NULL, scored, NULL);
    if (st != ADAKV_OK) return st;
    if (!keep_counts || !keep_rows || !caps) return ADAKV_ERR_NULL;
    if (cfg->policy == ADAKV_POLICY_ADA_KVZIP_GLOBAL) return ADAKV_ERR_GLOBAL;
    return adakv_layer_budget(cfg, layer, n_head_kv, lens, bl);
}

int32_t adakv_select_scored(const adakv_config *cfg, int32_t layer, int32_t n_head_kv,
                            const int32_t *lens, const float *pooled,
                            void *workspace, size_t workspace_size,
                            int32_t *keep_counts, int32_t *keep_rows, int32_t *caps,
                            int64_t *n_evicted) {
    int64_t scored = 0;
    int32_t bl = 0;
    uint32_t *keys;
    int32_t st = adakv__prepare(cfg, layer, n_head_kv, lens, keep_counts, keep_rows, caps, &bl,
                                &scored);
    if (st != ADAKV_OK) return st;
    if (!adakv__needs_scores(cfg->policy)) {
        adakv__select_unscored(cfg, n_head_kv, lens, keep_counts, keep_rows, caps, n_evicted);
        return ADAKV_OK;
    }
    if (!pooled || !workspace) return ADAKV_ERR_NULL;
    if (workspace_size < adakv__ws_bytes(n_head_kv, scored)) return ADAKV_ERR_WORKSPACE;
    keys = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 0);
    for (int64_t i = 0; i < scored; i++) {
        uint32_t u;
        memcpy(&u, &pooled[i], sizeof u);
        if ((u & 0x7f800000u) == 0x7f800000u) return ADAKV_ERR_SCORES;
        keys[i] = adakv__key(pooled[i]);
    }
    adakv__select_keys(cfg, n_head_kv, lens, bl, scored, keys, workspace, keep_counts,
                       keep_rows, caps, n_evicted);
    return ADAKV_OK;
}

int32_t adakv_select_layer(const adakv_config *cfg, int32_t layer, int32_t n_head_kv,
                           int32_t n_q_per_kv, int32_t n_obs, const int32_t *lens,
                           const float *scores, void *workspace, size_t workspace_size,
                           int32_t *keep_counts, int32_t *keep_rows, int32_t *caps,
                           int64_t *n_evicted) {
    int64_t scored = 0;
    int32_t bl = 0;
    uint32_t *keys, *scratch;
    int32_t st = adakv__prepare(cfg, layer, n_head_kv, lens, keep_counts, keep_rows, caps, &bl,
                                &scored);
    if (st != ADAKV_OK) return st;
    if (!adakv__needs_scores(cfg->policy)) {
        adakv__select_unscored(cfg, n_head_kv, lens, keep_counts, keep_rows, caps, n_evicted);
        return ADAKV_OK;
    }
    if (n_q_per_kv < 1) return ADAKV_ERR_N_Q_PER_KV;
    if (n_obs < 1) return ADAKV_ERR_N_OBS;
    if (!scores || !workspace) return ADAKV_ERR_NULL;
    if (workspace_size < adakv__ws_bytes(n_head_kv, scored)) return ADAKV_ERR_WORKSPACE;
    keys = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 0);
    scratch = (uint32_t *)adakv__ws_region(workspace, n_head_kv, scored, 2);
    st = adakv__score_heads(cfg, n_head_kv, n_q_per_kv, n_obs, lens, scores, (float *)scratch,
                            (float *)adakv__ws_region(workspace, n_head_kv, scored, 3),
                            (float *)adakv__ws_region(workspace, n_head_kv, scored, 4), NULL,
                            keys);
    if (st != ADAKV_OK) return st;
    adakv__select_keys(cfg, n_head_kv, lens, bl, scored, keys, workspace, keep_counts,
                       keep_rows, caps, n_evicted);
    return ADAKV_OK;
}
