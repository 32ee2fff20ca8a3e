/* Exact multiple-choice knapsack (MCKP) for the AppMul selection; see selection.py.
 *
 * Problem: layer l (0..L-1) takes exactly one candidate j with cost c[l][j] >= 0 and value
 * v[l][j]; maximise sum v subject to sum c <= budget + 1e-12. Ties: among the assignments of
 * largest value the cheapest, among those the lexicographically smallest choice vector
 * (layer 0 first) - exact for sums that are exact in floating point (integer data), otherwise up
 * to the rounding of the sums.
 *
 * Algorithm (exact):
 *  1. Each layer keeps its Pareto points (increasing cost and value; a dominated candidate is
 *     never needed; among identical (cost, value) pairs the lowest index).
 *  2. LP relaxation (Sinha & Zemel 1979, "The multiple-choice knapsack problem", Oper. Res. 27):
 *     the LP optimum walks every layer's upper convex hull; taking all hull segments greedily by
 *     decreasing slope value/cost until the budget runs out gives the LP bound U and the critical
 *     slope lambda. Continuing the walk with the segments that still fit, then single-layer
 *     upgrades, gives a feasible incumbent I.
 *  3. Reduction by the Lagrangian bound with multiplier lambda (weak duality: any lambda >= 0
 *     bounds every assignment): fixing layer l to j, no assignment is worth more than
 *     lambda * budget + sum_i max_k (v_ik - lambda c_ik) - (max_k(...)_l - (v_lj - lambda c_lj)).
 *     For a target F every candidate whose bound is below F is dropped (Dudzinski & Walukiewicz
 *     1987, Eur. J. Oper. Res. 28, reduction of MCKP variables); layers left with one candidate
 *     are fixed.
 *  4. Dynamic programming over the remaining layers in layer order, on Pareto fronts of partial
 *     assignments (cost, value): a state is dropped when it is dominated, when it exceeds the
 *     budget, or when its value plus the LP bound of the layers still to come (each suffix's own
 *     slope-sorted hull segments, evaluated by binary search) is below F.
 *  5. F is lowered geometrically from just below U to the incumbent I: a run that ends with an
 *     assignment worth >= F has found the optimum (every assignment worth >= F survives all the
 *     tests above), a run that ends empty proves opt < F. The last run uses F = I - tol and
 *     cannot fail. Runs with F above the optimum are cheap because the bounds prune hard.
 *
 * Interface: solve(costs, values, budget) with costs/values sequences of 1-D C-contiguous
 * float64 buffers (numpy arrays). Returns (choice list, value, cost) or (None, code, info) on
 * bad input; selection.py turns the codes into typed errors and converts other inputs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { E_LAYERS = 1, E_SHAPE = 2, E_VALUE = 3, E_INFEASIBLE = 4, E_CONVERT = 5, E_INTERNAL = 6 };

#ifndef SCHEDULE_STEPS
#define SCHEDULE_STEPS 10 /* first target: U - (U - I) / 2^SCHEDULE_STEPS */
#endif

static struct {
    long runs, generated, kept, free_layers, candidates;
} stats;

typedef struct {
    int L;
    int *off;          /* L + 1 offsets into the Pareto arrays */
    double *c, *v;     /* Pareto points per layer: cost and value strictly increasing */
    int *idx;          /* their original candidate indices */
    double budget, limit;
} Prob;

typedef struct {
    double slope, dc, dv;
    int layer, from, to; /* layer, Pareto positions of the segment's ends */
} Seg;

static int seg_cmp(const void *a, const void *b)
{
    const Seg *x = a, *y = b;
    if (x->slope > y->slope) return -1;
    if (x->slope < y->slope) return 1;
    if (x->layer != y->layer) return x->layer - y->layer;
    return x->from - y->from;
}

/* upper hull of a chain of points (cost, value strictly increasing) given by positions pos[0..n);
 * writes the hull's positions to out, returns their number */
static int upper_hull(const double *c, const double *v, const int *pos, int n, int *out)
{
    int h = 0;
    for (int i = 0; i < n; i++) {
        int p = pos[i];
        while (h >= 2) {
            int a = out[h - 2], b = out[h - 1];
            if ((v[b] - v[a]) * (c[p] - c[b]) <= (v[p] - v[b]) * (c[b] - c[a]))
                h--; /* b is on or below the chord a -> p */
            else
                break;
        }
        out[h++] = p;
    }
    return h;
}

/* ---- growable workspace ------------------------------------------------------------------- */
typedef struct {
    void *p;
    size_t cap;
} Buf;

static void *grow(Buf *b, size_t bytes)
{
    if (bytes > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < bytes) cap *= 2;
        void *q = realloc(b->p, cap);
        if (!q) return NULL;
        b->p = q;
        b->cap = cap;
    }
    return b->p;
}

/* ---- one DP run at target F ---------------------------------------------------------------- */
typedef struct {
    /* reduction */
    int *cand;        /* positions (into the Pareto arrays) of each layer's surviving candidates */
    int *coff;        /* L + 1 */
    int *freel;       /* free layers in order */
    /* suffix bounds over the T free layers */
    double *base_c, *base_v; /* T + 1: the cheapest completion of the suffix t.. */
    double *cum_c, *cum_v, *slope; /* S + 1: the slope-sorted segments of one suffix, cumulated */
    int ncum, S;
    Seg *segs;
    int *hull;
    /* DP */
    Buf fc, fv, nc, nv, np_, nj, bp, bj, ch_c, ch_v, ch_s, head;
    int *bo;          /* T + 1 offsets into bp/bj */
} Work;

/* cumulate the segments of the free layers >= t (the suffix whose bound suffix_bound evaluates) */
static void build_suffix(Work *w, int t)
{
    double *cc = w->cum_c, *cv = w->cum_v, *sl = w->slope;
    int n = 0;
    cc[0] = cv[0] = sl[0] = 0;
    for (int i = 0; i < w->S; i++)
        if (w->segs[i].layer >= t) {
            cc[n + 1] = cc[n] + w->segs[i].dc;
            cv[n + 1] = cv[n] + w->segs[i].dv;
            sl[n + 1] = w->segs[i].slope;
            n++;
        }
    w->ncum = n;
}

/* LP bound of the free layers t.. (those build_suffix(w, t) cumulated) with room r: -inf if even
 * their cheapest choices do not fit */
static inline double suffix_bound(const Work *w, int t, double r)
{
    r -= w->base_c[t];
    if (r < 0) {
        if (r < -1e-12) return -INFINITY;
        r = 0;
    }
    const double *cc = w->cum_c, *cv = w->cum_v;
    int n = w->ncum;
    /* largest s in [0, n] with cc[s] <= r (cc[0] = 0) */
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (cc[mid] <= r) lo = mid;
        else hi = mid - 1;
    }
    double ub = w->base_v[t] + cv[lo];
    if (lo < n) ub += (r - cc[lo]) * w->slope[lo + 1];
    return ub;
}

/* is the partial choice of state s1 lexicographically smaller than that of s2 (both in the front
 * after free layer t - 1)? */
static int lex_less(Work *w, int t, int s1, int s2)
{
    const int *bp = w->bp.p, *bj = w->bj.p;
    int diff = 0; /* sign of the earliest difference seen so far (walking back) */
    for (int u = t - 1; u >= 0 && s1 != s2; u--) {
        int a = w->bo[u] + s1, b = w->bo[u] + s2;
        if (bj[a] != bj[b]) diff = bj[a] < bj[b] ? -1 : 1;
        s1 = bp[a];
        s2 = bp[b];
    }
    return diff < 0;
}

/* returns 1 and fills choice/val when an assignment worth >= F exists, 0 when opt < F, -1 on
 * allocation failure */
static int run(const Prob *P, Work *w, const double *rp, const double *mx, double ub0, double F, double tol,
               int *choice)
{
    int L = P->L;
    double thr = F - tol;
    stats.runs++;
    /* 3. reduction */
    int T = 0, nc_total = 0;
    double const_c = 0, const_v = 0;
    w->coff[0] = 0;
    for (int l = 0; l < L; l++) {
        int k = 0;
        for (int q = P->off[l]; q < P->off[l + 1]; q++)
            if (ub0 - (mx[l] - rp[q]) >= thr) w->cand[w->coff[l] + k++] = q;
        if (k == 0) return 0;
        w->coff[l + 1] = w->coff[l] + k;
        nc_total += k;
        if (k == 1) {
            const_c += P->c[w->cand[w->coff[l]]];
            const_v += P->v[w->cand[w->coff[l]]];
            choice[l] = P->idx[w->cand[w->coff[l]]];
        } else {
            w->freel[T++] = l;
        }
    }
    stats.free_layers = T;
    stats.candidates = nc_total;
    /* suffix LP bounds of the free layers */
    int S = 0;
    for (int t = 0; t < T; t++) {
        int l = w->freel[t];
        int k = w->coff[l + 1] - w->coff[l];
        int h = upper_hull(P->c, P->v, w->cand + w->coff[l], k, w->hull);
        for (int i = 0; i + 1 < h; i++) {
            Seg *s = &w->segs[S++];
            s->dc = P->c[w->hull[i + 1]] - P->c[w->hull[i]];
            s->dv = P->v[w->hull[i + 1]] - P->v[w->hull[i]];
            s->slope = s->dv / s->dc;
            s->layer = t;
            s->from = w->hull[i];
            s->to = w->hull[i + 1];
        }
    }
    qsort(w->segs, S, sizeof(Seg), seg_cmp);
    w->S = S;
    w->base_c[T] = 0;
    w->base_v[T] = 0;
    for (int t = T - 1; t >= 0; t--) {
        int q = w->cand[w->coff[w->freel[t]]];
        w->base_c[t] = w->base_c[t + 1] + P->c[q];
        w->base_v[t] = w->base_v[t + 1] + P->v[q];
    }
    /* 4. DP over the free layers */
    double limit = P->limit;
    build_suffix(w, 0);
    if (const_c > limit || const_v + suffix_bound(w, 0, limit - const_c) < thr) return 0;
    double *fc = grow(&w->fc, sizeof(double)), *fv = grow(&w->fv, sizeof(double));
    if (!fc || !fv) return -1;
    fc[0] = const_c;
    fv[0] = const_v;
    int F_n = 1;
    w->bo[0] = 0;
    for (int t = 0; t < T; t++) {
        int l = w->freel[t];
        const int *cq = w->cand + w->coff[l];
        int k = w->coff[l + 1] - w->coff[l];
        size_t cap = (size_t)k * F_n;
        double *chc = grow(&w->ch_c, cap * sizeof(double)), *chv = grow(&w->ch_v, cap * sizeof(double));
        int *chs = grow(&w->ch_s, cap * sizeof(int));
        int *head = grow(&w->head, 2 * (size_t)k * sizeof(int));
        if (!chc || !chv || !chs || !head) return -1;
        fc = w->fc.p;
        fv = w->fv.p;
        int *end = head + k;
        build_suffix(w, t + 1);
        for (int j = 0; j < k; j++) {
            double cj = P->c[cq[j]], vj = P->v[cq[j]];
            size_t o = (size_t)j * F_n, n = o;
            for (int s = 0; s < F_n; s++) {
                double tc = fc[s] + cj;
                if (tc > limit) break;
                double tv = fv[s] + vj;
                if (tv + suffix_bound(w, t + 1, limit - tc) < thr) continue;
                chc[n] = tc;
                chv[n] = tv;
                chs[n] = s;
                n++;
            }
            stats.generated += F_n;
            head[j] = (int)o;
            end[j] = (int)n;
        }
        /* merge the k cost-sorted runs by (cost asc, value desc, lexicographic), keep the front */
        double *nc = grow(&w->nc, cap * sizeof(double)), *nv = grow(&w->nv, cap * sizeof(double));
        int *ps = grow(&w->np_, cap * sizeof(int)), *pj = grow(&w->nj, cap * sizeof(int));
        if (!nc || !nv || !ps || !pj) return -1;
        int n_new = 0;
        double best_v = -INFINITY;
        for (;;) {
            int b = -1;
            for (int j = 0; j < k; j++) {
                if (head[j] >= end[j]) continue;
                if (b < 0) { b = j; continue; }
                int x = head[j], y = head[b];
                if (chc[x] < chc[y] || (chc[x] == chc[y] && (chv[x] > chv[y] ||
                    (chv[x] == chv[y] && (chs[x] == chs[y] ? P->idx[cq[j]] < P->idx[cq[b]]
                                                            : lex_less(w, t, chs[x], chs[y]))))))
                    b = j;
            }
            if (b < 0) break;
            int x = head[b]++;
            if (chv[x] > best_v) {
                best_v = chv[x];
                nc[n_new] = chc[x];
                nv[n_new] = chv[x];
                ps[n_new] = chs[x];
                pj[n_new] = b;
                n_new++;
            }
        }
        if (n_new == 0) return 0;
        stats.kept += n_new;
        int *bp = grow(&w->bp, (w->bo[t] + (size_t)n_new) * sizeof(int));
        int *bj = grow(&w->bj, (w->bo[t] + (size_t)n_new) * sizeof(int));
        fc = grow(&w->fc, n_new * sizeof(double));
        fv = grow(&w->fv, n_new * sizeof(double));
        if (!bp || !bj || !fc || !fv) return -1;
        for (int i = 0; i < n_new; i++) {
            bp[w->bo[t] + i] = ps[i];
            bj[w->bo[t] + i] = P->idx[cq[pj[i]]];
            fc[i] = nc[i];
            fv[i] = nv[i];
        }
        w->bo[t + 1] = w->bo[t] + n_new;
        F_n = n_new;
    }
    /* the last front member has the largest value (and the lowest cost for it) */
    int s = F_n - 1;
    if (fv[s] < F) return 0;
    const int *bp = w->bp.p, *bj = w->bj.p;
    for (int t = T - 1; t >= 0; t--) {
        choice[w->freel[t]] = bj[w->bo[t] + s];
        s = bp[w->bo[t] + s];
    }
    return 1;
}

static void work_free(Work *w)
{
    Buf *bufs[] = {&w->fc, &w->fv, &w->nc, &w->nv, &w->np_, &w->nj, &w->bp, &w->bj, &w->ch_c, &w->ch_v,
                   &w->ch_s, &w->head};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) free(bufs[i]->p);
}

/* ---- input ---------------------------------------------------------------------------------- */
/* 0: ok (data appended), E_CONVERT: not a contiguous float64 buffer, E_SHAPE: not 1-D */
static int read_layer(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        return E_CONVERT;
    }
    const char *f = view->format;
    int ok_fmt = view->itemsize == 8 && f &&
                 (strcmp(f, "d") == 0 || strcmp(f, "=d") == 0 || strcmp(f, "@d") == 0
#if PY_LITTLE_ENDIAN
                  || strcmp(f, "<d") == 0
#else
                  || strcmp(f, ">d") == 0
#endif
                 );
    if (!ok_fmt) {
        PyBuffer_Release(view);
        return E_CONVERT;
    }
    if (view->ndim != 1 || view->shape[0] < 1) {
        PyBuffer_Release(view);
        return E_SHAPE;
    }
    return 0;
}

static PyObject *fail(int code, double info)
{
    return Py_BuildValue("(Oid)", Py_None, code, info);
}

static PyObject *solve(PyObject *self, PyObject *args)
{
    PyObject *costs_o, *values_o;
    double budget;
    if (!PyArg_ParseTuple(args, "OOd", &costs_o, &values_o, &budget)) return NULL;
    PyObject *cs = PySequence_Fast(costs_o, ""), *vs = NULL;
    if (!cs) { PyErr_Clear(); return fail(E_LAYERS, -1); }
    vs = PySequence_Fast(values_o, "");
    if (!vs) { PyErr_Clear(); Py_DECREF(cs); return fail(E_LAYERS, -1); }
    Py_ssize_t L = PySequence_Fast_GET_SIZE(cs);
    PyObject *result = NULL;
    Prob P = {0};
    Work w = {0};
    double *raw_c = NULL, *raw_v = NULL, *rp = NULL, *mx = NULL;
    int *order = NULL, *pos = NULL, *choice = NULL, *roff = NULL;
    if (L < 1 || L != PySequence_Fast_GET_SIZE(vs) || L > 1000000) { result = fail(E_LAYERS, -1); goto done; }
    P.L = (int)L;
    P.budget = budget;
    P.limit = budget + 1e-12;
    /* read and validate; raw arrays hold all layers, P.off their offsets */
    P.off = malloc((L + 1) * sizeof(int));
    roff = malloc((L + 1) * sizeof(int));
    size_t cap = 0, n = 0;
    if (!P.off || !roff) goto nomem;
    roff[0] = 0;
    P.off[0] = 0;
    for (Py_ssize_t l = 0; l < L; l++) {
        Py_buffer bc, bv;
        int e = read_layer(PySequence_Fast_GET_ITEM(cs, l), &bc);
        if (e) { result = fail(e, (double)l); goto done; }
        e = read_layer(PySequence_Fast_GET_ITEM(vs, l), &bv);
        if (e) { PyBuffer_Release(&bc); result = fail(e, (double)l); goto done; }
        Py_ssize_t k = bc.shape[0];
        if (bv.shape[0] != k) {
            PyBuffer_Release(&bc);
            PyBuffer_Release(&bv);
            result = fail(E_SHAPE, (double)l);
            goto done;
        }
        if (n + k > cap) {
            size_t nc = cap ? cap : 256;
            while (nc < n + k) nc *= 2;
            double *a = realloc(raw_c, nc * sizeof(double)), *b;
            if (a) raw_c = a;
            b = realloc(raw_v, nc * sizeof(double));
            if (b) raw_v = b;
            if (!a || !b) { PyBuffer_Release(&bc); PyBuffer_Release(&bv); goto nomem; }
            cap = nc;
        }
        memcpy(raw_c + n, bc.buf, k * sizeof(double));
        memcpy(raw_v + n, bv.buf, k * sizeof(double));
        PyBuffer_Release(&bc);
        PyBuffer_Release(&bv);
        for (Py_ssize_t j = 0; j < k; j++) {
            double c = raw_c[n + j], v = raw_v[n + j];
            if (!(c >= 0) || !isfinite(c) || !isfinite(v)) { result = fail(E_VALUE, (double)l); goto done; }
        }
        n += k;
        P.off[l + 1] = roff[l + 1] = (int)n;
    }
    /* 1. Pareto points per layer */
    P.c = malloc(n * sizeof(double));
    P.v = malloc(n * sizeof(double));
    P.idx = malloc(n * sizeof(int));
    order = malloc(n * sizeof(int));
    pos = malloc(L * sizeof(int));
    choice = malloc(L * sizeof(int));
    rp = malloc(n * sizeof(double));
    mx = malloc(L * sizeof(double));
    if (!P.c || !P.v || !P.idx || !order || !pos || !choice || !rp || !mx) goto nomem;
    {
        int m = 0;
        double cheapest = 0;
        for (int l = 0; l < L; l++) {
            int a = roff[l], k = roff[l + 1] - a;
            int *o = order + a;
            const double *c = raw_c + a, *v = raw_v + a;
            for (int i = 0; i < k; i++) { /* insertion sort by (cost asc, value desc, index asc) */
                int j = i;
                while (j > 0 && (c[o[j - 1]] > c[i] || (c[o[j - 1]] == c[i] && v[o[j - 1]] < v[i]))) {
                    o[j] = o[j - 1];
                    j--;
                }
                o[j] = i;
            }
            int start = m;
            for (int i = 0; i < k; i++)
                if (m == start || v[o[i]] > P.v[m - 1]) {
                    P.c[m] = c[o[i]];
                    P.v[m] = v[o[i]];
                    P.idx[m] = o[i];
                    m++;
                }
            P.off[l] = start;
            cheapest += P.c[start];
        }
        P.off[L] = m;
        if (cheapest > budget) { result = fail(E_INFEASIBLE, cheapest); goto done; }
    }
    /* 2. LP walk over all hulls: bound, critical slope, greedy incumbent */
    int N = P.off[L];
    w.segs = malloc(N * sizeof(Seg));
    w.hull = malloc(N * sizeof(int));
    w.cand = malloc(N * sizeof(int));
    w.coff = malloc((L + 1) * sizeof(int));
    w.freel = malloc(L * sizeof(int));
    w.base_c = malloc((L + 1) * sizeof(double));
    w.base_v = malloc((L + 1) * sizeof(double));
    w.bo = malloc((L + 1) * sizeof(int));
    w.cum_c = malloc((N + 1) * sizeof(double));
    w.cum_v = malloc((N + 1) * sizeof(double));
    w.slope = malloc((N + 1) * sizeof(double));
    if (!w.segs || !w.hull || !w.cand || !w.coff || !w.freel || !w.base_c || !w.base_v || !w.bo ||
        !w.cum_c || !w.cum_v || !w.slope)
        goto nomem;
    int S = 0;
    double room = budget, val = 0;
    for (int l = 0; l < L; l++) {
        int k = P.off[l + 1] - P.off[l];
        for (int i = 0; i < k; i++) order[i] = P.off[l] + i;
        int h = upper_hull(P.c, P.v, order, k, w.hull);
        for (int i = 0; i + 1 < h; i++) {
            Seg *s = &w.segs[S++];
            s->dc = P.c[w.hull[i + 1]] - P.c[w.hull[i]];
            s->dv = P.v[w.hull[i + 1]] - P.v[w.hull[i]];
            s->slope = s->dv / s->dc;
            s->layer = l;
            s->from = w.hull[i];
            s->to = w.hull[i + 1];
        }
        pos[l] = P.off[l];
        room -= P.c[P.off[l]];
        val += P.v[P.off[l]];
    }
    qsort(w.segs, S, sizeof(Seg), seg_cmp);
    double lambda = 0, U;
    int crit = S;
    for (int i = 0; i < S; i++) {
        Seg *s = &w.segs[i];
        if (s->dc <= room) {
            room -= s->dc;
            val += s->dv;
            pos[s->layer] = s->to;
        } else {
            crit = i;
            break;
        }
    }
    if (room < 0) room = 0;
    if (crit < S) {
        lambda = w.segs[crit].slope;
        U = val + room * lambda;
    } else {
        U = val;
    }
    /* greedy completion: the remaining segments that still fit, in slope order */
    for (int i = crit; i < S; i++) {
        Seg *s = &w.segs[i];
        if (pos[s->layer] == s->from && s->dc <= room) {
            room -= s->dc;
            pos[s->layer] = s->to;
        }
    }
    /* single-layer upgrades to any Pareto point that fits, best gain first */
    for (int it = 0; it < 4 * L; it++) {
        int bl = -1, bq = -1;
        double bg = 0;
        for (int l = 0; l < L; l++)
            for (int q = pos[l] + 1; q < P.off[l + 1]; q++) {
                if (P.c[q] - P.c[pos[l]] > room) break;
                double g = P.v[q] - P.v[pos[l]];
                if (g > bg) { bg = g; bl = l; bq = q; }
            }
        if (bl < 0) break;
        room -= P.c[bq] - P.c[pos[bl]];
        pos[bl] = bq;
    }
    double inc_c = 0, inc_v = 0;
    for (int l = 0; l < L; l++) {
        inc_c += P.c[pos[l]];
        inc_v += P.v[pos[l]];
    }
    if (inc_c > P.limit) { /* rounding pushed the greedy walk over: fall back to the cheapest */
        inc_v = 0;
        for (int l = 0; l < L; l++) inc_v += P.v[P.off[l]];
    }
    /* 3. Lagrangian reduced values */
    double ub0 = isfinite(budget) ? lambda * budget : 0;
    for (int l = 0; l < L; l++) {
        double m = -INFINITY;
        for (int q = P.off[l]; q < P.off[l + 1]; q++) {
            rp[q] = P.v[q] - lambda * P.c[q];
            if (rp[q] > m) m = rp[q];
        }
        mx[l] = m;
        ub0 += m;
    }
    if (U > ub0) ub0 = U;
    double tol = 1e-9 * (fabs(ub0) + fabs(inc_v) + 1.0);
    /* 5. targets from just below the bound down to the incumbent */
    double gap = ub0 - inc_v;
    int found = 0;
    memset(&stats, 0, sizeof(stats));
    for (int step = SCHEDULE_STEPS; step >= 0 && !found; step--) {
        double F = step == 0 ? inc_v - tol : ub0 - ldexp(gap, -step);
        if (step > 0 && !(F > inc_v)) continue;
        int r = run(&P, &w, rp, mx, ub0, F, tol, choice);
        if (r < 0) goto nomem;
        found = r;
    }
    if (!found) { result = fail(E_INTERNAL, 0); goto done; }
    {
        /* totals in layer order from the caller's data (raw arrays at their original offsets) */
        double tc = 0, tv = 0;
        PyObject *lst = PyList_New(L);
        if (!lst) goto done;
        for (int l = 0; l < L; l++) {
            PyObject *x = PyLong_FromLong(choice[l]);
            if (!x) { Py_DECREF(lst); goto done; }
            PyList_SET_ITEM(lst, l, x);
            tc += raw_c[roff[l] + choice[l]];
            tv += raw_v[roff[l] + choice[l]];
        }
        result = Py_BuildValue("(Ndd)", lst, tv, tc);
    }
    goto done;
nomem:
    PyErr_NoMemory();
    result = NULL;
done:
    Py_DECREF(cs);
    Py_DECREF(vs);
    free(P.off);
    free(P.c);
    free(P.v);
    free(P.idx);
    free(raw_c);
    free(raw_v);
    free(rp);
    free(mx);
    free(order);
    free(pos);
    free(choice);
    free(roff);
    free(w.segs);
    free(w.hull);
    free(w.cand);
    free(w.coff);
    free(w.freel);
    free(w.base_c);
    free(w.base_v);
    free(w.bo);
    free(w.cum_c);
    free(w.cum_v);
    free(w.slope);
    work_free(&w);
    return result;
}

static PyObject *last_stats(PyObject *self, PyObject *noargs)
{
    return Py_BuildValue("{s:l,s:l,s:l,s:l,s:l}", "runs", stats.runs, "generated", stats.generated, "kept",
                         stats.kept, "free_layers", stats.free_layers, "candidates", stats.candidates);
}

static PyMethodDef methods[] = {
    {"solve", solve, METH_VARARGS, "solve(costs, values, budget) -> (choice, value, cost) or (None, code, info)"},
    {"last_stats", last_stats, METH_NOARGS, "counters of the last solve: DP runs, generated and kept states"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mckp", "Exact multiple-choice knapsack (see selection.py).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__mckp(void) { return PyModule_Create(&module); }
