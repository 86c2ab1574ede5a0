/*
 * score_max.c -- the context-reconstruction (KVzip-style) scorer's input: maxima of
 * attention over scoring queries, combined over observations.
 *
 * Query-agnostic scoring (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression
 * with Context Reconstruction"): after a text is prefilled, the model is teacher-forced
 * to repeat it ("Repeat the previous context exactly." + the text, in chunks); a row's
 * importance is the largest softmax attention any of those reconstruction queries gives
 * it. The runtime observes one chunk at a time (llama_ragged_observe_max: per query
 * head, the max over the chunk's queries, over every row held -- the text's and the
 * chunk's own); this file folds each observation into a running maximum over the rows
 * that were held before the chunk was appended (its rows come first in every head,
 * positions ascending), so that the chunk rows can be removed and the next chunk
 * observed. The max over the query heads of a GQA group and the pooling are the
 * scorer's (score.c, kvzip policies); the allocators are the usual ones, or the
 * cross-layer one (global.c).
 *
 * Max is exact in float32, so the running maximum equals numpy's np.maximum.reduce
 * over the observations bit for bit.
 */
#include "adakv_internal.h"

#define ADAKV_BLK 16

/* 1 if one of x[0..n) is a NaN or an infinity (by its exponent bits). */
static int adakv__any_nonfinite(const float *x, size_t n) {
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
    }
    return bad != 0;
}

/* d[i] = max(d[i], s[i]) for i < n; NaN never reaches here (checked before). */
static void adakv__max_into(float *restrict d, const float *restrict s, size_t n) {
    size_t i = 0;
    for (; i + ADAKV_BLK <= n; i += ADAKV_BLK)
        for (int j = 0; j < ADAKV_BLK; j++) d[i + j] = s[i + j] > d[i + j] ? s[i + j] : d[i + j];
    for (; i < n; i++) d[i] = s[i] > d[i] ? s[i] : d[i];
}

int32_t adakv_max_accumulate(int32_t n_head_kv, int32_t n_q_per_kv, const int32_t *lens,
                             const int32_t *obs_lens, const float *obs, int32_t init,
                             float *acc) {
    int64_t total = 0, obs_total = 0;
    size_t in_off = 0, out_off = 0;
    if (n_head_kv < 1) return ADAKV_ERR_N_HEAD_KV;
    if (n_q_per_kv < 1) return ADAKV_ERR_N_Q_PER_KV;
    if (!lens || !obs_lens || !obs || !acc) return ADAKV_ERR_NULL;
    for (int32_t h = 0; h < n_head_kv; h++) {
        if (lens[h] < 0 || obs_lens[h] < lens[h]) return ADAKV_ERR_LENS;
        total += lens[h];
        obs_total += obs_lens[h];
        if (obs_total * n_q_per_kv > ADAKV_MAX_ROWS) return ADAKV_ERR_LENS;
    }
    (void)total;
    /* validate every value read first, so that a failure changes nothing */
    for (int32_t h = 0; h < n_head_kv; h++) {
        for (int32_t g = 0; g < n_q_per_kv; g++)
            if (adakv__any_nonfinite(obs + in_off + (size_t)g * (size_t)obs_lens[h],
                                     (size_t)lens[h]))
                return ADAKV_ERR_SCORES;
        in_off += (size_t)n_q_per_kv * (size_t)obs_lens[h];
    }
    in_off = 0;
    for (int32_t h = 0; h < n_head_kv; h++) {
        for (int32_t g = 0; g < n_q_per_kv; g++) {
            const float *s = obs + in_off + (size_t)g * (size_t)obs_lens[h];
            float *d = acc + out_off + (size_t)g * (size_t)lens[h];
            if (init)
                memcpy(d, s, sizeof *d * (size_t)lens[h]);
            else
                adakv__max_into(d, s, (size_t)lens[h]);
        }
        in_off += (size_t)n_q_per_kv * (size_t)obs_lens[h];
        out_off += (size_t)n_q_per_kv * (size_t)lens[h];
    }
    return ADAKV_OK;
}
