/*
 * config.c -- validation, error messages, workspace sizing, layer shapes.
 */
#include "adakv_internal.h"

int32_t adakv_version(void) { return (0 << 16) | (1 << 8) | 0; }

const char *adakv_strerror(int32_t status) {
    switch (status) {
    case ADAKV_OK: return "ok";
    case ADAKV_ERR_NULL: return "a required pointer argument is NULL";
    case ADAKV_ERR_POLICY: return "policy: unknown policy";
    case ADAKV_ERR_BUDGET: return "budget: must be >= 1 and >= window";
    case ADAKV_ERR_WINDOW: return "window: must be >= 0";
    case ADAKV_ERR_ALPHA: return "floor_alpha: must be in [0, 1]";
    case ADAKV_ERR_POOLING: return "pooling: unknown pooling";
    case ADAKV_ERR_KERNEL: return "kernel: must be odd and >= 1";
    case ADAKV_ERR_GQA: return "gqa: unknown GQA aggregation";
    case ADAKV_ERR_N_LAYERS: return "n_layers: must be >= 1 for pyramid and cross-layer policies";
    case ADAKV_ERR_BETA: return "beta: must be >= 1";
    case ADAKV_ERR_N_SINKS: return "n_sinks: must be >= 0";
    case ADAKV_ERR_LAYER: return "layer: must be in [0, n_layers)";
    case ADAKV_ERR_N_HEAD_KV: return "n_head_kv: must be >= 1";
    case ADAKV_ERR_N_Q_PER_KV: return "n_q_per_kv: must be >= 1";
    case ADAKV_ERR_N_OBS: return "n_obs: must be >= 1";
    case ADAKV_ERR_LENS: return "lens: lengths must be >= 0 and sum to less than 2^31";
    case ADAKV_ERR_SCORES: return "scores: NaN or infinite value";
    case ADAKV_ERR_WORKSPACE: return "workspace: too small (see adakv_workspace_size)";
    case ADAKV_ERR_ALIGN: return "align: unknown pooling alignment";
    case ADAKV_ERR_GLOBAL:
        return "policy: ada-kvzip-global allocates across layers (adakv_global_grants, then "
               "adakv_select_granted); the other policies select one layer at a time";
    case ADAKV_ERR_GRANTS: return "grants: must be >= 0";
    default: return "unknown status code";
    }
}

static int adakv__is_pyramid(int32_t policy) {
    return policy == ADAKV_POLICY_PYRAMID || policy == ADAKV_POLICY_ADA_PYRAMID;
}

/* policies that need cfg->n_layers */
static int adakv__needs_layers(int32_t policy) {
    return adakv__is_pyramid(policy) || policy == ADAKV_POLICY_ADA_KVZIP_GLOBAL;
}

int32_t adakv_check_config(const adakv_config *cfg) {
    if (!cfg) return ADAKV_ERR_NULL;
    if (cfg->policy < ADAKV_POLICY_FULL || cfg->policy > ADAKV_POLICY_ADA_KVZIP_GLOBAL)
        return ADAKV_ERR_POLICY;
    if (cfg->window < 0) return ADAKV_ERR_WINDOW;
    if (cfg->budget < 1 || cfg->budget < cfg->window) return ADAKV_ERR_BUDGET;
    /* written so that NaN fails */
    if (!(cfg->floor_alpha >= 0.0 && cfg->floor_alpha <= 1.0)) return ADAKV_ERR_ALPHA;
    if (cfg->pooling != ADAKV_POOL_MAX && cfg->pooling != ADAKV_POOL_AVG)
        return ADAKV_ERR_POOLING;
    if (cfg->kernel < 1 || cfg->kernel % 2 == 0) return ADAKV_ERR_KERNEL;
    if (cfg->align != ADAKV_ALIGN_CENTER && cfg->align != ADAKV_ALIGN_CAUSAL)
        return ADAKV_ERR_ALIGN;
    if (cfg->gqa != ADAKV_GQA_MEAN && cfg->gqa != ADAKV_GQA_MAX) return ADAKV_ERR_GQA;
    if (adakv__needs_layers(cfg->policy) && cfg->n_layers < 1) return ADAKV_ERR_N_LAYERS;
    if (cfg->beta < 1) return ADAKV_ERR_BETA;
    if (cfg->n_sinks < 0) return ADAKV_ERR_N_SINKS;
    return ADAKV_OK;
}

int32_t adakv__check_shape(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens,
                           int64_t *total_rows, int64_t *total_scored, int32_t *max_scored) {
    int64_t rows = 0, scored = 0;
    int32_t mx = 0;
    if (n_head_kv < 1) return ADAKV_ERR_N_HEAD_KV;
    if (!lens) return ADAKV_ERR_NULL;
    for (int32_t h = 0; h < n_head_kv; h++) {
        int32_t len = lens[h], n;
        if (len < 0) return ADAKV_ERR_LENS;
        n = len - adakv__win(cfg, len);
        rows += len;
        scored += n;
        if (n > mx) mx = n;
        if (rows > ADAKV_MAX_ROWS) return ADAKV_ERR_LENS;
    }
    if (total_rows) *total_rows = rows;
    if (total_scored) *total_scored = scored;
    if (max_scored) *max_scored = mx;
    return ADAKV_OK;
}

size_t adakv__region(int64_t n) {
    size_t bytes = (size_t)n * sizeof(uint32_t);
    return (bytes + ADAKV_ALIGN - 1) / ADAKV_ALIGN * ADAKV_ALIGN;
}

size_t adakv__ws_bytes(int32_t n_head_kv, int64_t scored) {
    return 4 * adakv__region(scored) + adakv__region(ADAKV_HIST) +
           adakv__region(2 * (int64_t)n_head_kv) + ADAKV_ALIGN;
}

void *adakv__ws_region(void *workspace, int32_t n_head_kv, int64_t scored, int which) {
    char *base = (char *)workspace;
    const size_t r = adakv__region(scored), hist = adakv__region(ADAKV_HIST);
    (void)n_head_kv;
    base += (ADAKV_ALIGN - (uintptr_t)base % ADAKV_ALIGN) % ADAKV_ALIGN;
    switch (which) {
    case 0: return base;
    case 1: return base + r;
    case 2: return base + r + hist;
    case 3: return base + 2 * r + hist;
    case 4: return base + 3 * r + hist;
    default: return base + 4 * r + hist;
    }
}

size_t adakv_workspace_size(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens) {
    int64_t scored = 0;
    if (adakv_check_config(cfg) != ADAKV_OK) return 0;
    if (adakv__check_shape(cfg, n_head_kv, lens, NULL, &scored, NULL) != ADAKV_OK) return 0;
    return adakv__ws_bytes(n_head_kv, scored);
}

int64_t adakv_n_scored(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens) {
    int64_t scored = 0;
    if (adakv_check_config(cfg) != ADAKV_OK) return -1;
    if (adakv__check_shape(cfg, n_head_kv, lens, NULL, &scored, NULL) != ADAKV_OK) return -1;
    return scored;
}
