/* The cascade's per-box loops in C, called through ctypes (align/native.py).

   Each function does the float64 operations of its numpy twin in the same order, and is
   compiled without FMA contraction (setup.py), so that both give bitwise the same results:
   area_crops  = align/resample.py normalised_crops;
   nms_kept    = the greedy loop of align/boxes.py nms (its _overlap arithmetic).
   No Python API: the only Python symbol is the module init that the build tools expect. */
#include <stdint.h>
#include <stdlib.h>

/* numpy's minimum and maximum: a NaN on either side gives NaN */
static double minimum(double a, double b) { return (a < b || a != a) ? a : b; }
static double maximum(double a, double b) { return (a > b || a != a) ? a : b; }

/* Integral of the image at (y, x) for every y in ys, x in xs (n values each, pixel edges
   already clamped): sat is (h + 1, w + 1, c); writes f (n, n, c). */
static void integral_grid(const double *sat, int64_t w, int64_t c, int64_t n, const int64_t *iy,
                          const double *fy, const int64_t *ix, const double *fx, double *f)
{
    int64_t row = (w + 1) * c;
    for (int64_t p = 0; p < n; p++) {
        const double *r0 = sat + iy[p] * row, *r1 = r0 + row;
        for (int64_t q = 0; q < n; q++) {
            const double *a = r0 + ix[q] * c, *b = r1 + ix[q] * c;
            double *o = f + (p * n + q) * c;
            for (int64_t ch = 0; ch < c; ch++) {
                double top = a[ch], right = a[ch + c];
                right -= top; right *= fx[q]; top += right;        /* along x on row iy */
                double bottom = b[ch], right1 = b[ch + c];
                right1 -= bottom; right1 *= fx[q]; bottom += right1;   /* ... on row iy + 1 */
                bottom -= top; bottom *= fy[p]; top += bottom;
                o[ch] = top;
            }
        }
    }
}

/* Grid edges of one window along one axis: lo + (hi - lo) * i / size, clamped to [0, extent];
   index of the table row/column below each, and the fraction past it. */
static void grid_axis(double lo, double hi, int64_t size, int64_t extent, int64_t *idx, double *frac)
{
    for (int64_t i = 0; i <= size; i++) {
        double v = lo + (hi - lo) * ((double)i / (double)size);
        v = v < 0 ? 0 : (v > extent ? (double)extent : v);
        int64_t k = (int64_t)v;
        if (k > extent - 1)
            k = extent - 1;
        idx[i] = k;
        frac[i] = v - k;
    }
}

/* Each window (k rows left, top, right, bottom: pixel edges of the image whose summed-area
   table is sat, (h + 1, w + 1, c)) resampled to size x size by area averaging, zeros outside
   the image, then (v - mean) * scale; out is (k, size, size, c) float32.
   Returns 0, or -1 when memory ran out. */
int area_crops(const double *sat, int64_t h, int64_t w, int64_t c, const double *windows,
               int64_t k, int64_t size, double mean, double scale, float *out)
{
    int64_t n = size + 1;
    double *f = malloc(sizeof(double) * n * n * c);
    double *fx = malloc(sizeof(double) * n), *fy = malloc(sizeof(double) * n);
    int64_t *ix = malloc(sizeof(int64_t) * n), *iy = malloc(sizeof(int64_t) * n);
    int status = (f && fx && fy && ix && iy) ? 0 : -1;
    for (int64_t b = 0; b < k && status == 0; b++) {
        const double *win = windows + 4 * b;
        double left = win[0], top = win[1], right = win[2], bottom = win[3];
        grid_axis(top, bottom, size, h, iy, fy);
        grid_axis(left, right, size, w, ix, fx);
        integral_grid(sat, w, c, n, iy, fy, ix, fx, f);
        double cell = ((bottom - top) * (right - left)) / (double)(size * size);
        float *dst = out + b * size * size * c;
        for (int64_t p = 0; p < size; p++)
            for (int64_t q = 0; q < size; q++)
                for (int64_t ch = 0; ch < c; ch++) {
                    double v = f[((p + 1) * n + q + 1) * c + ch] - f[(p * n + q + 1) * c + ch]
                             - f[((p + 1) * n + q) * c + ch] + f[(p * n + q) * c + ch];
                    v /= cell;
                    v -= mean;
                    v *= scale;
                    *dst++ = (float)v;
                }
    }
    free(f); free(fx); free(fy); free(ix); free(iy);
    return status;
}

/* Greedy non-maximum suppression of n boxes b (rows x1, y1, x2, y2, inclusive area) already
   in the order they are taken: box k stays when its overlap with every box kept before it is
   <= threshold (a NaN overlap drops it). Overlap is intersection over union, or over the
   smaller area when use_min. Writes the kept rows' positions to kept; returns their number. */
int64_t nms_kept(const double *b, int64_t n, double threshold, int use_min, int64_t *kept)
{
    int64_t m = 0;
    for (int64_t k = 0; k < n; k++) {
        const double *c = b + 5 * k;
        int alive = 1;
        for (int64_t j = 0; j < m && alive; j++) {
            const double *r = b + 5 * kept[j];
            double w = maximum(0.0, minimum(r[2], c[2]) - maximum(r[0], c[0]) + 1);
            double h = maximum(0.0, minimum(r[3], c[3]) - maximum(r[1], c[1]) + 1);
            double inter = w * h;
            double overlap = use_min ? inter / minimum(r[4], c[4]) : inter / (r[4] + c[4] - inter);
            alive = overlap <= threshold;
        }
        if (alive)
            kept[m++] = k;
    }
    return m;
}

/* Build tools export this symbol from every extension; nothing imports the module. */
void *PyInit__native(void) { return NULL; }
