/* engine.c: a small llama inference engine on a GGUF v3 file, which writes a lockstep dump
 * (docs/format.md) of its intermediate tensors under its own tag names.
 *
 * Tensors may be F32, F16, Q8_0 or Q4_1 (ggml's block formats, 32 weights a block); the
 * quantized ones are dequantized to float32 once, at load time, and every matmul runs in
 * float32. Q8_0: an fp16 scale d, then 32 int8 q, w = d * q. Q4_1: fp16 d, fp16 m, then 16
 * bytes, the low nibble of byte j is weight j, the high one weight j + 16, w = d * q + m.
 *
 *   cc -O2 -std=c99 -Wall -Wextra -o engine engine.c -lm
 *   engine MODEL.gguf --tokens 1,2,3 --decode 4 --dump DIR [--force 5,6,7] [--f16]
 *          [--stats-over N] [--bug NAME] [--abort-after K] [--probs]
 *
 * Prefill runs every prompt position at once (step 0), then one token per decode step with a
 * KV cache; the token fed at decode step i is the engine's own greedy choice, or the i-th of
 * --force (teacher forcing). The chosen token ids are printed on stdout, space-separated.
 *
 * The q and k projections in a llama GGUF have their rows permuted per head (llama.cpp's
 * converter), so RoPE rotates adjacent pairs (x[2i], x[2i+1]), as llama.cpp does for LLAMA.
 *
 * Tags, per step: tok_ids, tok_embd, then per layer N: LN.attn_in, LN.xq, LN.xk, LN.xv
 * (flat [tokens, features]), LN.xq_rope, LN.xk_rope (heads first [heads, tokens, head_dim],
 * in the GGUF's permuted row order), LN.att, LN.att_o, LN.h, LN.ffn_in, LN.ffn_hid,
 * LN.ffn_out, LN.out; then final_norm and logits, for the last position only ([1, n]).
 *
 * --hparams-meta: the header meta also says n_heads, n_kv_heads and head_dim.
 * --probs: each layer's attention probabilities too, LN.att_p after LN.att, heads first
 * [heads, tokens, keys] over every position so far (0 where a query does not attend).
 * C_LLAMA_VERBOSE set in the environment: each tensor's name, type and shape on stderr.
 * --f16: activations stored as float16.  --stats-over N: tensors of more than N elements are
 * written as stats-only records.  --abort-after K: abort() after the K-th tensor record.
 *
 * --bug NAME, one mistake engine authors make:
 *   rope_neox           rotate (x[i], x[i + d/2]) on the permuted weights
 *   norm_block16        the attention RMSNorm over 16-element blocks, not the whole row
 *   kv_stale            decode attends to positions 0..p-1, missing the key just written
 *   gqa_map             query head h reads kv head h % n_kv instead of h / (n_head / n_kv)
 *   transposed_lm_head  the output GEMM reads output.weight as [hidden][vocab]
 *   swap_gate_up        silu(up) * gate instead of silu(gate) * up
 *   no_causal_mask      the prefill attends to later positions too
 *   decode_pos          decode steps run RoPE at position p - 1 (the count before the append)
 *   q4_interleaved      Q4_1 nibbles read in storage order (weight 2j = low nibble of byte
 *                       j, 2j + 1 = its high nibble), not low half then high half
 *   q4_no_min           Q4_1 dequantized as d * q, its block minimum m dropped
 *   softmax_no_norm     attention weights exp(s - max), never divided by their sum
 *   rope_off            no RoPE: q and k keep their projected values
 *   zero_v              the V projection's weights read as zeros
 *   skip_layer          layer 1 (layer 0 in a 1-layer model) returns its input
 *   stuck               every decode step after the first recomputes the first one (its
 *                       token at its position): the same hidden states and logits
 *   kv_pos0             decode steps attend to the KV cache of position 0 only
 *   nan_at              layer 1 (0 in a 1-layer model) puts a NaN in its MLP activation
 *                       (the last position's first element)
 *   explode             layer 1 (0 in a 1-layer model) adds its MLP residual 1000 times
 *   zero_q              the Q projection's weights read as zeros (uniform attention)
 *   embd_first          every position reads the first token's embedding row
 *   rms_eps             every RMSNorm adds a hard-coded epsilon, 1e-6 (1e-5 where the
 *                       GGUF's is 1e-6), not the GGUF's layer_norm_rms_epsilon
 *
 * The header meta says "quantization" (the type of the quantized weights, e.g. "Q4_1") when
 * the GGUF holds quantized weights, as engines on quantized checkpoints declare it; every
 * weight is dequantized to float32 at load, so the engine computes in float32 all the same.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ------------------------------------------------------------------ utilities */

static void die(const char *msg, const char *arg) {
    fprintf(stderr, "engine: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
    exit(1);
}

static void *xmalloc(size_t n) {
    void *p = calloc(n ? n : 1, 1);
    if (!p) die("out of memory", NULL);
    return p;
}

/* ------------------------------------------------------------------ GGUF reader */

static float from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        float f = ldexpf((float)m, -24);
        return sign ? -f : f;
    }
    if (e == 31) u = sign | 0x7f800000u | (m << 13);
    else u = sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ggml tensor types read here, and the bugs that touch dequantization (see BUGS below) */
enum { G_F32 = 0, G_F16 = 1, G_Q4_1 = 3, G_Q8_0 = 8 };
enum { QK = 32, Q8_0_BYTES = 2 + 32, Q4_1_BYTES = 2 + 2 + 16 };
static int bug_q4_interleaved = 0, bug_q4_no_min = 0;

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* bytes of n elements of ggml type t (n a multiple of the block size); 0: not read here */
static uint64_t type_bytes(uint32_t t, uint64_t n) {
    switch (t) {
    case G_F32: return n * 4;
    case G_F16: return n * 2;
    case G_Q8_0: return n / QK * Q8_0_BYTES;
    case G_Q4_1: return n / QK * Q4_1_BYTES;
    default: return 0;
    }
}

static const char *type_name(uint32_t t) {
    switch (t) {
    case G_F32: return "F32";
    case G_F16: return "F16";
    case G_Q8_0: return "Q8_0";
    case G_Q4_1: return "Q4_1";
    default: return "?";
    }
}

/* n elements of type t at src (any alignment), as float32 into y */
static void dequantize(float *y, const uint8_t *src, uint32_t t, uint64_t n) {
    if (t == G_F16) {
        for (uint64_t i = 0; i < n; i++) y[i] = from_f16(le16(src + 2 * i));
        return;
    }
    for (uint64_t b = 0; b < n / QK; b++, y += QK) {
        if (t == G_Q8_0) {
            const uint8_t *blk = src + b * Q8_0_BYTES;
            float d = from_f16(le16(blk));
            for (int j = 0; j < QK; j++) y[j] = d * (float)(int8_t)blk[2 + j];
        } else { /* G_Q4_1 */
            const uint8_t *blk = src + b * Q4_1_BYTES;
            float d = from_f16(le16(blk)), m = bug_q4_no_min ? 0.0f : from_f16(le16(blk + 2));
            for (int j = 0; j < QK / 2; j++) {
                int lo = blk[4 + j] & 0x0f, hi = blk[4 + j] >> 4;
                int at_lo = bug_q4_interleaved ? 2 * j : j;
                int at_hi = bug_q4_interleaved ? 2 * j + 1 : j + QK / 2;
                /* the product rounded on its own (no fused multiply-add), as gguf.quants does */
                float plo = d * (float)lo, phi = d * (float)hi;
                y[at_lo] = plo + m;
                y[at_hi] = phi + m;
            }
        }
    }
}

enum { T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64,
       T_F64 };

typedef struct {
    const uint8_t *p, *end;
} cursor;

static void need(cursor *c, size_t n) {
    if ((size_t)(c->end - c->p) < n) die("GGUF file truncated", NULL);
}

static uint64_t rd_u(cursor *c, int n) {
    uint64_t v = 0;
    need(c, (size_t)n);
    for (int i = 0; i < n; i++) v |= (uint64_t)c->p[i] << (8 * i);
    c->p += n;
    return v;
}

typedef struct {
    const char *s;
    uint64_t n;
} str;

static str rd_str(cursor *c) {
    str s;
    s.n = rd_u(c, 8);
    need(c, s.n);
    s.s = (const char *)c->p;
    c->p += s.n;
    return s;
}

static int str_is(str s, const char *z) { return s.n == strlen(z) && !memcmp(s.s, z, s.n); }

static int type_size(uint32_t t) {
    switch (t) {
    case T_U8: case T_I8: case T_BOOL: return 1;
    case T_U16: case T_I16: return 2;
    case T_U32: case T_I32: case T_F32: return 4;
    case T_U64: case T_I64: case T_F64: return 8;
    default: return 0;
    }
}

/* a scalar value as a double (strings and arrays: NAN) */
static double rd_value(cursor *c, uint32_t t) {
    uint64_t u;
    float f;
    double d;
    switch (t) {
    case T_U8: case T_U16: case T_U32: case T_U64: case T_BOOL:
        return (double)rd_u(c, type_size(t));
    case T_I8: u = rd_u(c, 1); return (double)(int8_t)u;
    case T_I16: u = rd_u(c, 2); return (double)(int16_t)u;
    case T_I32: u = rd_u(c, 4); return (double)(int32_t)u;
    case T_I64: u = rd_u(c, 8); return (double)(int64_t)u;
    case T_F32: { uint32_t b = (uint32_t)rd_u(c, 4); memcpy(&f, &b, 4); return f; }
    case T_F64: u = rd_u(c, 8); memcpy(&d, &u, 8); return d;
    case T_STR: rd_str(c); return NAN;
    case T_ARR: {
        uint32_t et = (uint32_t)rd_u(c, 4);
        uint64_t n = rd_u(c, 8);
        for (uint64_t i = 0; i < n; i++) rd_value(c, et);
        return NAN;
    }
    default: die("GGUF: unknown metadata value type", NULL);
    }
    return NAN;
}

typedef struct {
    char name[96];
    int ndim;
    uint32_t type;
    uint64_t ne[4];
    const float *data; /* into the file (F32), or a float32 copy it owns (dequantized) */
} tensor;

typedef struct {
    uint8_t *file;
    size_t size;
    int n_layer, dim, ffn, n_head, n_kv, head_dim, vocab;
    double rope_base, eps;
    const char *quant; /* the type of the quantized weights (the most common), or NULL */
    tensor *tensors;
    uint64_t n_tensors;
} gguf;

static void gguf_load(gguf *g, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open", path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (size < 24) die("not a GGUF file", path);
    g->size = (size_t)size;
    g->file = xmalloc(g->size);
    if (fread(g->file, 1, g->size, f) != g->size) die("cannot read", path);
    fclose(f);
    cursor c = {g->file, g->file + g->size};
    if (memcmp(c.p, "GGUF", 4)) die("not a GGUF file (magic)", path);
    c.p += 4;
    uint32_t version = (uint32_t)rd_u(&c, 4);
    if (version != 3) die("only GGUF version 3 is read", path);
    g->n_tensors = rd_u(&c, 8);
    uint64_t n_kv = rd_u(&c, 8);
    uint64_t alignment = 32;
    g->rope_base = 10000.0;
    g->eps = 1e-5;
    g->n_kv = -1;
    for (uint64_t i = 0; i < n_kv; i++) {
        str key = rd_str(&c);
        uint32_t t = (uint32_t)rd_u(&c, 4);
        if (t == T_STR && str_is(key, "general.architecture")) {
            str v = rd_str(&c);
            if (!str_is(v, "llama")) die("general.architecture is not llama", path);
            continue;
        }
        double v = rd_value(&c, t);
        if (str_is(key, "general.alignment")) alignment = (uint64_t)v;
        else if (str_is(key, "llama.block_count")) g->n_layer = (int)v;
        else if (str_is(key, "llama.embedding_length")) g->dim = (int)v;
        else if (str_is(key, "llama.feed_forward_length")) g->ffn = (int)v;
        else if (str_is(key, "llama.attention.head_count")) g->n_head = (int)v;
        else if (str_is(key, "llama.attention.head_count_kv")) g->n_kv = (int)v;
        else if (str_is(key, "llama.rope.freq_base")) g->rope_base = v;
        else if (str_is(key, "llama.attention.layer_norm_rms_epsilon")) g->eps = v;
    }
    if (alignment == 0 || (alignment & (alignment - 1))) die("bad general.alignment", path);
    if (g->n_kv < 0) g->n_kv = g->n_head;
    if (g->n_layer <= 0 || g->dim <= 0 || g->ffn <= 0 || g->n_head <= 0 || g->n_kv <= 0 ||
        g->dim % g->n_head || g->n_head % g->n_kv)
        die("missing or inconsistent llama hyperparameters", path);
    g->head_dim = g->dim / g->n_head;
    g->tensors = xmalloc(sizeof(tensor) * (size_t)g->n_tensors);
    uint64_t *offsets = xmalloc(sizeof(uint64_t) * (size_t)g->n_tensors);
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        tensor *t = &g->tensors[i];
        str name = rd_str(&c);
        if (name.n >= sizeof t->name) die("tensor name too long", NULL);
        memcpy(t->name, name.s, name.n);
        t->ndim = (int)rd_u(&c, 4);
        if (t->ndim < 1 || t->ndim > 4) die("bad tensor rank", t->name);
        for (int d = 0; d < 4; d++) t->ne[d] = 1;
        for (int d = 0; d < t->ndim; d++) t->ne[d] = rd_u(&c, 8);
        t->type = (uint32_t)rd_u(&c, 4);
        if (!type_bytes(t->type, QK)) die("tensor type not supported (F32, F16, Q8_0, Q4_1)",
                                          t->name);
        if (t->type != G_F32 && t->type != G_F16 && t->ne[0] % QK)
            die("a quantized tensor's rows are not whole blocks of 32", t->name);
        offsets[i] = rd_u(&c, 8);
    }
    uint64_t start = (uint64_t)(c.p - g->file);
    start = (start + alignment - 1) / alignment * alignment;
    uint64_t n_q4 = 0, n_q8 = 0; /* quantized weights, by type */
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        n_q4 += g->tensors[i].type == G_Q4_1;
        n_q8 += g->tensors[i].type == G_Q8_0;
    }
    g->quant = n_q4 + n_q8 == 0 ? NULL : type_name(n_q4 >= n_q8 ? G_Q4_1 : G_Q8_0);
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        tensor *t = &g->tensors[i];
        uint64_t n = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
        uint64_t at = start + offsets[i], bytes = type_bytes(t->type, n);
        if (at < start || at + bytes > g->size || at + bytes < at)
            die("tensor data past the end", t->name);
        if (t->type == G_F32) {
            if (at % 4) die("misaligned tensor data", t->name);
            t->data = (const float *)(g->file + at);
        } else {
            float *y = xmalloc(sizeof(float) * (size_t)n);
            dequantize(y, g->file + at, t->type, n);
            t->data = y;
        }
        if (getenv("C_LLAMA_VERBOSE"))
            fprintf(stderr, "engine: %s %s [%llu, %llu]\n", t->name, type_name(t->type),
                    (unsigned long long)t->ne[0], (unsigned long long)t->ne[1]);
    }
    free(offsets);
}

/* the tensor NAME, checked to be [ne0, ne1] (ne1 = 1 for a vector); NULL if optional */
static const float *get(gguf *g, const char *name, uint64_t ne0, uint64_t ne1, int optional) {
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        tensor *t = &g->tensors[i];
        if (strcmp(t->name, name)) continue;
        if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1)
            die("tensor has an unexpected shape", name);
        return t->data;
    }
    if (!optional) die("tensor missing", name);
    return NULL;
}

/* ------------------------------------------------------------------ dump writer */

static FILE *dat, *idx;
static long long dat_off = 0, n_records = 0, abort_after = -1, stats_over = -1;
static int use_f16 = 0, cur_step = 0, put_probs = 0;

static uint16_t to_f16(float f) { /* round to nearest even; NaN stays NaN, overflow to Inf */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, e = (u >> 23) & 0xffu, m = u & 0x7fffffu;
    if (e == 0xff) return (uint16_t)(sign | 0x7c00u | (m ? 0x200u : 0));
    int ex = (int)e - 127 + 15;
    if (ex >= 31) return (uint16_t)(sign | 0x7c00u);
    if (ex <= 0) { /* subnormal half or zero */
        if (ex < -10) return (uint16_t)sign;
        m |= 0x800000u;
        int shift = 14 - ex;
        uint32_t h = m >> shift, rest = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)ex << 10) | (m >> 13), rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) h++; /* may carry into the exponent */
    return (uint16_t)(sign | h);
}

static void json_num(double v) {
    if (!isfinite(v)) fputs("null", idx);
    else fprintf(idx, "%.9g", v);
}

static void json_str(const char *s) {
    fputc('"', idx);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fputc('\\', idx);
        if ((unsigned char)*s < 0x20) fprintf(idx, "\\u%04x", *s);
        else fputc(*s, idx);
    }
    fputc('"', idx);
}

/* one tensor record: data first (flushed), then its index line (flushed) */
static void put_raw(const char *name, const char *dtype, const long *shape, int ndim,
                    const void *data, long long nbytes, const double *stats) {
    long long off = dat_off;
    if (!stats) {
        if (nbytes && fwrite(data, 1, (size_t)nbytes, dat) != (size_t)nbytes)
            die("cannot write data.bin", NULL);
        fflush(dat);
        dat_off += nbytes;
    }
    fprintf(idx, "{\"type\":\"tensor\",\"name\":");
    json_str(name);
    fprintf(idx, ",\"step\":%d,\"seq\":%lld,\"call\":0,\"dtype\":\"%s\",\"shape\":[", cur_step,
            n_records, dtype);
    for (int i = 0; i < ndim; i++) fprintf(idx, i ? ",%ld" : "%ld", shape[i]);
    if (stats) {
        fputs("],\"offset\":null,\"nbytes\":null,\"stats\":{\"min\":", idx);
        json_num(stats[0]); fputs(",\"max\":", idx);
        json_num(stats[1]); fputs(",\"mean\":", idx);
        json_num(stats[2]); fputs(",\"std\":", idx);
        json_num(stats[3]); fputs(",\"abs_max\":", idx);
        json_num(stats[4]);
        fprintf(idx, ",\"nan\":%lld,\"inf\":%lld,\"zero\":%lld},\"role\":\"probe\"}\n",
                (long long)stats[5], (long long)stats[6], (long long)stats[7]);
    } else {
        fprintf(idx, "],\"offset\":%lld,\"nbytes\":%lld,\"stats\":null,\"role\":\"probe\"}\n", off,
                nbytes);
    }
    fflush(idx);
    n_records++;
    if (abort_after >= 0 && n_records >= abort_after) {
        fprintf(stderr, "engine: aborting after %lld records\n", n_records);
        abort();
    }
}

/* a float activation: as float32, or float16 with --f16; stats only above --stats-over */
static void put(const char *name, const float *x, const long *shape, int ndim) {
    long long n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    uint16_t *h = NULL;
    if (use_f16) {
        h = xmalloc(sizeof(uint16_t) * (size_t)n);
        for (long long i = 0; i < n; i++) h[i] = to_f16(x[i]);
    }
    if (stats_over >= 0 && n > stats_over) {
        double mn = INFINITY, mx = -INFINITY, sum = 0, sq = 0, st[8] = {0};
        long long fin = 0;
        for (long long i = 0; i < n; i++) {
            double v = h ? from_f16(h[i]) : x[i];
            if (isnan(v)) { st[5]++; continue; }
            if (isinf(v)) { st[6]++; continue; }
            if (v == 0) st[7]++;
            fin++;
            sum += v;
            if (v < mn) mn = v;
            if (v > mx) mx = v;
        }
        double mean = fin ? sum / (double)fin : NAN;
        for (long long i = 0; i < n; i++) {
            double v = h ? from_f16(h[i]) : x[i];
            if (isfinite(v)) sq += (v - mean) * (v - mean);
        }
        st[0] = fin ? mn : NAN;
        st[1] = fin ? mx : NAN;
        st[2] = mean;
        st[3] = fin ? sqrt(sq / (double)fin) : NAN;
        st[4] = fin ? fmax(fabs(mn), fabs(mx)) : NAN;
        put_raw(name, use_f16 ? "float16" : "float32", shape, ndim, NULL, 0, st);
    } else if (h) {
        put_raw(name, "float16", shape, ndim, h, n * 2, NULL);
    } else {
        put_raw(name, "float32", shape, ndim, x, n * 4, NULL);
    }
    free(h);
}

static void put2(const char *name, const float *x, long a, long b) {
    long shape[2] = {a, b};
    put(name, x, shape, 2);
}

static void put3(const char *name, const float *x, long a, long b, long c) {
    long shape[3] = {a, b, c};
    put(name, x, shape, 3);
}

/* ------------------------------------------------------------------ model */

typedef struct {
    const float *attn_norm, *wq, *wk, *wv, *wo, *ffn_norm, *w_gate, *w_up, *w_down;
} layer_w;

typedef struct {
    gguf g;
    const float *tok_embd, *out_norm, *output;
    layer_w *L;
    int max_pos;
    float *k_cache, *v_cache; /* [layer][kv head][pos][head_dim] */
} model;

enum { BUG_NONE, BUG_ROPE_NEOX, BUG_NORM_BLOCK16, BUG_KV_STALE, BUG_GQA_MAP, BUG_LM_HEAD_T,
       BUG_SWAP_GATE_UP, BUG_NO_CAUSAL, BUG_DECODE_POS, BUG_Q4_INTERLEAVED, BUG_Q4_NO_MIN,
       BUG_SOFTMAX_NO_NORM, BUG_ROPE_OFF, BUG_ZERO_V, BUG_SKIP_LAYER, BUG_STUCK, BUG_KV_POS0,
       BUG_NAN_AT, BUG_EXPLODE, BUG_ZERO_Q, BUG_EMBD_FIRST, BUG_RMS_EPS };
static const char *BUGS[] = {"", "rope_neox", "norm_block16", "kv_stale", "gqa_map",
                             "transposed_lm_head", "swap_gate_up", "no_causal_mask",
                             "decode_pos", "q4_interleaved", "q4_no_min", "softmax_no_norm",
                             "rope_off", "zero_v", "skip_layer", "stuck", "kv_pos0", "nan_at",
                             "explode", "zero_q", "embd_first", "rms_eps"};
static int bug = BUG_NONE;
static int stuck_id = -1, stuck_start = -1; /* bug stuck: the first decode step's token, position */

static void model_load(model *m, const char *path, int max_pos) {
    gguf *g = &m->g;
    char name[96];
    gguf_load(g, path);
    int D = g->dim, kvd = g->n_kv * g->head_dim;
    const float *emb = NULL;
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (!strcmp(g->tensors[i].name, "token_embd.weight")) {
            if (g->tensors[i].ne[0] != (uint64_t)D) die("token_embd has the wrong width", NULL);
            g->vocab = (int)g->tensors[i].ne[1];
        }
    emb = get(g, "token_embd.weight", (uint64_t)D, (uint64_t)g->vocab, 0);
    m->tok_embd = emb;
    m->out_norm = get(g, "output_norm.weight", (uint64_t)D, 1, 0);
    m->output = get(g, "output.weight", (uint64_t)D, (uint64_t)g->vocab, 1);
    if (!m->output) m->output = emb; /* tied */
    m->L = xmalloc(sizeof(layer_w) * (size_t)g->n_layer);
    for (int l = 0; l < g->n_layer; l++) {
        layer_w *w = &m->L[l];
#define W(field, tag, a, b) \
        snprintf(name, sizeof name, "blk.%d." tag ".weight", l); \
        w->field = get(g, name, (uint64_t)(a), (uint64_t)(b), 0);
        W(attn_norm, "attn_norm", D, 1)
        W(wq, "attn_q", D, D)
        W(wk, "attn_k", D, kvd)
        W(wv, "attn_v", D, kvd)
        W(wo, "attn_output", D, D)
        W(ffn_norm, "ffn_norm", D, 1)
        W(w_gate, "ffn_gate", D, g->ffn)
        W(w_up, "ffn_up", D, g->ffn)
        W(w_down, "ffn_down", g->ffn, D)
#undef W
    }
    if (bug == BUG_ZERO_V || bug == BUG_ZERO_Q) { /* every layer's V (Q) weights as zeros */
        float *zeros = xmalloc(sizeof(float) * (size_t)D * (size_t)D);
        for (int l = 0; l < g->n_layer; l++) {
            if (bug == BUG_ZERO_V) m->L[l].wv = zeros;
            else m->L[l].wq = zeros;
        }
    }
    m->max_pos = max_pos;
    size_t cache = (size_t)g->n_layer * (size_t)kvd * (size_t)max_pos;
    m->k_cache = xmalloc(sizeof(float) * cache);
    m->v_cache = xmalloc(sizeof(float) * cache);
}

/* y[t][o] = sum_i x[t][i] * w[o][i]: w row-major [out][in], GGUF [in, out] */
static void matmul(float *y, const float *x, const float *w, int n, int in, int out) {
    for (int o = 0; o < out; o++) {
        const float *row = w + (size_t)o * in;
        for (int t = 0; t < n; t++) {
            const float *xt = x + (size_t)t * in;
            float s = 0;
            for (int i = 0; i < in; i++) s += xt[i] * row[i];
            y[(size_t)t * out + o] = s;
        }
    }
}

static void rmsnorm(float *y, const float *x, const float *w, int n, int d, double eps,
                    int block) {
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * d;
        float *yt = y + (size_t)t * d;
        int span = block > 0 ? block : d;
        for (int b = 0; b < d; b += span) {
            int e = b + span < d ? b + span : d;
            float ss = 0;
            for (int i = b; i < e; i++) ss += xt[i] * xt[i];
            float r = 1.0f / sqrtf(ss / (float)(e - b) + (float)eps);
            for (int i = b; i < e; i++) yt[i] = xt[i] * r * w[i];
        }
    }
}

/* RoPE in place on x flat [n][heads * hd], at positions pos[t] */
static void rope(float *x, const int *pos, int n, int heads, int hd, double base) {
    for (int t = 0; t < n; t++)
        for (int h = 0; h < heads; h++) {
            float *v = x + (size_t)t * heads * hd + (size_t)h * hd;
            for (int i = 0; i < hd / 2; i++) {
                double freq = pow(base, -2.0 * i / hd);
                float a = (float)(pos[t] * freq), c = cosf(a), s = sinf(a);
                int i0 = 2 * i, i1 = 2 * i + 1;
                if (bug == BUG_ROPE_NEOX) i0 = i, i1 = i + hd / 2;
                float x0 = v[i0], x1 = v[i1];
                v[i0] = x0 * c - x1 * s;
                v[i1] = x0 * s + x1 * c;
            }
        }
}

/* flat [n][heads * hd] -> heads first [heads][n][hd] */
static void heads_first(float *y, const float *x, int n, int heads, int hd) {
    for (int h = 0; h < heads; h++)
        for (int t = 0; t < n; t++)
            memcpy(y + ((size_t)h * n + t) * hd, x + (size_t)t * heads * hd + (size_t)h * hd,
                   sizeof(float) * (size_t)hd);
}

/* one forward of n tokens at positions start..start+n-1; returns the greedy next token */
static int forward(model *m, const int *ids, int n, int start) {
    gguf *g = &m->g;
    int D = g->dim, H = g->n_head, KV = g->n_kv, hd = g->head_dim, F = g->ffn, V = g->vocab;
    int kvd = KV * hd, bug_layer = g->n_layer > 1 ? 1 : 0;
    char tag[64];
    int stuck_fed = 0;
    if (bug == BUG_STUCK && n == 1 && start > 0) {
        if (stuck_start < 0) stuck_id = ids[0], stuck_start = start;
        stuck_fed = stuck_id;
        start = stuck_start; /* the token fed is recorded, the first decode step's is run */
    }
    if (start + n > m->max_pos) die("context longer than the KV cache", NULL);
    int *pos = xmalloc(sizeof(int) * (size_t)n);
    for (int t = 0; t < n; t++) pos[t] = start + t;
    if (bug == BUG_DECODE_POS && n == 1 && start > 0) pos[0] = start - 1;
    float *x = xmalloc(sizeof(float) * (size_t)n * D), *xb = xmalloc(sizeof(float) * (size_t)n * D);
    float *q = xmalloc(sizeof(float) * (size_t)n * D), *k = xmalloc(sizeof(float) * (size_t)n * kvd);
    float *v = xmalloc(sizeof(float) * (size_t)n * kvd), *att = xmalloc(sizeof(float) * (size_t)n * D);
    float *hf = xmalloc(sizeof(float) * (size_t)n * D), *o = xmalloc(sizeof(float) * (size_t)n * D);
    float *gate = xmalloc(sizeof(float) * (size_t)n * F), *up = xmalloc(sizeof(float) * (size_t)n * F);
    float *sc = xmalloc(sizeof(float) * (size_t)(start + n));
    float *probs = xmalloc(sizeof(float) * (size_t)H * n * (start + n)); /* [H][n][keys] */
    float *x_in = xmalloc(sizeof(float) * (size_t)n * D);
    {
        int32_t *ids32 = xmalloc(sizeof(int32_t) * (size_t)n);
        for (int t = 0; t < n; t++) ids32[t] = ids[t];
        long shape[1] = {n};
        put_raw("tok_ids", "int32", shape, 1, ids32, (long long)n * 4, NULL);
        free(ids32);
    }
    if (bug == BUG_STUCK && n == 1 && stuck_start >= 0 && start == stuck_start)
        ids = &stuck_fed;
    for (int t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= V) die("token id out of range", NULL);
        int row = bug == BUG_EMBD_FIRST ? ids[0] : ids[t];
        memcpy(x + (size_t)t * D, m->tok_embd + (size_t)row * D, sizeof(float) * (size_t)D);
    }
    put2("tok_embd", x, n, D);
    for (int l = 0; l < g->n_layer; l++) {
        layer_w *w = &m->L[l];
#define TAG(s) (snprintf(tag, sizeof tag, "L%d." s, l), tag)
        memcpy(x_in, x, sizeof(float) * (size_t)n * D);
        rmsnorm(xb, x, w->attn_norm, n, D, g->eps, bug == BUG_NORM_BLOCK16 ? 16 : 0);
        put2(TAG("attn_in"), xb, n, D);
        matmul(q, xb, w->wq, n, D, D);
        matmul(k, xb, w->wk, n, D, kvd);
        matmul(v, xb, w->wv, n, D, kvd);
        put2(TAG("xq"), q, n, D);
        put2(TAG("xk"), k, n, kvd);
        put2(TAG("xv"), v, n, kvd);
        if (bug != BUG_ROPE_OFF) {
            rope(q, pos, n, H, hd, g->rope_base);
            rope(k, pos, n, KV, hd, g->rope_base);
        }
        heads_first(hf, q, n, H, hd);
        put3(TAG("xq_rope"), hf, H, n, hd);
        heads_first(hf, k, n, KV, hd);
        put3(TAG("xk_rope"), hf, KV, n, hd);
        /* append to the cache: [layer][kv head][pos][hd] */
        for (int h = 0; h < KV; h++)
            for (int t = 0; t < n; t++) {
                size_t at = (((size_t)l * KV + h) * m->max_pos + (size_t)(start + t)) * hd;
                memcpy(m->k_cache + at, k + (size_t)t * kvd + (size_t)h * hd, sizeof(float) * hd);
                memcpy(m->v_cache + at, v + (size_t)t * kvd + (size_t)h * hd, sizeof(float) * hd);
            }
        float scale = 1.0f / sqrtf((float)hd);
        for (int h = 0; h < H; h++) {
            int kh = bug == BUG_GQA_MAP ? h % KV : h / (H / KV);
            const float *kc = m->k_cache + ((size_t)l * KV + kh) * m->max_pos * hd;
            const float *vc = m->v_cache + ((size_t)l * KV + kh) * m->max_pos * hd;
            for (int t = 0; t < n; t++) {
                const float *qt = q + (size_t)t * D + (size_t)h * hd;
                int last = start + t; /* attends to 0..last */
                if (bug == BUG_NO_CAUSAL) last = start + n - 1;
                if (bug == BUG_KV_STALE && n == 1 && start > 0) last = start - 1;
                if (bug == BUG_KV_POS0 && n == 1 && start > 0) last = 0;
                float mx = -INFINITY, sum = 0;
                for (int s = 0; s <= last; s++) {
                    float d = 0;
                    for (int i = 0; i < hd; i++) d += qt[i] * kc[(size_t)s * hd + i];
                    sc[s] = d * scale;
                    if (sc[s] > mx) mx = sc[s];
                }
                for (int s = 0; s <= last; s++) sum += (sc[s] = expf(sc[s] - mx));
                float *out = att + (size_t)t * D + (size_t)h * hd;
                for (int i = 0; i < hd; i++) out[i] = 0;
                float *pr = probs + ((size_t)h * n + t) * (size_t)(start + n);
                for (int s = 0; s < start + n; s++) pr[s] = 0;
                for (int s = 0; s <= last; s++) {
                    float p = bug == BUG_SOFTMAX_NO_NORM ? sc[s] : sc[s] / sum;
                    pr[s] = p;
                    for (int i = 0; i < hd; i++) out[i] += p * vc[(size_t)s * hd + i];
                }
            }
        }
        put2(TAG("att"), att, n, D);
        if (put_probs) put3(TAG("att_p"), probs, H, n, start + n);
        matmul(o, att, w->wo, n, D, D);
        put2(TAG("att_o"), o, n, D);
        for (size_t i = 0; i < (size_t)n * D; i++) x[i] += o[i];
        put2(TAG("h"), x, n, D);
        rmsnorm(xb, x, w->ffn_norm, n, D, g->eps, 0);
        put2(TAG("ffn_in"), xb, n, D);
        matmul(gate, xb, w->w_gate, n, D, F);
        matmul(up, xb, w->w_up, n, D, F);
        for (size_t i = 0; i < (size_t)n * F; i++) {
            float a = gate[i], b = up[i];
            if (bug == BUG_SWAP_GATE_UP) a = up[i], b = gate[i];
            gate[i] = a / (1.0f + expf(-a)) * b;
        }
        if (bug == BUG_NAN_AT && l == bug_layer) gate[(size_t)(n - 1) * F] = NAN;
        put2(TAG("ffn_hid"), gate, n, F);
        matmul(o, gate, w->w_down, n, F, D);
        put2(TAG("ffn_out"), o, n, D);
        for (size_t i = 0; i < (size_t)n * D; i++)
            x[i] += bug == BUG_EXPLODE && l == bug_layer ? 1000.0f * o[i] : o[i];
        if (bug == BUG_SKIP_LAYER && l == bug_layer)
            memcpy(x, x_in, sizeof(float) * (size_t)n * D);
        put2(TAG("out"), x, n, D);
#undef TAG
    }
    /* only the last position goes on to the output */
    const float *last = x + (size_t)(n - 1) * D;
    rmsnorm(xb, last, m->out_norm, 1, D, g->eps, 0);
    put2("final_norm", xb, 1, D);
    float *logits = xmalloc(sizeof(float) * (size_t)V);
    if (bug == BUG_LM_HEAD_T) { /* the same bytes read as [hidden][vocab] */
        for (int o2 = 0; o2 < V; o2++) {
            float s = 0;
            for (int i = 0; i < D; i++) s += xb[i] * m->output[(size_t)i * V + o2];
            logits[o2] = s;
        }
    } else {
        matmul(logits, xb, m->output, 1, D, V);
    }
    put2("logits", logits, 1, V);
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    free(pos); free(x); free(xb); free(q); free(k); free(v); free(att); free(hf); free(o);
    free(gate); free(up); free(sc); free(logits); free(probs); free(x_in);
    return best;
}

/* ------------------------------------------------------------------ main */

static int parse_ids(const char *s, int **out) {
    int n = 0, cap = 16;
    int *ids = xmalloc(sizeof(int) * (size_t)cap);
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) die("bad token list", s);
        if (n == cap) {
            cap *= 2;
            int *more = realloc(ids, sizeof(int) * (size_t)cap);
            if (!more) die("out of memory", NULL);
            ids = more;
        }
        ids[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
    }
    *out = ids;
    return n;
}

static void usage(void) {
    fprintf(stderr, "usage: engine MODEL.gguf --tokens IDS --dump DIR [--decode N] "
                    "[--force IDS] [--f16] [--hparams-meta] [--stats-over N] [--bug NAME] [--abort-after K] [--probs]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *gguf_path = NULL, *dump = NULL, *tokens = NULL, *force = NULL;
    int decode = 0, hparams_meta = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "--tokens") && more) tokens = argv[++i];
        else if (!strcmp(a, "--dump") && more) dump = argv[++i];
        else if (!strcmp(a, "--decode") && more) decode = atoi(argv[++i]);
        else if (!strcmp(a, "--force") && more) force = argv[++i];
        else if (!strcmp(a, "--f16")) use_f16 = 1;
        else if (!strcmp(a, "--hparams-meta")) hparams_meta = 1;
        else if (!strcmp(a, "--probs")) put_probs = 1;
        else if (!strcmp(a, "--stats-over") && more) stats_over = atoll(argv[++i]);
        else if (!strcmp(a, "--abort-after") && more) abort_after = atoll(argv[++i]);
        else if (!strcmp(a, "--bug") && more) {
            const char *name = argv[++i];
            bug = -1;
            for (int b = 1; b < (int)(sizeof BUGS / sizeof *BUGS); b++)
                if (!strcmp(name, BUGS[b])) bug = b;
            if (bug < 0) die("unknown bug", name);
        } else if (a[0] != '-' && !gguf_path) gguf_path = a;
        else usage();
    }
    if (!gguf_path || !dump || !tokens) usage();
    int *prompt, *forced = NULL;
    int n_prompt = parse_ids(tokens, &prompt), n_forced = force ? parse_ids(force, &forced) : 0;
    if (n_prompt < 1) die("empty prompt", NULL);
    bug_q4_interleaved = bug == BUG_Q4_INTERLEAVED;
    bug_q4_no_min = bug == BUG_Q4_NO_MIN;
    model m;
    memset(&m, 0, sizeof m);
    model_load(&m, gguf_path, n_prompt + decode + 1);
    if (bug == BUG_RMS_EPS) m.g.eps = fabs(m.g.eps - 1e-6) < 1e-9 ? 1e-5 : 1e-6;

    char path[4096];
    mkdir(dump, 0777);
    snprintf(path, sizeof path, "%s/data.bin", dump);
    dat = fopen(path, "wb");
    snprintf(path, sizeof path, "%s/index.jsonl", dump);
    idx = fopen(path, "wb");
    if (!dat || !idx) die("cannot create the dump", dump);
    fputs("{\"type\":\"header\",\"format\":\"lockstep-dump\",\"version\":1,\"meta\":"
          "{\"engine\":\"c-llama\",\"model\":", idx);
    json_str(gguf_path);
    fprintf(idx, ",\"dtype\":\"float32\",\"vocab_size\":%d", m.g.vocab);
    if (m.g.quant) fprintf(idx, ",\"quantization\":\"%s\"", m.g.quant);
    if (hparams_meta)
        fprintf(idx, ",\"n_heads\":%d,\"n_kv_heads\":%d,\"head_dim\":%d", m.g.n_head, m.g.n_kv,
                m.g.head_dim);
    fputs(",\"prompt_token_ids\":[", idx);
    for (int i = 0; i < n_prompt; i++) fprintf(idx, i ? ",%d" : "%d", prompt[i]);
    fputs("]}}\n", idx);
    fflush(idx);

    int *chosen = xmalloc(sizeof(int) * (size_t)(decode + 1));
    cur_step = 0;
    chosen[0] = forward(&m, prompt, n_prompt, 0);
    for (int i = 0; i < decode; i++) {
        cur_step = i + 1;
        int fed = i < n_forced ? forced[i] : chosen[i];
        chosen[i + 1] = forward(&m, &fed, 1, n_prompt + i);
    }
    fputs("{\"type\":\"meta\",\"meta\":{\"generated_token_ids\":[", idx);
    for (int i = 0; i <= decode; i++) fprintf(idx, i ? ",%d" : "%d", chosen[i]);
    fputs("]}}\n", idx);
    fprintf(idx, "{\"type\":\"end\",\"records\":%lld}\n", n_records);
    fclose(dat);
    fclose(idx);
    for (int i = 0; i <= decode; i++) printf(i ? " %d" : "%d", chosen[i]);
    printf("\n");
    return 0;
}
