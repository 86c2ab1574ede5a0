/*
 * adakv.h -- Ada-KV and baseline KV-cache selection policies (C99, no dependencies).
 *
 * Pure functions on per-layer score arrays. Nothing here allocates: the caller
 * provides a workspace whose size adakv_workspace_size() reports. Results are
 * deterministic: among equal scores the lower row index wins, and in the
 * cross-head ranking of Ada-KV the lower head index wins, then the lower row.
 *
 * Vocabulary (one layer):
 *   n_head_kv   number of KV heads; KV head h serves query heads
 *               h*n_q_per_kv .. h*n_q_per_kv + n_q_per_kv - 1 (llama.cpp GQA order).
 *   lens[h]     live rows of KV head h, in position order (heads may differ: ragged).
 *   window      the last min(window, lens[h]) rows of each head: always kept, never scored.
 *   n_h         lens[h] - min(window, lens[h]): the scored rows of head h.
 *   scores      raw window scores, float32, one block per KV head in head order;
 *               block h is [n_q_per_kv][lens[h]] row-major, i.e. the value for query
 *               head g of KV head h at row r is scores[off_h + g*lens[h] + r] with
 *               off_h = n_q_per_kv * (lens[0] + ... + lens[h-1]). With equal lengths
 *               this is exactly a [n_q_head][len] array. Each value is the SUM over
 *               the n_obs window queries of their softmax attention to that row
 *               (the kvzip policies: the MAX over the scoring queries, see below).
 *   pooled      scorer output: one float per scored row, heads concatenated
 *               (head h at offset n_0 + ... + n_{h-1}).
 *   B'          budget - window: scored rows a head keeps on average; B'_l for a
 *               layer l under the pyramid policies.
 *
 * Everything between the CFFI markers is parsed by cffi (native/build_ffi.py):
 * keep it to plain declarations.
 */
#ifndef ADAKV_H
#define ADAKV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CFFI-BEGIN */

/* Policies. */
enum {
    ADAKV_POLICY_FULL = 0,        /* keep every row                                  */
    ADAKV_POLICY_STREAMING = 1,   /* StreamingLLM: n_sinks first rows + most recent  */
    ADAKV_POLICY_SNAPKV = 2,      /* SnapKV scorer, uniform B' per head              */
    ADAKV_POLICY_ADA_SNAPKV = 3,  /* SnapKV scorer, Ada-KV allocation               */
    ADAKV_POLICY_PYRAMID = 4,     /* SnapKV scorer, PyramidKV layer budget, uniform  */
    ADAKV_POLICY_ADA_PYRAMID = 5, /* SnapKV scorer, PyramidKV layer budget, Ada-KV   */
    ADAKV_POLICY_KVZIP = 6,       /* reconstruction (max) scorer, uniform B' per head */
    ADAKV_POLICY_ADA_KVZIP = 7,   /* reconstruction scorer, Ada-KV in each layer      */
    ADAKV_POLICY_ADA_KVZIP_GLOBAL = 8 /* reconstruction scorer, Ada-KV over all layers:
                                   * adakv_global_grants + adakv_select_granted     */
};

/* Pooling along rows (odd kernel, stride 1, same padding; avg counts the padding). */
enum { ADAKV_POOL_MAX = 0, ADAKV_POOL_AVG = 1 };

/* Where a row's pooling window lies. CENTER (official SnapKV/Ada-KV): rows r-k/2..r+k/2.
 * CAUSAL: rows r-k+1..r, so the k-1 rows after a high score inherit it and the
 * continuation of an attended span is kept (padding before row 0 as for CENTER). */
enum { ADAKV_ALIGN_CENTER = 0, ADAKV_ALIGN_CAUSAL = 1 };

/* Aggregation of the query heads of one GQA group into one score per KV-head row. */
enum { ADAKV_GQA_MEAN = 0, ADAKV_GQA_MAX = 1 };

/* Status codes (0 = success). adakv_strerror() names the offending parameter. */
enum {
    ADAKV_OK = 0,
    ADAKV_ERR_NULL = 1,        /* a required pointer is NULL                        */
    ADAKV_ERR_POLICY = 2,      /* unknown policy                                    */
    ADAKV_ERR_BUDGET = 3,      /* budget < 1 or budget < window                     */
    ADAKV_ERR_WINDOW = 4,      /* window < 0                                        */
    ADAKV_ERR_ALPHA = 5,       /* floor_alpha outside [0, 1] or NaN                 */
    ADAKV_ERR_POOLING = 6,     /* unknown pooling                                   */
    ADAKV_ERR_KERNEL = 7,      /* kernel even or < 1                                */
    ADAKV_ERR_GQA = 8,         /* unknown GQA aggregation                           */
    ADAKV_ERR_N_LAYERS = 9,    /* pyramid or cross-layer policy with n_layers < 1   */
    ADAKV_ERR_BETA = 10,       /* pyramid policy with beta < 1                      */
    ADAKV_ERR_N_SINKS = 11,    /* n_sinks < 0                                       */
    ADAKV_ERR_LAYER = 12,      /* layer outside [0, n_layers) (pyramid policies)    */
    ADAKV_ERR_N_HEAD_KV = 13,  /* n_head_kv < 1                                     */
    ADAKV_ERR_N_Q_PER_KV = 14, /* n_q_per_kv < 1                                    */
    ADAKV_ERR_N_OBS = 15,      /* n_obs < 1                                         */
    ADAKV_ERR_LENS = 16,       /* a negative length, or a total too large           */
    ADAKV_ERR_SCORES = 17,     /* a NaN or infinite score (input or aggregated)     */
    ADAKV_ERR_WORKSPACE = 18,  /* workspace smaller than adakv_workspace_size()     */
    ADAKV_ERR_ALIGN = 19,      /* unknown pooling alignment                         */
    ADAKV_ERR_GLOBAL = 20,     /* a cross-layer policy given to a one-layer selection, or
                                * a one-layer policy to adakv_global_grants           */
    ADAKV_ERR_GRANTS = 21      /* a negative grant                                      */
};

/* Policy configuration, shared by every layer of a model. */
typedef struct adakv_config {
    int32_t policy;      /* ADAKV_POLICY_*                                         */
    int32_t budget;      /* rows per KV head on average, window included (>= window) */
    int32_t window;      /* observation window, always kept (default 32)           */
    double floor_alpha;  /* Ada-KV safeguard alpha in [0, 1] (default 0.2)          */
    int32_t pooling;     /* ADAKV_POOL_* (default max)                             */
    int32_t kernel;      /* pooling kernel, odd >= 1 (default 7; 1 = no pooling)   */
    int32_t gqa;         /* ADAKV_GQA_* (default mean)                             */
    int32_t n_layers;    /* number of layers (pyramid policies only)               */
    int32_t beta;        /* PyramidKV steepness (default 20)                       */
    int32_t n_sinks;     /* StreamingLLM sink rows (default 4)                     */
    int32_t align;       /* ADAKV_ALIGN_* pooling window (0 = center, official)    */
} adakv_config;

/* Library version, (major << 16) | (minor << 8) | patch. */
int32_t adakv_version(void);

/* Static message for a status code, naming the offending parameter. Never NULL. */
const char *adakv_strerror(int32_t status);

/* Validate a configuration on its own (no layer data). Returns a status code. */
int32_t adakv_check_config(const adakv_config *cfg);

/* Bytes of workspace adakv_score(), adakv_select_scored() and adakv_select_layer()
 * need for this layer shape: about 16 bytes per scored row (it depends only on the
 * window, n_head_kv and the lengths). One workspace may be reused for every layer of
 * the same or a smaller shape, but not by two calls at once. Returns 0 if cfg or
 * lens is invalid (a valid shape always needs at least a few bytes). */
size_t adakv_workspace_size(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens);

/* Number of scored rows of all heads together: sum_h n_h (or -1 on bad input).
 * This is the length of the pooled array. */
int64_t adakv_n_scored(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens);

/* Per-head scored-row budget B'_l of layer `layer`: budget - window for every
 * policy but the pyramid ones, which use the official PyramidKV integer schedule
 * (min = B'//beta, max = 2B' - min, clamped to the longest head's scored rows,
 * step = (max - min) // (n_layers - 1), B'_l = max - layer*step). Writes it to
 * *out_budget; returns a status code. */
int32_t adakv_layer_budget(const adakv_config *cfg, int32_t layer, int32_t n_head_kv,
                           const int32_t *lens, int32_t *out_budget);

/* Scorer (SnapKV window attention): for every scored row, mean over the n_obs
 * window queries (the raw sums divided by n_obs; a common positive factor, so no
 * ranking changes -- it keeps the values those of the official code), then GQA
 * aggregation over the group (mean: left-to-right sum in group order, divided by
 * n_q_per_kv; or max), then pooling along the head's scored rows only (the window
 * is never pooled). float32 throughout, in the official order of operations: the
 * values are bit-identical to the PyTorch ops (F.max_pool1d / F.avg_pool1d with
 * padding kernel/2, stride 1; with ADAKV_ALIGN_CAUSAL, the same ops on the rows
 * padded with kernel-1 rows in front and none behind). Writes adakv_n_scored()
 * floats to `pooled` (which must not overlap the workspace). Fails with
 * ADAKV_ERR_SCORES if any input score (window rows included) or pooled value is NaN
 * or infinite. */
int32_t adakv_score(const adakv_config *cfg, int32_t n_head_kv, int32_t n_q_per_kv,
                    int32_t n_obs, const int32_t *lens, const float *scores,
                    void *workspace, size_t workspace_size, float *pooled);

/* Allocator + selector on already pooled scores (the scorer output, any scorer):
 * decides per-head budgets and writes the kept rows.
 *   snapkv / pyramid          every head keeps its top B'_l scored rows;
 *   ada-snapkv / ada-pyramid  count_h = how many of the top n_head_kv*B'_l scored
 *                             rows of the whole layer are head h's; the head keeps
 *                             its top cap_h = round(count_h*(1-alpha) + int(alpha*B'_l))
 *                             (float32, half to even, as torch.round in the official
 *                             code), or all its scored rows if it has fewer;
 *   streaming                 first min(n_sinks, budget - window) rows + most recent;
 *   full                      everything.
 * Every head also keeps its window. Nothing is evicted while the layer fits: a
 * uniform head with n_h <= B'_l, or an Ada layer with sum_h n_h <= n_head_kv*B'_l,
 * keeps all its rows (with equal lengths: the official B' >= len - window).
 * Ties: lower row first; across heads (Ada-KV) lower head first, then lower row.
 * Outputs:
 *   keep_counts[h]  rows kept by head h, window included
 *   keep_rows       kept row indices, ascending within each head, heads packed one
 *                   after the other (head h starts at keep_counts[0]+...+[h-1]);
 *                   capacity needed: sum_h lens[h]
 *   caps[h]         row allowance granted to head h, window included:
 *                   max(keep_counts[h], granted) where granted is B'_l + window
 *                   (uniform), cap_h + window (Ada-KV), budget (streaming) or
 *                   lens[h] (full). A head shorter than its grant keeps all it has.
 *   n_evicted       (may be NULL) total rows dropped in this layer; 0 means the
 *                   layer was under budget and everything is kept.
 * `pooled` and `workspace` may be NULL for the full and streaming policies.
 * ada-kvzip-global allocates across layers: ADAKV_ERR_GLOBAL (see adakv_global_grants). */
int32_t adakv_select_scored(const adakv_config *cfg, int32_t layer, int32_t n_head_kv,
                            const int32_t *lens, const float *pooled,
                            void *workspace, size_t workspace_size,
                            int32_t *keep_counts, int32_t *keep_rows, int32_t *caps,
                            int64_t *n_evicted);

/* Whole policy for one layer: adakv_score() then adakv_select_scored(), with the
 * same outputs. `scores` and `workspace` may be NULL for the full and streaming
 * policies. This is the entry point of the runtime: one call per layer (ADAKV_ERR_GLOBAL
 * for ada-kvzip-global: adakv_score, adakv_global_grants, adakv_select_granted). */
int32_t adakv_select_layer(const adakv_config *cfg, int32_t layer, int32_t n_head_kv,
                           int32_t n_q_per_kv, int32_t n_obs, const int32_t *lens,
                           const float *scores, void *workspace, size_t workspace_size,
                           int32_t *keep_counts, int32_t *keep_rows, int32_t *caps,
                           int64_t *n_evicted);

/* --- Context-reconstruction scoring (KVzip-style; score_max.c, global.c) ------------
 *
 * The kvzip policies read MAX scores: for every query head and row, the largest
 * softmax attention any scoring query gave the row (llama_ragged_observe_max over the
 * queries of a reconstruction chunk -- the model teacher-forced to repeat the text it
 * just read -- combined over chunks and compressions with adakv_max_accumulate). Their
 * scorer takes the max over the query heads of each GQA group, does not divide by n_obs
 * (which must still be >= 1) and does not pool: cfg->gqa, pooling, kernel and align are
 * not read (the queries that copy a span attend to each of its rows themselves; pooling
 * only spreads scores to rows no query needed, and measured worse). Allocation: uniform
 * (kvzip), Ada-KV in each layer (ada-kvzip), or Ada-KV over all layers at once
 * (ada-kvzip-global: adakv_global_grants, then adakv_select_granted per layer). */

/* Running maximum of one layer's observations onto the rows held before they were made.
 * KV head h has lens[h] rows in acc and obs_lens[h] >= lens[h] in obs (the same rows
 * first, then rows added after them, e.g. a reconstruction chunk's); both are laid out
 * as `scores` above (block h: [n_q_per_kv][len]). For every query head g and row
 * r < lens[h]: acc = obs (init != 0) or max(acc, obs). A NaN or infinite value among the
 * obs values read fails with ADAKV_ERR_SCORES and leaves acc unchanged. */
int32_t adakv_max_accumulate(int32_t n_head_kv, int32_t n_q_per_kv, const int32_t *lens,
                             const int32_t *obs_lens, const float *obs, int32_t init,
                             float *acc);

/* Bytes of workspace adakv_global_grants() needs for cfg->n_layers layers of n_head_kv
 * heads with lengths lens[layer * n_head_kv + h] (0 if cfg or lens is invalid). */
size_t adakv_global_workspace_size(const adakv_config *cfg, int32_t n_head_kv,
                                   const int32_t *lens);

/* Cross-layer Ada-KV allocation (policy ADAKV_POLICY_ADA_KVZIP_GLOBAL; n_layers =
 * cfg->n_layers): `pooled` is the scorer output of every layer, layer after layer
 * (adakv_score of layer l, adakv_n_scored floats each). count_{l,h} = how many of the
 * top cfg->n_layers * n_head_kv * B' pooled scores of the whole model are head h of
 * layer l's (ties: lower layer, then lower head, then lower row);
 * grants[l * n_head_kv + h] = round(count_{l,h} * (1 - alpha) + int(alpha * B')) scored
 * rows (float32, half to even, as adakv_select_scored). When the model's scored rows fit
 * in n_layers * n_head_kv * B', every head is granted all of its scored rows. */
int32_t adakv_global_grants(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens,
                            const float *pooled, void *workspace, size_t workspace_size,
                            int32_t *grants);

/* Selection of one layer with given grants (scored rows per head, >= 0; any scored
 * policy): head h keeps its top min(grants[h], n_h) pooled scores (ties: lower row) plus
 * its window; caps[h] = max(keep_counts[h], grants[h] + window). Outputs as
 * adakv_select_scored; the workspace is adakv_workspace_size()'s for this layer. */
int32_t adakv_select_granted(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens,
                             const float *pooled, const int32_t *grants, void *workspace,
                             size_t workspace_size, int32_t *keep_counts,
                             int32_t *keep_rows, int32_t *caps, int64_t *n_evicted);

/* CFFI-END */

#ifdef __cplusplus
}
#endif

#endif /* ADAKV_H */
