/*
 * native_fuzz.c -- random shapes and configurations through the native policy library,
 * built with AddressSanitizer + UndefinedBehaviorSanitizer by tests/test_native_sanitizers.py.
 *
 * Every buffer is malloc'ed at exactly the size the API documents (workspace from
 * adakv_workspace_size, keep_rows of sum(lens), pooled of adakv_n_scored), so any read or
 * write past it is reported. Checks the documented invariants of every selection: counts
 * within the head's rows, rows ascending and in range, the window kept, caps >= counts,
 * n_evicted = rows dropped. Values are checked against the official algorithm elsewhere
 * (tests/test_policy_oracle.py); this is about memory and UB on every path.
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

static int one(int iter) {
    static const double alphas[] = {0.0, 0.2, 0.5, 1.0};
    adakv_config cfg;
    int32_t n_head_kv, g, n_obs, layer, h, i, status;
    int32_t *lens, *counts, *caps, *rows;
    int64_t total = 0, kept = 0, evicted = -1, n_scored;
    float *scores, *pooled;
    size_t ws_n, n_scores;
    void *ws;
    int bad = 0, ties = (int)(rnd() % 3 == 0);

    cfg.policy = rnd_in(0, 5);
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
    if (status != ADAKV_OK) {
        bad |= fail(iter, adakv_strerror(status), -1);
    } else {
        const int32_t *r = rows;
        for (h = 0; h < n_head_kv; h++) {
            const int32_t win = cfg.window < lens[h] ? cfg.window : lens[h];
            if (counts[h] < 0 || counts[h] > lens[h]) bad |= fail(iter, "count out of range", h);
            if (caps[h] < counts[h]) bad |= fail(iter, "cap below count", h);
            for (i = 0; i < counts[h]; i++) {
                if (r[i] < 0 || r[i] >= lens[h]) bad |= fail(iter, "row out of range", h);
                if (i > 0 && r[i] <= r[i - 1]) bad |= fail(iter, "rows not ascending", h);
            }
            /* the window (the last `win` rows) is always kept, at the end */
            for (i = 0; i < win && counts[h] >= win; i++)
                if (r[counts[h] - win + i] != lens[h] - win + i)
                    bad |= fail(iter, "window row missing", h);
            if (counts[h] < win) bad |= fail(iter, "fewer rows than the window", h);
            kept += counts[h];
            r += counts[h];
        }
        if (evicted != total - kept) bad |= fail(iter, "n_evicted != rows dropped", -1);
    }
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
    for (it = 0; it < iters && failures < 10; it++) failures += one(it);
    printf("native_fuzz: %d iterations, %d failures\n", it, failures);
    return failures ? 1 : 0;
}
