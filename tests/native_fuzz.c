/*
 * native_fuzz.c -- random shapes and configurations through the native policy library,
 * built with AddressSanitizer + UndefinedBehaviorSanitizer by tests/test_native_sanitizers.py.
 *
 * Every buffer is malloc'ed at exactly the size the API documents (workspace from
 * adakv_workspace_size, keep_rows of sum(lens), pooled of adakv_n_scored), so any read or
 * write past it is reported. Checks the documented invariants of every selection: counts
 * within the head's rows, rows ascending and in range, the window kept, caps >= counts,
 * n_evicted = rows dropped. Values are checked against the official algorithm elsewhere
 * (tests/test_policy_oracle.py, tests/test_policy_kvzip.py); this is about memory and UB on
 * every path. Also the reconstruction side: the running max of observations
 * (adakv_max_accumulate, exact-size obs/acc buffers) and the cross-layer allocation
 * (adakv_global_grants + adakv_select_granted over a whole random model: grants >= 0,
 * each head keeps min(grant, scored) + window).
 *
 * usage: native_fuzz [iterations] [seed]   (exit 0: all passed)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "adakv.h"

static uint64_t rng_state;

static uint32_t rnd(void) {
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(rng_state >> 33);
}

static int32_t rnd_in(int32_t lo, int32_t hi) { /* inclusive */
    return lo + (int32_t)(rnd() % (uint32_t)(hi - lo + 1));
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(3);
    }
    return p;
}

static int fail(int iter, const char *what, int32_t h) {
    fprintf(stderr, "iteration %d, head %d: %s\n", iter, (int)h, what);
    return 1;
}

/* Check one layer's selection outputs against the documented invariants. */
static int check_selection(int iter, const adakv_config *cfg, int32_t n_head_kv,
                           const int32_t *lens, const int32_t *counts, const int32_t *rows,
                           const int32_t *caps, int64_t evicted) {
    int bad = 0;
    int64_t total = 0, kept = 0;
    const int32_t *r = rows;
    for (int32_t h = 0; h < n_head_kv; h++) {
        const int32_t win = cfg->window < lens[h] ? cfg->window : lens[h];
        total += lens[h];
        if (counts[h] < 0 || counts[h] > lens[h]) bad |= fail(iter, "count out of range", h);
        if (caps[h] < counts[h]) bad |= fail(iter, "cap below count", h);
        for (int32_t i = 0; i < counts[h]; i++) {
            if (r[i] < 0 || r[i] >= lens[h]) bad |= fail(iter, "row out of range", h);
            if (i > 0 && r[i] <= r[i - 1]) bad |= fail(iter, "rows not ascending", h);
        }
        for (int32_t i = 0; i < win && counts[h] >= win; i++)
            if (r[counts[h] - win + i] != lens[h] - win + i)
                bad |= fail(iter, "window row missing", h);
        if (counts[h] < win) bad |= fail(iter, "fewer rows than the window", h);
        kept += counts[h];
        r += counts[h];
    }
    if (evicted != total - kept) bad |= fail(iter, "n_evicted != rows dropped", -1);
    return bad;
}

/* The reconstruction side: running max, then a whole model through the global policy. */
static int one_kvzip(int iter) {
    static const double alphas[] = {0.0, 0.2, 0.5, 1.0};
    adakv_config cfg;
    int32_t n_head_kv, g, n_layers, il, h, status, *lens, *obs_lens, *grants;
    int64_t total = 0, obs_total = 0, scored_all = 0;
    float *obs, *acc, *pooled;
    size_t ws_n;
    void *ws;
    int bad = 0;

    cfg.policy = ADAKV_POLICY_ADA_KVZIP_GLOBAL;
    cfg.window = rnd_in(0, 16);
    cfg.budget = cfg.window + rnd_in(cfg.window == 0 ? 1 : 0, 48);
    cfg.floor_alpha = alphas[rnd() % 4];
    cfg.pooling = rnd_in(0, 1);
    cfg.kernel = 2 * rnd_in(0, 4) + 1;
    cfg.gqa = rnd_in(0, 1);
    cfg.n_layers = n_layers = rnd_in(1, 6);
    cfg.beta = 20;
    cfg.n_sinks = 4;
    cfg.align = rnd_in(0, 1);
    if (adakv_check_config(&cfg) != ADAKV_OK) return fail(iter, "valid config refused", -1);
    n_head_kv = rnd_in(1, 5);
    g = rnd_in(1, 4);
    lens = xmalloc(sizeof *lens * (size_t)(n_layers * n_head_kv));
    obs_lens = xmalloc(sizeof *obs_lens * (size_t)(n_layers * n_head_kv));
    grants = xmalloc(sizeof *grants * (size_t)(n_layers * n_head_kv));
    for (il = 0; il < n_layers * n_head_kv; il++) {
        lens[il] = rnd() % 6 == 0 ? rnd_in(0, cfg.window + 1) : rnd_in(0, 4 * cfg.budget + 40);
        obs_lens[il] = lens[il] + rnd_in(0, 24);
        total += lens[il];
        obs_total += obs_lens[il];
        scored_all += lens[il] - (cfg.window < lens[il] ? cfg.window : lens[il]);
    }
    /* the running max over two observations of each layer, exact-size buffers */
    obs = xmalloc(sizeof *obs * (size_t)(g * obs_total));
    acc = xmalloc(sizeof *acc * (size_t)(g * total));
    for (int pass = 0; pass < 2; pass++) {
        int64_t oo = 0, ao = 0;
        for (int64_t i = 0; i < g * obs_total; i++) obs[i] = (float)(rnd() % 1000) / 999.0f;
        for (il = 0; il < n_layers; il++) {
            status = adakv_max_accumulate(n_head_kv, g, lens + il * n_head_kv,
                                          obs_lens + il * n_head_kv, obs + oo, pass == 0,
                                          acc + ao);
            if (status != ADAKV_OK) bad |= fail(iter, adakv_strerror(status), -1);
            for (h = 0; h < n_head_kv; h++) {
                oo += (int64_t)g * obs_lens[il * n_head_kv + h];
                ao += (int64_t)g * lens[il * n_head_kv + h];
            }
        }
    }
    /* score every layer into one model-wide pooled buffer, allocate, select */
    pooled = xmalloc(sizeof *pooled * (size_t)scored_all);
    ws_n = adakv_global_workspace_size(&cfg, n_head_kv, lens);
    if (ws_n == 0) return fail(iter, "global workspace size 0", -1);
    for (il = 0; il < n_layers; il++) {
        size_t n = adakv_workspace_size(&cfg, n_head_kv, lens + il * n_head_kv);
        if (n > ws_n) ws_n = n;
    }
    ws = xmalloc(ws_n);
    {
        int64_t ao = 0, po = 0;
        for (il = 0; il < n_layers; il++) {
            const int32_t *ln = lens + il * n_head_kv;
            status = adakv_score(&cfg, n_head_kv, g, 1, ln, acc + ao, ws, ws_n, pooled + po);
            if (status != ADAKV_OK) bad |= fail(iter, adakv_strerror(status), -1);
            for (h = 0; h < n_head_kv; h++) {
                ao += (int64_t)g * ln[h];
                po += ln[h] - (cfg.window < ln[h] ? cfg.window : ln[h]);
            }
        }
    }
    status = adakv_global_grants(&cfg, n_head_kv, lens, pooled, ws,
                                 adakv_global_workspace_size(&cfg, n_head_kv, lens), grants);
    if (status != ADAKV_OK) bad |= fail(iter, adakv_strerror(status), -1);
    if (adakv_select_layer(&cfg, 0, n_head_kv, g, 1, lens, acc, ws, ws_n, grants, grants,
                           grants, NULL) != ADAKV_ERR_GLOBAL)
        bad |= fail(iter, "one-layer selection of a global policy not refused", -1);
    if (status == ADAKV_OK) {
        int64_t po = 0;
        for (il = 0; il < n_layers && !bad; il++) {
            const int32_t *ln = lens + il * n_head_kv;
            int64_t layer_rows = 0, evicted = -1;
            int32_t *counts = xmalloc(sizeof *counts * (size_t)n_head_kv);
            int32_t *caps = xmalloc(sizeof *caps * (size_t)n_head_kv);
            int32_t *rows;
            for (h = 0; h < n_head_kv; h++) layer_rows += ln[h];
            rows = xmalloc(sizeof *rows * (size_t)layer_rows);
            for (h = 0; h < n_head_kv; h++)
                if (grants[il * n_head_kv + h] < 0) bad |= fail(iter, "negative grant", h);
            status = adakv_select_granted(&cfg, n_head_kv, ln, pooled + po,
                                          grants + il * n_head_kv, ws,
                                          adakv_workspace_size(&cfg, n_head_kv, ln), counts,
                                          rows, caps, &evicted);
            if (status != ADAKV_OK) {
                bad |= fail(iter, adakv_strerror(status), -1);
            } else {
                bad |= check_selection(iter, &cfg, n_head_kv, ln, counts, rows, caps, evicted);
                for (h = 0; h < n_head_kv; h++) {
                    const int32_t win = cfg.window < ln[h] ? cfg.window : ln[h];
                    const int32_t gr = grants[il * n_head_kv + h], n = ln[h] - win;
                    if (counts[h] != (gr < n ? gr : n) + win)
                        bad |= fail(iter, "kept != min(grant, scored) + window", h);
                }
            }
            for (h = 0; h < n_head_kv; h++)
                po += ln[h] - (cfg.window < ln[h] ? cfg.window : ln[h]);
            free(counts);
            free(caps);
            free(rows);
        }
    }
    free(lens);
    free(obs_lens);
    free(grants);
    free(obs);
    free(acc);
    free(pooled);
    free(ws);
    return bad;
}

static int one(int iter) {
    static const double alphas[] = {0.0, 0.2, 0.5, 1.0};
    adakv_config cfg;
    int32_t n_head_kv, g, n_obs, layer, h, i, status;
    int32_t *lens, *counts, *caps, *rows;
    int64_t total = 0, evicted = -1, n_scored;
    float *scores, *pooled;
    size_t ws_n, n_scores;
    void *ws;
    int bad = 0, ties = (int)(rnd() % 3 == 0);

    cfg.policy = rnd_in(0, 7); /* 8 (global) has its own path: one_kvzip */
    cfg.window = rnd_in(0, 16);
    cfg.budget = cfg.window + rnd_in(cfg.window == 0 ? 1 : 0, 64);
    cfg.floor_alpha = rnd() % 5 == 4 ? (double)(rnd() % 1000) / 999.0 : alphas[rnd() % 4];
    cfg.pooling = rnd_in(0, 1);
    cfg.kernel = 2 * rnd_in(0, 8) + 1;
    cfg.gqa = rnd_in(0, 1);
    cfg.n_layers = rnd_in(1, 8);
    cfg.beta = rnd_in(1, 20);
    cfg.n_sinks = rnd_in(0, 8);
    cfg.align = rnd_in(0, 1);
    if (adakv_check_config(&cfg) != ADAKV_OK) return fail(iter, "valid config refused", -1);

    n_head_kv = rnd_in(1, 6);
    g = rnd_in(1, 4);
    n_obs = rnd_in(1, 32);
    layer = rnd_in(0, cfg.n_layers - 1);
    lens = xmalloc(sizeof *lens * (size_t)n_head_kv);
    for (h = 0; h < n_head_kv; h++) {
        /* mostly longer than the budget, sometimes shorter than the window or empty */
        lens[h] = rnd() % 6 == 0 ? rnd_in(0, cfg.window + 1) : rnd_in(0, 4 * cfg.budget + 40);
        total += lens[h];
    }
    n_scores = (size_t)g * (size_t)total;
    scores = xmalloc(sizeof *scores * n_scores);
    for (i = 0; i < (int32_t)n_scores; i++)
        scores[i] = ties ? (float)(rnd() % 4) : (float)(rnd() % 100000) / 1000.0f;

    ws_n = adakv_workspace_size(&cfg, n_head_kv, lens);
    if (ws_n == 0) return fail(iter, "workspace size 0 for a valid shape", -1);
    ws = xmalloc(ws_n);
    counts = xmalloc(sizeof *counts * (size_t)n_head_kv);
    caps = xmalloc(sizeof *caps * (size_t)n_head_kv);
    rows = xmalloc(sizeof *rows * (size_t)total);

    /* the scorer alone, into a buffer of exactly adakv_n_scored() floats */
    n_scored = adakv_n_scored(&cfg, n_head_kv, lens);
    if (n_scored < 0) return fail(iter, "n_scored < 0", -1);
    pooled = xmalloc(sizeof *pooled * (size_t)n_scored);
    status = adakv_score(&cfg, n_head_kv, g, n_obs, lens, scores, ws, ws_n, pooled);
    if (status != ADAKV_OK) bad |= fail(iter, adakv_strerror(status), -1);

    status = adakv_select_layer(&cfg, layer, n_head_kv, g, n_obs, lens, scores, ws, ws_n,
                                counts, rows, caps, &evicted);
    if (status != ADAKV_OK)
        bad |= fail(iter, adakv_strerror(status), -1);
    else
        bad |= check_selection(iter, &cfg, n_head_kv, lens, counts, rows, caps, evicted);
    free(lens);
    free(scores);
    free(ws);
    free(counts);
    free(caps);
    free(rows);
    free(pooled);
    return bad;
}

int main(int argc, char **argv) {
    const int iters = argc > 1 ? atoi(argv[1]) : 2000;
    int it, failures = 0;
    rng_state = argc > 2 ? (uint64_t)strtoull(argv[2], NULL, 10) : 12345u;
    for (it = 0; it < iters && failures < 10; it++) failures += one(it) + one_kvzip(it);
    printf("native_fuzz: %d iterations, %d failures\n", it, failures);
    return failures ? 1 : 0;
}
