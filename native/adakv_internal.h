/*
 * adakv_internal.h -- helpers shared by the C files of native/ (not part of the API).
 */
#ifndef ADAKV_INTERNAL_H
#define ADAKV_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "adakv.h"

/* Largest total of rows accepted for one layer (row indices are int32). */
#define ADAKV_MAX_ROWS ((int64_t)INT32_MAX)

/* Workspace regions are aligned to this many bytes. */
#define ADAKV_ALIGN ((size_t)64)

/* Window rows of a head of length len: min(window, len). */
static inline int32_t adakv__win(const adakv_config *cfg, int32_t len) {
    return len < cfg->window ? len : cfg->window;
}

/* Order-preserving map float -> uint32: a < b (as floats, no NaN) <=> key(a) < key(b);
 * -0.0 and +0.0 map to the same key, as they compare equal. */
static inline uint32_t adakv__key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Round half to even (torch.round) of a non-negative float below 2^31. */
static inline int32_t adakv__round_half_even(float v) {
    int32_t i = (int32_t)v; /* truncation == floor for v >= 0 */
    float frac = v - (float)i;
    if (frac > 0.5f || (frac == 0.5f && (i & 1))) i += 1;
    return i;
}

/* Policies whose scores are read (all but full and streaming). */
static inline int adakv__needs_scores(int32_t policy) {
    return policy != ADAKV_POLICY_FULL && policy != ADAKV_POLICY_STREAMING;
}

/* Policies with the Ada-KV allocation inside one layer. */
static inline int adakv__is_ada(int32_t policy) {
    return policy == ADAKV_POLICY_ADA_SNAPKV || policy == ADAKV_POLICY_ADA_PYRAMID ||
           policy == ADAKV_POLICY_ADA_KVZIP;
}

/* Policies with the reconstruction (max) scorer. */
static inline int adakv__is_kvzip(int32_t policy) {
    return policy == ADAKV_POLICY_KVZIP || policy == ADAKV_POLICY_ADA_KVZIP ||
           policy == ADAKV_POLICY_ADA_KVZIP_GLOBAL;
}

/* Validate the shape of a layer (cfg assumed valid). Returns a status code and,
 * through total_rows / total_scored / max_scored (each may be NULL), the sums. */
int32_t adakv__check_shape(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens,
                           int64_t *total_rows, int64_t *total_scored, int32_t *max_scored);

/* Bytes of one workspace region holding n 32-bit values, rounded up to ADAKV_ALIGN. */
size_t adakv__region(int64_t n);

/* Bytes of workspace for n_head_kv heads with `scored` scored rows in all. */
size_t adakv__ws_bytes(int32_t n_head_kv, int64_t scored);

/* The regions of a workspace (see adakv_workspace_size), `scored` u32 each unless said:
 * 0: keys, 1: radix histogram (ADAKV_HIST u32), 2: radix scratch (also the scorer's
 * aggregate before pooling), 3: candidate indices, 4: candidate keys,
 * 5: per-head ranges (2 * n_head_kv u32). */
void *adakv__ws_region(void *workspace, int32_t n_head_kv, int64_t scored, int which);

/* Scorer core (score.c): pooled scores of every head to `pooled` (floats) or, when
 * pooled is NULL, to `keys`; tmp, t1, t2 each hold the longest head's scored rows. */
int32_t adakv__score_heads(const adakv_config *cfg, int32_t n_head_kv, int32_t n_q_per_kv,
                           int32_t n_obs, const int32_t *lens, const float *scores,
                           float *tmp, float *t1, float *t2, float *pooled, uint32_t *keys);

/* --- select.c: exact top-k on keys ------------------------------------------------- */

/* First-level radix histogram: ADAKV_HIST buckets over the top 11 bits of a key. */
#define ADAKV_HIST 2048
#define ADAKV_HIST_SHIFT 21

/* hist = first-level histogram of keys[0], keys[stride], keys[2*stride], ... */
void adakv__hist(const uint32_t *keys, size_t n, size_t stride, uint32_t *hist);

/* A key bound LB such that (very likely, by sampling) at least k keys are >= LB. */
uint32_t adakv__lower_bound(const uint32_t *keys, size_t n, size_t k, uint32_t *hist);

/* A key bound LB such that certainly at least k keys are >= LB (full histogram). */
uint32_t adakv__exact_bound(const uint32_t *keys, size_t n, size_t k, uint32_t *hist);

/* Write base + i, ascending, for every keys[i] >= lb; returns how many (out: room for n). */
size_t adakv__collect(const uint32_t *keys, size_t n, uint32_t lb, uint32_t base,
                      uint32_t *out);

/* k-th largest key among keys[0..n), 1 <= k <= n (radix select, 11/11/10 bits).
 * *n_above receives the number of keys strictly greater. scratch: room for n keys. */
uint32_t adakv__kth_largest(const uint32_t *keys, size_t n, size_t k, uint32_t *hist,
                            uint32_t *scratch, size_t *n_above);

/* Among candidates cand[0..c) (ascending indices, keys cand_keys[]) that include the top
 * k, write the top k (ties: lower index) as cand[i] - base, ascending, to out.
 * Returns min(k, c). scratch: room for c keys. */
size_t adakv__top_among(const uint32_t *cand, const uint32_t *cand_keys, size_t c, size_t k,
                        uint32_t base, uint32_t *hist, uint32_t *scratch, int32_t *out);

/* Indices (ascending) of the top k of keys[0..n), ties broken by lower index.
 * Returns min(k, n). cand, cand_keys, scratch: room for n each. */
size_t adakv__top_rows(const uint32_t *keys, size_t n, size_t k, uint32_t *hist,
                       uint32_t *cand, uint32_t *cand_keys, uint32_t *scratch, int32_t *out);

/* --- alloc.c: per-head budgets ----------------------------------------------------- */

/* Ada-KV counts: how many of the top k keys over all heads of the layer fall in each
 * head (ties: lower head, then lower row). keys holds the scored rows of every head,
 * packed in head order (head h has lens[h] - min(window, lens[h]) of them);
 * 0 < k < their total. Writes counts[h]. Leaves in cand (ascending) the indices of the
 * layer's candidate keys -- all keys >= some bound, a superset of the top k -- with
 * their keys in cand_keys; head h's candidates are cand[range[2h] .. range[2h+1]).
 * cand, cand_keys, scratch: room for all keys. */
void adakv__ada_counts(const adakv_config *cfg, int32_t n_head_kv, const int32_t *lens,
                       const uint32_t *keys, size_t total, size_t k, uint32_t *hist,
                       uint32_t *cand, uint32_t *cand_keys, uint32_t *scratch,
                       int32_t *counts, uint32_t *range);

/* Ada-KV safeguard blend of the official code:
 * cap = torch.round(count * (1 - alpha) + int(alpha * B')), in float32. */
int32_t adakv__ada_cap(int32_t count, double alpha, int32_t layer_budget);

#endif /* ADAKV_INTERNAL_H */
