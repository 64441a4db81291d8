/*
 * mpisplit_pmpi.c -- a small PMPI interposition library for mpisplit.
 *
 * Defines MPI_X for the point-to-point, probe, completion, persistent and
 * collective calls listed in CALL_LIST below (including the MPI-4 large-count
 * "_c" variants, which mpi4py 4 calls for buffer-based communication), forwards
 * each to PMPI_X and records per rank:
 *   - per call name: number of calls, bytes, wall time spent inside the call;
 *   - per peer (rank in MPI_COMM_WORLD): messages and bytes sent and received
 *     by point-to-point operations, and the wall time inside the calls that
 *     moved them.
 * At MPI_Finalize it writes pmpi-rank<R>.json into $MPISPLIT_PMPI_DIR (default:
 * the current directory).  See tools/pmpi/README.md for the JSON format.
 *
 * Works with any MPI implementation that has the standard profiling interface
 * (MPI >= 3.0; the "_c" wrappers are compiled only when MPI_VERSION >= 4).
 * Use it via LD_PRELOAD, or link it before -lmpi.
 */
#define _GNU_SOURCE
#include <mpi.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#if MPI_VERSION >= 4
#define PMPIS_LARGE_COUNT 1
#else
#define PMPIS_LARGE_COUNT 0
#endif

#ifndef PMPIS_HAVE_ISENDRECV /* set by CMake from the library; MPI 4 has it by definition */
#define PMPIS_HAVE_ISENDRECV PMPIS_LARGE_COUNT
#endif

#define PMPIS_FORMAT "mpisplit-pmpi/1"

/* ------------------------------------------------------------------------ */
/* Call table                                                                */
/* ------------------------------------------------------------------------ */

#define CALL_LIST(X)                                                          \
    X(MPI_Send) X(MPI_Send_c) X(MPI_Ssend) X(MPI_Ssend_c)                     \
    X(MPI_Rsend) X(MPI_Rsend_c) X(MPI_Bsend) X(MPI_Bsend_c)                   \
    X(MPI_Recv) X(MPI_Recv_c) X(MPI_Mrecv) X(MPI_Mrecv_c)                     \
    X(MPI_Sendrecv) X(MPI_Sendrecv_c)                                         \
    X(MPI_Sendrecv_replace) X(MPI_Sendrecv_replace_c)                         \
    X(MPI_Isend) X(MPI_Isend_c) X(MPI_Issend) X(MPI_Issend_c)                 \
    X(MPI_Irsend) X(MPI_Irsend_c) X(MPI_Ibsend) X(MPI_Ibsend_c)               \
    X(MPI_Irecv) X(MPI_Irecv_c) X(MPI_Imrecv) X(MPI_Imrecv_c)                 \
    X(MPI_Isendrecv) X(MPI_Isendrecv_c)                                       \
    X(MPI_Isendrecv_replace) X(MPI_Isendrecv_replace_c)                       \
    X(MPI_Probe) X(MPI_Iprobe) X(MPI_Mprobe) X(MPI_Improbe)                   \
    X(MPI_Wait) X(MPI_Waitall) X(MPI_Waitany) X(MPI_Waitsome)                 \
    X(MPI_Test) X(MPI_Testall) X(MPI_Testany) X(MPI_Testsome)                 \
    X(MPI_Send_init) X(MPI_Send_init_c) X(MPI_Ssend_init) X(MPI_Ssend_init_c) \
    X(MPI_Rsend_init) X(MPI_Rsend_init_c) X(MPI_Bsend_init) X(MPI_Bsend_init_c) \
    X(MPI_Recv_init) X(MPI_Recv_init_c)                                       \
    X(MPI_Start) X(MPI_Startall) X(MPI_Request_free)                          \
    X(MPI_Barrier) X(MPI_Ibarrier)                                            \
    X(MPI_Bcast) X(MPI_Bcast_c) X(MPI_Ibcast) X(MPI_Ibcast_c)                 \
    X(MPI_Reduce) X(MPI_Reduce_c) X(MPI_Ireduce) X(MPI_Ireduce_c)             \
    X(MPI_Allreduce) X(MPI_Allreduce_c) X(MPI_Iallreduce) X(MPI_Iallreduce_c) \
    X(MPI_Gather) X(MPI_Gather_c) X(MPI_Igather) X(MPI_Igather_c)             \
    X(MPI_Gatherv) X(MPI_Gatherv_c) X(MPI_Igatherv) X(MPI_Igatherv_c)         \
    X(MPI_Scatter) X(MPI_Scatter_c) X(MPI_Iscatter) X(MPI_Iscatter_c)         \
    X(MPI_Scatterv) X(MPI_Scatterv_c) X(MPI_Iscatterv) X(MPI_Iscatterv_c)     \
    X(MPI_Allgather) X(MPI_Allgather_c) X(MPI_Iallgather) X(MPI_Iallgather_c) \
    X(MPI_Allgatherv) X(MPI_Allgatherv_c)                                     \
    X(MPI_Iallgatherv) X(MPI_Iallgatherv_c)                                   \
    X(MPI_Alltoall) X(MPI_Alltoall_c) X(MPI_Ialltoall) X(MPI_Ialltoall_c)     \
    X(MPI_Alltoallv) X(MPI_Alltoallv_c) X(MPI_Ialltoallv) X(MPI_Ialltoallv_c)

#define X_ENUM(name) ID_##name,
enum { CALL_LIST(X_ENUM) N_CALLS };
#undef X_ENUM
#define X_NAME(name) #name,
static const char *const call_names[N_CALLS] = { CALL_LIST(X_NAME) };
#undef X_NAME

typedef struct {
    uint64_t count;
    uint64_t bytes;
    double time_s;
} callstat_t;

typedef struct {
    uint64_t sent_messages, sent_bytes, recv_messages, recv_bytes;
    double time_s;
} peerstat_t;

/* All of the following is guarded by g_lock (except where noted). */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static callstat_t g_calls[N_CALLS];
static peerstat_t *g_peers;  /* g_size entries, allocated once at init, never freed */
static int g_rank = -1, g_size = 0;
static int g_initialized, g_written;
static pid_t g_pid;  /* process that called MPI_Init (not a fork()ed child) */
static double g_t_init;
static char g_host[256];

/* Communicator -> world-rank translation (cached as a communicator attribute so
 * that a freed-and-reused handle can never return a stale table). */
static pthread_mutex_t g_xlate_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_keyval = MPI_KEYVAL_INVALID;
static MPI_Group g_world_group = MPI_GROUP_NULL;

static inline double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline void lock(void) { pthread_mutex_lock(&g_lock); }
static inline void unlock(void) { pthread_mutex_unlock(&g_lock); }

/* --- stats updates; caller holds g_lock ----------------------------------- */
static inline void st_call(int id, uint64_t bytes, double t)
{
    g_calls[id].count++;
    g_calls[id].bytes += bytes;
    g_calls[id].time_s += t;
}

/* t: the part of the call's wall time spent on this message (see README "peers"). */
static inline void st_sent(int peer, uint64_t bytes, double t)
{
    if (g_peers && peer >= 0 && peer < g_size) {
        g_peers[peer].sent_messages++;
        g_peers[peer].sent_bytes += bytes;
        g_peers[peer].time_s += t;
    }
}

static inline void st_recv(int peer, uint64_t bytes, double t)
{
    if (g_peers && peer >= 0 && peer < g_size) {
        g_peers[peer].recv_messages++;
        g_peers[peer].recv_bytes += bytes;
        g_peers[peer].time_s += t;
    }
}

/* ------------------------------------------------------------------------ */
/* Sizes                                                                     */
/* ------------------------------------------------------------------------ */

static inline uint64_t type_bytes(MPI_Datatype dt)
{
    if (dt == MPI_DATATYPE_NULL) return 0;
#if PMPIS_LARGE_COUNT
    MPI_Count sz = 0;
    if (PMPI_Type_size_c(dt, &sz) != MPI_SUCCESS || sz < 0) return 0;
#else
    MPI_Count sz = 0;
    if (PMPI_Type_size_x(dt, &sz) != MPI_SUCCESS || sz < 0) return 0;
#endif
    return (uint64_t)sz;
}

static inline uint64_t nbytes(MPI_Count count, MPI_Datatype dt)
{
    if (count <= 0) return 0;
    return (uint64_t)count * type_bytes(dt);
}

/* Bytes actually received, from a completed status. */
static inline uint64_t status_bytes(const MPI_Status *st)
{
    MPI_Count c = 0;
#if PMPIS_LARGE_COUNT
    if (PMPI_Get_count_c(st, MPI_BYTE, &c) != MPI_SUCCESS) return 0;
#else
    if (PMPI_Get_elements_x(st, MPI_BYTE, &c) != MPI_SUCCESS) return 0;
#endif
    if (c == MPI_UNDEFINED || c < 0) return 0;
    return (uint64_t)c;
}

static inline int status_cancelled(const MPI_Status *st)
{
    int flag = 0;
    if (PMPI_Test_cancelled(st, &flag) != MPI_SUCCESS) return 0;
    return flag;
}

static int comm_is_inter(MPI_Comm comm)
{
    int inter = 0;
    if (comm == MPI_COMM_WORLD || comm == MPI_COMM_SELF) return 0;
    PMPI_Comm_test_inter(comm, &inter);
    return inter;
}

/* Number of processes a rooted/all-to-all collective addresses. */
static int comm_nprocs(MPI_Comm comm)
{
    int n = 0;
    if (comm == MPI_COMM_WORLD) return g_size;
    if (comm_is_inter(comm)) PMPI_Comm_remote_size(comm, &n);
    else PMPI_Comm_size(comm, &n);
    return n;
}

static int comm_rank(MPI_Comm comm)
{
    int r = -1;
    if (comm == MPI_COMM_WORLD) return g_rank;
    PMPI_Comm_rank(comm, &r);
    return r;
}

/* Is this process the data source of a rooted collective? */
static int is_root(MPI_Comm comm, int root)
{
    if (root == MPI_ROOT) return 1;
    if (root == MPI_PROC_NULL) return 0;
    if (comm_is_inter(comm)) return 0;
    return comm_rank(comm) == root;
}

/* ------------------------------------------------------------------------ */
/* Rank translation                                                          */
/* ------------------------------------------------------------------------ */

static int xlate_delete(MPI_Comm comm, int keyval, void *attr, void *extra)
{
    (void)comm; (void)keyval; (void)extra;
    free(attr);
    return MPI_SUCCESS;
}

/* World rank of `rank` in `comm` (remote group for intercommunicators), or -1. */
static int world_rank(MPI_Comm comm, int rank)
{
    if (rank < 0 || rank == MPI_PROC_NULL || rank == MPI_ANY_SOURCE) return -1;
    if (comm == MPI_COMM_WORLD) return rank < g_size ? rank : -1;
    if (comm == MPI_COMM_NULL || g_keyval == MPI_KEYVAL_INVALID) return -1;
    if (comm == MPI_COMM_SELF) return rank == 0 ? g_rank : -1;

    int result = -1;
    pthread_mutex_lock(&g_xlate_lock);
    int *tab = NULL, flag = 0;
    if (PMPI_Comm_get_attr(comm, g_keyval, &tab, &flag) != MPI_SUCCESS) flag = 0;
    if (!flag || !tab) {
        tab = NULL;
        MPI_Group grp = MPI_GROUP_NULL;
        int inter = 0, n = 0, rc;
        PMPI_Comm_test_inter(comm, &inter);
        rc = inter ? PMPI_Comm_remote_group(comm, &grp) : PMPI_Comm_group(comm, &grp);
        if (rc == MPI_SUCCESS && PMPI_Group_size(grp, &n) == MPI_SUCCESS && n > 0) {
            int *t = malloc(sizeof(int) * (size_t)(n + 1));
            int *in = malloc(sizeof(int) * (size_t)n);
            if (t && in) {
                for (int i = 0; i < n; i++) in[i] = i;
                if (PMPI_Group_translate_ranks(grp, n, in, g_world_group, t + 1) == MPI_SUCCESS) {
                    t[0] = n;
                    for (int i = 1; i <= n; i++)
                        if (t[i] == MPI_UNDEFINED) t[i] = -1;
                    if (PMPI_Comm_set_attr(comm, g_keyval, t) == MPI_SUCCESS) {
                        tab = t;
                        t = NULL;
                    }
                }
            }
            free(t);
            free(in);
        }
        if (grp != MPI_GROUP_NULL) PMPI_Group_free(&grp);
    }
    if (tab && rank < tab[0]) result = tab[1 + rank];
    pthread_mutex_unlock(&g_xlate_lock);
    return result;
}

/* ------------------------------------------------------------------------ */
/* Handle tables (open addressing, linear probing, backward-shift deletion)  */
/* ------------------------------------------------------------------------ */

/* F_POSTED: count the posted receive size, not the status (MPI_Isendrecv: MPICH
 * 5.0 completes it with a status whose count and tag are not the receive's). */
enum { F_RECV = 1, F_PSEND = 2, F_PERSIST = 4, F_ACTIVE = 8, F_HAS_COMM = 16, F_POSTED = 32 };

typedef struct {
    uint64_t key;
    uint64_t bytes;   /* persistent send: bytes per MPI_Start; F_POSTED: posted size */
    MPI_Comm comm;    /* receive: communicator, to translate MPI_SOURCE */
    int32_t peer;     /* world rank if known at post time, else -1 */
    int16_t call;     /* call id the operation's bytes are attributed to */
    uint8_t used;
    uint8_t flags;
    uint32_t seq;     /* request: which registration of this handle value (see req_put) */
} ent_t;

typedef struct {
    ent_t *slots;
    size_t cap;  /* power of two, or 0 */
    size_t n;
} table_t;

static table_t g_reqs, g_msgs;  /* guarded by g_lock */
static uint32_t g_req_seq;     /* guarded by g_lock */
static size_t g_nreqs_hint;    /* racy copy of g_reqs.n for a lock-free fast path */

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static inline uint64_t req_key(MPI_Request r)
{
    uint64_t k = 0;
    memcpy(&k, &r, sizeof(r) < sizeof(k) ? sizeof(r) : sizeof(k));
    return k;
}

static inline uint64_t msg_key(MPI_Message m)
{
    uint64_t k = 0;
    memcpy(&k, &m, sizeof(m) < sizeof(k) ? sizeof(m) : sizeof(k));
    return k;
}

static ent_t *tab_find(table_t *t, uint64_t key)
{
    if (!t->n) return NULL;
    size_t mask = t->cap - 1, i = (size_t)mix64(key) & mask;
    while (t->slots[i].used) {
        if (t->slots[i].key == key) return &t->slots[i];
        i = (i + 1) & mask;
    }
    return NULL;
}

static int tab_grow(table_t *t)
{
    size_t ncap = t->cap ? t->cap * 2 : 1024;
    ent_t *ns = calloc(ncap, sizeof(ent_t));
    if (!ns) return -1;
    for (size_t j = 0; j < t->cap; j++) {
        if (!t->slots[j].used) continue;
        size_t i = (size_t)mix64(t->slots[j].key) & (ncap - 1);
        while (ns[i].used) i = (i + 1) & (ncap - 1);
        ns[i] = t->slots[j];
    }
    free(t->slots);
    t->slots = ns;
    t->cap = ncap;
    return 0;
}

/* Insert or overwrite (handles are reused by MPI after completion). */
static ent_t *tab_put(table_t *t, uint64_t key)
{
    if ((t->n + 1) * 2 > t->cap && tab_grow(t) != 0) return NULL;
    size_t mask = t->cap - 1, i = (size_t)mix64(key) & mask;
    while (t->slots[i].used) {
        if (t->slots[i].key == key) return &t->slots[i];
        i = (i + 1) & mask;
    }
    memset(&t->slots[i], 0, sizeof(ent_t));
    t->slots[i].used = 1;
    t->slots[i].key = key;
    t->n++;
    return &t->slots[i];
}

static void tab_del(table_t *t, ent_t *e)
{
    size_t mask = t->cap - 1, i = (size_t)(e - t->slots), j = i;
    t->slots[i].used = 0;
    t->n--;
    for (;;) {
        j = (j + 1) & mask;
        if (!t->slots[j].used) break;
        size_t k = (size_t)mix64(t->slots[j].key) & mask;
        /* leave slot j where it is if its home k lies cyclically in (i, j] */
        int stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            t->slots[i] = t->slots[j];
            t->slots[j].used = 0;
            i = j;
        }
    }
}

static inline void reqs_changed(void)
{
    __atomic_store_n(&g_nreqs_hint, g_reqs.n, __ATOMIC_RELAXED);
}

static inline int maybe_tracked(void)
{
    return __atomic_load_n(&g_nreqs_hint, __ATOMIC_RELAXED) != 0;
}

/* A new registration of request handle `req`, told apart from an earlier request with the
 * same handle value by its sequence number; caller holds g_lock. */
static ent_t *req_put(MPI_Request req)
{
    ent_t *e = tab_put(&g_reqs, req_key(req));
    if (e) e->seq = ++g_req_seq;
    return e;
}

/* A tracked request's entry as it stands before the completion call that may free it
 * (.used == 0: not tracked).  The call's thread records the completion from this copy: once
 * the library frees the handle, another thread's new request can get the same handle value
 * and register it before this thread takes g_lock again.  Caller holds g_lock. */
static ent_t req_snapshot(MPI_Request req)
{
    ent_t none = {0};
    if (req == MPI_REQUEST_NULL) return none;
    ent_t *e = tab_find(&g_reqs, req_key(req));
    return e ? *e : none;
}

/* Register a receive request; caller holds g_lock. */
static void track_recv(MPI_Request req, int call, MPI_Comm comm, int has_comm, int peer,
                       int persistent)
{
    if (req == MPI_REQUEST_NULL) return;
    ent_t *e = req_put(req);
    if (!e) return;
    e->flags = (uint8_t)(F_RECV | (persistent ? F_PERSIST : F_ACTIVE) | (has_comm ? F_HAS_COMM : 0));
    e->comm = comm;
    e->peer = peer;
    e->call = (int16_t)call;
    e->bytes = 0;
    reqs_changed();
}

/* MPI_Isendrecv(_replace): the receive half, counted with its posted size. */
__attribute__((unused)) static void track_recv_posted(MPI_Request req, int call, MPI_Comm comm,
                                                      int peer, uint64_t bytes)
{
    if (req == MPI_REQUEST_NULL) return;
    ent_t *e = req_put(req);
    if (!e) return;
    e->flags = F_RECV | F_ACTIVE | F_HAS_COMM | F_POSTED;
    e->comm = comm;
    e->peer = peer;
    e->call = (int16_t)call;
    e->bytes = bytes;
    reqs_changed();
}

/* The request whose entry was `saved` (req_snapshot) before the completion call has
 * completed with status `st`; `t` is its share of the completion call's time.  Its entry
 * goes (a persistent one turns inactive) unless the handle now belongs to a newer request.
 * Caller holds g_lock. */
static void complete_req(const ent_t *saved, const MPI_Status *st, double t)
{
    if (!saved->used) return;
    const ent_t *e = saved;
    if ((e->flags & F_RECV) && (e->flags & F_POSTED)) {
        /* only the source may be taken from this status, and only if unknown */
        int peer = e->peer;
        if (peer < 0 && st) peer = world_rank(e->comm, st->MPI_SOURCE);
        st_recv(peer, e->bytes, t);
        g_calls[e->call].bytes += e->bytes;
    } else if ((e->flags & F_RECV) && (e->flags & F_ACTIVE) && st && !status_cancelled(st)) {
        uint64_t b = status_bytes(st);
        int peer = e->peer;
        if (peer < 0 && (e->flags & F_HAS_COMM)) peer = world_rank(e->comm, st->MPI_SOURCE);
        if (st->MPI_SOURCE != MPI_PROC_NULL) st_recv(peer, b, t);
        g_calls[e->call].bytes += b;
    }
    ent_t *now = tab_find(&g_reqs, saved->key);
    if (!now || now->seq != saved->seq) return;
    if (now->flags & F_PERSIST) {
        now->flags &= (uint8_t)~F_ACTIVE;
    } else {
        tab_del(&g_reqs, now);
        reqs_changed();
    }
}

static void start_req(MPI_Request req, double t)
{
    ent_t *e = tab_find(&g_reqs, req_key(req));
    if (!e) return;
    e->flags |= F_ACTIVE;
    if (e->flags & F_PSEND) {
        st_sent(e->peer, e->bytes, t);
        g_calls[e->call].bytes += e->bytes;
    }
}

/* ------------------------------------------------------------------------ */
/* Report                                                                    */
/* ------------------------------------------------------------------------ */

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

static int mkdir_p(const char *dir)
{
    char buf[4096];
    size_t len = strlen(dir);
    if (len == 0 || len >= sizeof(buf)) return len == 0 ? 0 : -1;
    memcpy(buf, dir, len + 1);
    for (size_t i = 1; i <= len; i++) {
        if (buf[i] == '/' || buf[i] == '\0') {
            char c = buf[i];
            buf[i] = '\0';
            if (mkdir(buf, 0777) != 0 && errno != EEXIST) return -1;
            buf[i] = c;
        }
    }
    return 0;
}

/* Writes the report; caller holds g_lock (or is the only thread left). */
static void write_report(int finalized, double wall)
{
    const char *dir = getenv("MPISPLIT_PMPI_DIR");
    if (!dir || !*dir) dir = ".";
    if (mkdir_p(dir) != 0) {
        fprintf(stderr, "mpisplit_pmpi: cannot create %s: %s\n", dir, strerror(errno));
        return;
    }
    char path[4352], tmp[4400];
    snprintf(path, sizeof(path), "%s/pmpi-rank%d.json", dir, g_rank);
    snprintf(tmp, sizeof(tmp), "%s/.pmpi-rank%d.json.%ld.tmp", dir, g_rank, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) {
        fprintf(stderr, "mpisplit_pmpi: cannot write %s: %s\n", tmp, strerror(errno));
        return;
    }
    fprintf(f, "{\"format\":\"%s\",\"rank\":%d,\"size\":%d,\"host\":", PMPIS_FORMAT, g_rank,
            g_size);
    json_str(f, g_host);
    fprintf(f, ",\"pid\":%ld,\"finalized\":%s,\"wall_s\":%.9f,\n\"calls\":{", (long)getpid(),
            finalized ? "true" : "false", wall);
    int first = 1;
    for (int i = 0; i < N_CALLS; i++) {
        if (!g_calls[i].count && !g_calls[i].bytes) continue;
        fprintf(f, "%s\n  \"%s\":{\"count\":%llu,\"bytes\":%llu,\"time_s\":%.9f}",
                first ? "" : ",", call_names[i], (unsigned long long)g_calls[i].count,
                (unsigned long long)g_calls[i].bytes, g_calls[i].time_s);
        first = 0;
    }
    fputs("},\n\"peers\":{", f);
    first = 1;
    for (int p = 0; g_peers && p < g_size; p++) {
        const peerstat_t *s = &g_peers[p];
        if (!s->sent_messages && !s->recv_messages) continue;
        fprintf(f,
                "%s\n  \"%d\":{\"sent_messages\":%llu,\"sent_bytes\":%llu,"
                "\"recv_messages\":%llu,\"recv_bytes\":%llu,\"time_s\":%.9f}",
                first ? "" : ",", p, (unsigned long long)s->sent_messages,
                (unsigned long long)s->sent_bytes, (unsigned long long)s->recv_messages,
                (unsigned long long)s->recv_bytes, s->time_s);
        first = 0;
    }
    fputs("}}\n", f);
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        fprintf(stderr, "mpisplit_pmpi: cannot write %s: %s\n", path, strerror(errno));
        unlink(tmp);
        return;
    }
    g_written = 1;
}

/* Program exit without MPI_Finalize: write what we have, without MPI calls.
 * (Not in fork()ed children that inherited the state: the report is the parent's.) */
__attribute__((destructor)) static void pmpis_at_unload(void)
{
    if (!g_initialized || g_written || getpid() != g_pid) return;
    int locked = pthread_mutex_trylock(&g_lock) == 0;
    if (g_initialized && !g_written) write_report(0, now_s() - g_t_init);
    if (locked) unlock();
}

/* ------------------------------------------------------------------------ */
/* Init / Finalize                                                           */
/* ------------------------------------------------------------------------ */

static void on_init(double t0)
{
    int rank = 0, size = 0;
    PMPI_Comm_rank(MPI_COMM_WORLD, &rank);
    PMPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Group wg = MPI_GROUP_NULL;
    PMPI_Comm_group(MPI_COMM_WORLD, &wg);
    int kv = MPI_KEYVAL_INVALID;
    PMPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, xlate_delete, &kv, NULL);
    peerstat_t *peers = size > 0 ? calloc((size_t)size, sizeof(peerstat_t)) : NULL;

    lock();
    if (!g_initialized) {
        g_rank = rank;
        g_size = peers ? size : 0;
        g_peers = peers;
        peers = NULL;
        g_world_group = wg;
        g_keyval = kv;
        g_t_init = t0;
        g_pid = getpid();
        if (gethostname(g_host, sizeof(g_host) - 1) != 0) strcpy(g_host, "unknown");
        g_host[sizeof(g_host) - 1] = '\0';
        g_initialized = 1;
    }
    unlock();
    free(peers);
}

int MPI_Init(int *argc, char ***argv)
{
    double t0 = now_s();
    int rc = PMPI_Init(argc, argv);
    if (rc == MPI_SUCCESS) on_init(t0);
    return rc;
}

int MPI_Init_thread(int *argc, char ***argv, int required, int *provided)
{
    double t0 = now_s();
    int rc = PMPI_Init_thread(argc, argv, required, provided);
    if (rc == MPI_SUCCESS) on_init(t0);
    return rc;
}

int MPI_Finalize(void)
{
    double t = now_s();
    lock();
    if (g_initialized && !g_written) write_report(1, t - g_t_init);
    g_written = 1; /* also for a failed write: never retry from the destructor */
    unlock();
    if (g_world_group != MPI_GROUP_NULL) PMPI_Group_free(&g_world_group);
    return PMPI_Finalize();
}

/* ------------------------------------------------------------------------ */
/* Point-to-point                                                            */
/* ------------------------------------------------------------------------ */

#define TIMED(call) \
    double t0_ = now_s(); \
    int rc = call; \
    double dt_ = now_s() - t0_

/* Blocking sends: MPI_Send, MPI_Ssend, MPI_Rsend, MPI_Bsend (+ _c). */
#define DEF_SEND(NAME, CT)                                                        \
    int NAME(const void *buf, CT count, MPI_Datatype datatype, int dest, int tag, \
             MPI_Comm comm)                                                       \
    {                                                                             \
        TIMED(P##NAME(buf, count, datatype, dest, tag, comm));                    \
        uint64_t b = 0;                                                           \
        int peer = -1;                                                            \
        if (rc == MPI_SUCCESS && dest != MPI_PROC_NULL) {                         \
            b = nbytes(count, datatype);                                          \
            peer = world_rank(comm, dest);                                        \
        }                                                                         \
        lock();                                                                   \
        st_call(ID_##NAME, b, dt_);                                               \
        if (rc == MPI_SUCCESS && dest != MPI_PROC_NULL) st_sent(peer, b, dt_);         \
        unlock();                                                                 \
        return rc;                                                                \
    }

/* Nonblocking sends: the bytes are counted when the send is posted. */
#define DEF_ISEND(NAME, CT)                                                        \
    int NAME(const void *buf, CT count, MPI_Datatype datatype, int dest, int tag,  \
             MPI_Comm comm, MPI_Request *request)                                  \
    {                                                                              \
        TIMED(P##NAME(buf, count, datatype, dest, tag, comm, request));            \
        uint64_t b = 0;                                                            \
        int peer = -1;                                                             \
        if (rc == MPI_SUCCESS && dest != MPI_PROC_NULL) {                          \
            b = nbytes(count, datatype);                                           \
            peer = world_rank(comm, dest);                                         \
        }                                                                          \
        lock();                                                                    \
        st_call(ID_##NAME, b, dt_);                                                \
        if (rc == MPI_SUCCESS && dest != MPI_PROC_NULL) st_sent(peer, b, dt_);          \
        unlock();                                                                  \
        return rc;                                                                 \
    }

/* Persistent sends: bytes are counted at every MPI_Start(all). */
#define DEF_SEND_INIT(NAME, CT)                                                    \
    int NAME(const void *buf, CT count, MPI_Datatype datatype, int dest, int tag,  \
             MPI_Comm comm, MPI_Request *request)                                  \
    {                                                                              \
        TIMED(P##NAME(buf, count, datatype, dest, tag, comm, request));            \
        uint64_t b = 0;                                                            \
        int peer = -1;                                                             \
        if (rc == MPI_SUCCESS && dest != MPI_PROC_NULL) {                          \
            b = nbytes(count, datatype);                                           \
            peer = world_rank(comm, dest);                                         \
        }                                                                          \
        lock();                                                                    \
        st_call(ID_##NAME, 0, dt_);                                                \
        if (rc == MPI_SUCCESS && dest != MPI_PROC_NULL && *request != MPI_REQUEST_NULL) { \
            ent_t *e = req_put(*request);                                          \
            if (e) {                                                               \
                e->flags = F_PSEND | F_PERSIST;                                    \
                e->bytes = b;                                                      \
                e->peer = peer;                                                    \
                e->call = ID_##NAME;                                               \
                e->comm = comm;                                                    \
                reqs_changed();                                                    \
            }                                                                      \
        }                                                                          \
        unlock();                                                                  \
        return rc;                                                                 \
    }

#define DEF_RECV(NAME, CT)                                                          \
    int NAME(void *buf, CT count, MPI_Datatype datatype, int source, int tag,       \
             MPI_Comm comm, MPI_Status *status)                                     \
    {                                                                               \
        MPI_Status local_;                                                          \
        MPI_Status *st = (status == MPI_STATUS_IGNORE) ? &local_ : status;          \
        TIMED(P##NAME(buf, count, datatype, source, tag, comm, st));                \
        uint64_t b = 0;                                                             \
        int peer = -1, got = rc == MPI_SUCCESS && st->MPI_SOURCE != MPI_PROC_NULL;  \
        if (got) {                                                                  \
            b = status_bytes(st);                                                   \
            peer = world_rank(comm, st->MPI_SOURCE);                                \
        }                                                                           \
        lock();                                                                     \
        st_call(ID_##NAME, b, dt_);                                                 \
        if (got) st_recv(peer, b, dt_);                                             \
        unlock();                                                                   \
        return rc;                                                                  \
    }

#define DEF_IRECV(NAME, CT, PERSIST)                                                \
    int NAME(void *buf, CT count, MPI_Datatype datatype, int source, int tag,       \
             MPI_Comm comm, MPI_Request *request)                                   \
    {                                                                               \
        TIMED(P##NAME(buf, count, datatype, source, tag, comm, request));           \
        int peer = -1;                                                              \
        if (rc == MPI_SUCCESS && source != MPI_ANY_SOURCE) peer = world_rank(comm, source); \
        lock();                                                                     \
        st_call(ID_##NAME, 0, dt_);                                                 \
        if (rc == MPI_SUCCESS && source != MPI_PROC_NULL)                           \
            track_recv(*request, ID_##NAME, comm, 1, peer, PERSIST);                \
        unlock();                                                                   \
        return rc;                                                                  \
    }

#define DEF_MRECV(NAME, CT)                                                         \
    int NAME(void *buf, CT count, MPI_Datatype datatype, MPI_Message *message,      \
             MPI_Status *status)                                                    \
    {                                                                               \
        MPI_Message saved = *message;                                               \
        MPI_Status local_;                                                          \
        MPI_Status *st = (status == MPI_STATUS_IGNORE) ? &local_ : status;          \
        TIMED(P##NAME(buf, count, datatype, message, st));                          \
        int got = rc == MPI_SUCCESS && st->MPI_SOURCE != MPI_PROC_NULL;             \
        uint64_t b = got ? status_bytes(st) : 0;                                    \
        lock();                                                                     \
        int peer = -1;                                                              \
        ent_t *e = tab_find(&g_msgs, msg_key(saved));                               \
        if (e) {                                                                    \
            peer = e->peer;                                                         \
            tab_del(&g_msgs, e);                                                    \
        }                                                                           \
        st_call(ID_##NAME, b, dt_);                                                 \
        if (got) st_recv(peer, b, dt_);                                             \
        unlock();                                                                   \
        return rc;                                                                  \
    }

#define DEF_IMRECV(NAME, CT)                                                        \
    int NAME(void *buf, CT count, MPI_Datatype datatype, MPI_Message *message,      \
             MPI_Request *request)                                                  \
    {                                                                               \
        MPI_Message saved = *message;                                               \
        TIMED(P##NAME(buf, count, datatype, message, request));                     \
        lock();                                                                     \
        int peer = -1;                                                              \
        ent_t *e = tab_find(&g_msgs, msg_key(saved));                               \
        if (e) {                                                                    \
            peer = e->peer;                                                         \
            tab_del(&g_msgs, e);                                                    \
        }                                                                           \
        st_call(ID_##NAME, 0, dt_);                                                 \
        if (rc == MPI_SUCCESS && saved != MPI_MESSAGE_NO_PROC)                      \
            track_recv(*request, ID_##NAME, MPI_COMM_NULL, 0, peer, 0);             \
        unlock();                                                                   \
        return rc;                                                                  \
    }

#define DEF_SENDRECV(NAME, CT)                                                      \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, int dest,    \
             int sendtag, void *recvbuf, CT recvcount, MPI_Datatype recvtype,       \
             int source, int recvtag, MPI_Comm comm, MPI_Status *status)            \
    {                                                                               \
        MPI_Status local_;                                                          \
        MPI_Status *st = (status == MPI_STATUS_IGNORE) ? &local_ : status;          \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, dest, sendtag, recvbuf,         \
                      recvcount, recvtype, source, recvtag, comm, st));             \
        int ok = rc == MPI_SUCCESS;                                                 \
        int sent = ok && dest != MPI_PROC_NULL;                                     \
        int got = ok && st->MPI_SOURCE != MPI_PROC_NULL;                            \
        uint64_t sb = sent ? nbytes(sendcount, sendtype) : 0;                       \
        uint64_t rb = got ? status_bytes(st) : 0;                                   \
        int speer = sent ? world_rank(comm, dest) : -1;                             \
        int rpeer = got ? world_rank(comm, st->MPI_SOURCE) : -1;                    \
        lock();                                                                     \
        st_call(ID_##NAME, sb + rb, dt_);                                           \
        if (sent) st_sent(speer, sb, dt_ / (sent + got));                           \
        if (got) st_recv(rpeer, rb, dt_ / (sent + got));                            \
        unlock();                                                                   \
        return rc;                                                                  \
    }

#define DEF_SENDRECV_REPLACE(NAME, CT)                                              \
    int NAME(void *buf, CT count, MPI_Datatype datatype, int dest, int sendtag,     \
             int source, int recvtag, MPI_Comm comm, MPI_Status *status)            \
    {                                                                               \
        MPI_Status local_;                                                          \
        MPI_Status *st = (status == MPI_STATUS_IGNORE) ? &local_ : status;          \
        TIMED(P##NAME(buf, count, datatype, dest, sendtag, source, recvtag, comm, st)); \
        int ok = rc == MPI_SUCCESS;                                                 \
        int sent = ok && dest != MPI_PROC_NULL;                                     \
        int got = ok && st->MPI_SOURCE != MPI_PROC_NULL;                            \
        uint64_t sb = sent ? nbytes(count, datatype) : 0;                           \
        uint64_t rb = got ? status_bytes(st) : 0;                                   \
        int speer = sent ? world_rank(comm, dest) : -1;                             \
        int rpeer = got ? world_rank(comm, st->MPI_SOURCE) : -1;                    \
        lock();                                                                     \
        st_call(ID_##NAME, sb + rb, dt_);                                           \
        if (sent) st_sent(speer, sb, dt_ / (sent + got));                           \
        if (got) st_recv(rpeer, rb, dt_ / (sent + got));                            \
        unlock();                                                                   \
        return rc;                                                                  \
    }

#define DEF_ISENDRECV(NAME, CT)                                                     \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, int dest,    \
             int sendtag, void *recvbuf, CT recvcount, MPI_Datatype recvtype,       \
             int source, int recvtag, MPI_Comm comm, MPI_Request *request)          \
    {                                                                               \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, dest, sendtag, recvbuf,         \
                      recvcount, recvtype, source, recvtag, comm, request));        \
        int ok = rc == MPI_SUCCESS;                                                 \
        int sent = ok && dest != MPI_PROC_NULL;                                     \
        uint64_t sb = sent ? nbytes(sendcount, sendtype) : 0;                       \
        uint64_t rb_ = ok ? nbytes(recvcount, recvtype) : 0;                        \
        int speer = sent ? world_rank(comm, dest) : -1;                             \
        int rpeer = (ok && source != MPI_ANY_SOURCE) ? world_rank(comm, source) : -1; \
        lock();                                                                     \
        st_call(ID_##NAME, sb, dt_);                                                \
        if (sent) st_sent(speer, sb, dt_);                                          \
        if (ok && source != MPI_PROC_NULL)                                          \
            track_recv_posted(*request, ID_##NAME, comm, rpeer, rb_);               \
        unlock();                                                                   \
        return rc;                                                                  \
    }

#define DEF_ISENDRECV_REPLACE(NAME, CT)                                             \
    int NAME(void *buf, CT count, MPI_Datatype datatype, int dest, int sendtag,     \
             int source, int recvtag, MPI_Comm comm, MPI_Request *request)          \
    {                                                                               \
        TIMED(P##NAME(buf, count, datatype, dest, sendtag, source, recvtag, comm,   \
                      request));                                                    \
        int ok = rc == MPI_SUCCESS;                                                 \
        int sent = ok && dest != MPI_PROC_NULL;                                     \
        uint64_t sb = sent ? nbytes(count, datatype) : 0;                           \
        uint64_t rb_ = ok ? nbytes(count, datatype) : 0;                            \
        int speer = sent ? world_rank(comm, dest) : -1;                             \
        int rpeer = (ok && source != MPI_ANY_SOURCE) ? world_rank(comm, source) : -1; \
        lock();                                                                     \
        st_call(ID_##NAME, sb, dt_);                                                \
        if (sent) st_sent(speer, sb, dt_);                                          \
        if (ok && source != MPI_PROC_NULL)                                          \
            track_recv_posted(*request, ID_##NAME, comm, rpeer, rb_);               \
        unlock();                                                                   \
        return rc;                                                                  \
    }

DEF_SEND(MPI_Send, int)
DEF_SEND(MPI_Ssend, int)
DEF_SEND(MPI_Rsend, int)
DEF_SEND(MPI_Bsend, int)
DEF_ISEND(MPI_Isend, int)
DEF_ISEND(MPI_Issend, int)
DEF_ISEND(MPI_Irsend, int)
DEF_ISEND(MPI_Ibsend, int)
DEF_SEND_INIT(MPI_Send_init, int)
DEF_SEND_INIT(MPI_Ssend_init, int)
DEF_SEND_INIT(MPI_Rsend_init, int)
DEF_SEND_INIT(MPI_Bsend_init, int)
DEF_RECV(MPI_Recv, int)
DEF_IRECV(MPI_Irecv, int, 0)
DEF_IRECV(MPI_Recv_init, int, 1)
DEF_MRECV(MPI_Mrecv, int)
DEF_IMRECV(MPI_Imrecv, int)
DEF_SENDRECV(MPI_Sendrecv, int)
DEF_SENDRECV_REPLACE(MPI_Sendrecv_replace, int)
#if PMPIS_LARGE_COUNT
DEF_SEND(MPI_Send_c, MPI_Count)
DEF_SEND(MPI_Ssend_c, MPI_Count)
DEF_SEND(MPI_Rsend_c, MPI_Count)
DEF_SEND(MPI_Bsend_c, MPI_Count)
DEF_ISEND(MPI_Isend_c, MPI_Count)
DEF_ISEND(MPI_Issend_c, MPI_Count)
DEF_ISEND(MPI_Irsend_c, MPI_Count)
DEF_ISEND(MPI_Ibsend_c, MPI_Count)
DEF_SEND_INIT(MPI_Send_init_c, MPI_Count)
DEF_SEND_INIT(MPI_Ssend_init_c, MPI_Count)
DEF_SEND_INIT(MPI_Rsend_init_c, MPI_Count)
DEF_SEND_INIT(MPI_Bsend_init_c, MPI_Count)
DEF_RECV(MPI_Recv_c, MPI_Count)
DEF_IRECV(MPI_Irecv_c, MPI_Count, 0)
DEF_IRECV(MPI_Recv_init_c, MPI_Count, 1)
DEF_MRECV(MPI_Mrecv_c, MPI_Count)
DEF_IMRECV(MPI_Imrecv_c, MPI_Count)
DEF_SENDRECV(MPI_Sendrecv_c, MPI_Count)
DEF_SENDRECV_REPLACE(MPI_Sendrecv_replace_c, MPI_Count)
DEF_ISENDRECV(MPI_Isendrecv_c, MPI_Count)
DEF_ISENDRECV_REPLACE(MPI_Isendrecv_replace_c, MPI_Count)
#endif
/* MPI 4.0 calls that some MPI 3.1 libraries have too (Open MPI 5.0): wrapped wherever the
 * library has them (CMake checks; PMPIS_HAVE_ISENDRECV), else mpi4py's calls go uncounted. */
#if PMPIS_HAVE_ISENDRECV
DEF_ISENDRECV(MPI_Isendrecv, int)
DEF_ISENDRECV_REPLACE(MPI_Isendrecv_replace, int)
#endif

/* ------------------------------------------------------------------------ */
/* Probes                                                                    */
/* ------------------------------------------------------------------------ */

int MPI_Probe(int source, int tag, MPI_Comm comm, MPI_Status *status)
{
    TIMED(PMPI_Probe(source, tag, comm, status));
    lock();
    st_call(ID_MPI_Probe, 0, dt_);
    unlock();
    return rc;
}

int MPI_Iprobe(int source, int tag, MPI_Comm comm, int *flag, MPI_Status *status)
{
    TIMED(PMPI_Iprobe(source, tag, comm, flag, status));
    lock();
    st_call(ID_MPI_Iprobe, 0, dt_);
    unlock();
    return rc;
}

/* Remember which world rank a matched message comes from (MPI_Mrecv has no comm). */
static void note_message(int rc, MPI_Comm comm, MPI_Message msg, const MPI_Status *st)
{
    if (rc != MPI_SUCCESS || msg == MPI_MESSAGE_NULL || msg == MPI_MESSAGE_NO_PROC) return;
    int peer = world_rank(comm, st->MPI_SOURCE);
    lock();
    ent_t *e = tab_put(&g_msgs, msg_key(msg));
    if (e) {
        e->peer = peer;
        e->flags = F_RECV;
    }
    unlock();
}

int MPI_Mprobe(int source, int tag, MPI_Comm comm, MPI_Message *message, MPI_Status *status)
{
    MPI_Status local_;
    MPI_Status *st = (status == MPI_STATUS_IGNORE) ? &local_ : status;
    TIMED(PMPI_Mprobe(source, tag, comm, message, st));
    note_message(rc, comm, *message, st);
    lock();
    st_call(ID_MPI_Mprobe, 0, dt_);
    unlock();
    return rc;
}

int MPI_Improbe(int source, int tag, MPI_Comm comm, int *flag, MPI_Message *message,
                MPI_Status *status)
{
    MPI_Status local_;
    MPI_Status *st = (status == MPI_STATUS_IGNORE) ? &local_ : status;
    TIMED(PMPI_Improbe(source, tag, comm, flag, message, st));
    if (rc == MPI_SUCCESS && *flag) note_message(rc, comm, *message, st);
    lock();
    st_call(ID_MPI_Improbe, 0, dt_);
    unlock();
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Completion                                                                */
/* ------------------------------------------------------------------------ */

#define STACK_REQS 128

/* Snapshots of the requests' entries (completion frees the handles) when any request
 * might be tracked; returns 1 when statuses are needed. */
static int save_requests(int n, const MPI_Request *reqs, ent_t **saved, ent_t *stackbuf)
{
    *saved = NULL;
    if (n <= 0 || !maybe_tracked()) return 0;
    ent_t *s = n <= STACK_REQS ? stackbuf : malloc(sizeof(ent_t) * (size_t)n);
    if (!s) return 0;
    int any = 0;
    lock();
    for (int i = 0; i < n; i++) {
        s[i] = req_snapshot(reqs[i]);
        any |= s[i].used;
    }
    unlock();
    if (!any) {
        if (s != stackbuf) free(s);
        return 0;
    }
    *saved = s;
    return 1;
}

static MPI_Status *status_array(int n, MPI_Status *user, MPI_Status *stackbuf)
{
    if (user != MPI_STATUSES_IGNORE) return user;
    if (n <= STACK_REQS) return stackbuf;
    return malloc(sizeof(MPI_Status) * (size_t)n);
}

/* The entry of one request before its completion call (see req_snapshot). */
static ent_t save_request(MPI_Request req)
{
    ent_t none = {0};
    if (!maybe_tracked()) return none;
    lock();
    ent_t saved = req_snapshot(req);
    unlock();
    return saved;
}

int MPI_Wait(MPI_Request *request, MPI_Status *status)
{
    ent_t saved = save_request(*request);
    MPI_Status local_;
    MPI_Status *st = (status == MPI_STATUS_IGNORE) ? &local_ : status;
    TIMED(PMPI_Wait(request, st));
    lock();
    st_call(ID_MPI_Wait, 0, dt_);
    if (rc == MPI_SUCCESS) complete_req(&saved, st, dt_);
    unlock();
    return rc;
}

int MPI_Test(MPI_Request *request, int *flag, MPI_Status *status)
{
    ent_t saved = save_request(*request);
    MPI_Status local_;
    MPI_Status *st = (status == MPI_STATUS_IGNORE) ? &local_ : status;
    TIMED(PMPI_Test(request, flag, st));
    lock();
    st_call(ID_MPI_Test, 0, dt_);
    if (rc == MPI_SUCCESS && *flag) complete_req(&saved, st, dt_);
    unlock();
    return rc;
}

int MPI_Waitany(int count, MPI_Request array_of_requests[], int *indx, MPI_Status *status)
{
    ent_t sbuf[STACK_REQS], *saved;
    int need = save_requests(count, array_of_requests, &saved, sbuf);
    MPI_Status local_;
    MPI_Status *st = (status == MPI_STATUS_IGNORE) ? &local_ : status;
    TIMED(PMPI_Waitany(count, array_of_requests, indx, st));
    lock();
    st_call(ID_MPI_Waitany, 0, dt_);
    if (need && rc == MPI_SUCCESS && *indx != MPI_UNDEFINED)
        complete_req(&saved[*indx], st, dt_);
    unlock();
    if (saved && saved != sbuf) free(saved);
    return rc;
}

int MPI_Testany(int count, MPI_Request array_of_requests[], int *indx, int *flag,
                MPI_Status *status)
{
    ent_t sbuf[STACK_REQS], *saved;
    int need = save_requests(count, array_of_requests, &saved, sbuf);
    MPI_Status local_;
    MPI_Status *st = (status == MPI_STATUS_IGNORE) ? &local_ : status;
    TIMED(PMPI_Testany(count, array_of_requests, indx, flag, st));
    lock();
    st_call(ID_MPI_Testany, 0, dt_);
    if (need && rc == MPI_SUCCESS && *flag && *indx != MPI_UNDEFINED)
        complete_req(&saved[*indx], st, dt_);
    unlock();
    if (saved && saved != sbuf) free(saved);
    return rc;
}

/* Waitall/Testall: on MPI_ERR_IN_STATUS only entries whose MPI_ERROR is
 * MPI_SUCCESS have completed.  The call's time `t` is shared evenly by its requests. */
static void complete_all(int n, const ent_t *saved, const MPI_Status *st, int rc,
                         double t)
{
    for (int i = 0; i < n; i++) {
        if (rc == MPI_SUCCESS || (rc == MPI_ERR_IN_STATUS && st[i].MPI_ERROR == MPI_SUCCESS))
            complete_req(&saved[i], &st[i], t / n);
    }
}

int MPI_Waitall(int count, MPI_Request array_of_requests[], MPI_Status *array_of_statuses)
{
    ent_t sbuf[STACK_REQS], *saved;
    MPI_Status stbuf[STACK_REQS];
    int need = save_requests(count, array_of_requests, &saved, sbuf);
    MPI_Status *st = need ? status_array(count, array_of_statuses, stbuf) : array_of_statuses;
    if (need && !st) { need = 0; st = array_of_statuses; }
    TIMED(PMPI_Waitall(count, array_of_requests, st));
    lock();
    st_call(ID_MPI_Waitall, 0, dt_);
    if (need) complete_all(count, saved, st, rc, dt_);
    unlock();
    if (saved && saved != sbuf) free(saved);
    if (need && st != array_of_statuses && st != stbuf) free(st);
    return rc;
}

int MPI_Testall(int count, MPI_Request array_of_requests[], int *flag,
                MPI_Status *array_of_statuses)
{
    ent_t sbuf[STACK_REQS], *saved;
    MPI_Status stbuf[STACK_REQS];
    int need = save_requests(count, array_of_requests, &saved, sbuf);
    MPI_Status *st = need ? status_array(count, array_of_statuses, stbuf) : array_of_statuses;
    if (need && !st) { need = 0; st = array_of_statuses; }
    TIMED(PMPI_Testall(count, array_of_requests, flag, st));
    lock();
    st_call(ID_MPI_Testall, 0, dt_);
    if (need && (rc != MPI_SUCCESS || *flag)) complete_all(count, saved, st, rc, dt_);
    unlock();
    if (saved && saved != sbuf) free(saved);
    if (need && st != array_of_statuses && st != stbuf) free(st);
    return rc;
}

static void complete_some(int outcount, const int *indices, const ent_t *saved,
                          const MPI_Status *st, int rc, double t)
{
    if (outcount == MPI_UNDEFINED) return;
    for (int k = 0; k < outcount; k++) {
        if (rc == MPI_SUCCESS || (rc == MPI_ERR_IN_STATUS && st[k].MPI_ERROR == MPI_SUCCESS))
            complete_req(&saved[indices[k]], &st[k], t / outcount);
    }
}

int MPI_Waitsome(int incount, MPI_Request array_of_requests[], int *outcount,
                 int array_of_indices[], MPI_Status *array_of_statuses)
{
    ent_t sbuf[STACK_REQS], *saved;
    MPI_Status stbuf[STACK_REQS];
    int need = save_requests(incount, array_of_requests, &saved, sbuf);
    MPI_Status *st = need ? status_array(incount, array_of_statuses, stbuf) : array_of_statuses;
    if (need && !st) { need = 0; st = array_of_statuses; }
    TIMED(PMPI_Waitsome(incount, array_of_requests, outcount, array_of_indices, st));
    lock();
    st_call(ID_MPI_Waitsome, 0, dt_);
    if (need && (rc == MPI_SUCCESS || rc == MPI_ERR_IN_STATUS))
        complete_some(*outcount, array_of_indices, saved, st, rc, dt_);
    unlock();
    if (saved && saved != sbuf) free(saved);
    if (need && st != array_of_statuses && st != stbuf) free(st);
    return rc;
}

int MPI_Testsome(int incount, MPI_Request array_of_requests[], int *outcount,
                 int array_of_indices[], MPI_Status *array_of_statuses)
{
    ent_t sbuf[STACK_REQS], *saved;
    MPI_Status stbuf[STACK_REQS];
    int need = save_requests(incount, array_of_requests, &saved, sbuf);
    MPI_Status *st = need ? status_array(incount, array_of_statuses, stbuf) : array_of_statuses;
    if (need && !st) { need = 0; st = array_of_statuses; }
    TIMED(PMPI_Testsome(incount, array_of_requests, outcount, array_of_indices, st));
    lock();
    st_call(ID_MPI_Testsome, 0, dt_);
    if (need && (rc == MPI_SUCCESS || rc == MPI_ERR_IN_STATUS))
        complete_some(*outcount, array_of_indices, saved, st, rc, dt_);
    unlock();
    if (saved && saved != sbuf) free(saved);
    if (need && st != array_of_statuses && st != stbuf) free(st);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Persistent requests                                                       */
/* ------------------------------------------------------------------------ */

int MPI_Start(MPI_Request *request)
{
    MPI_Request r = *request;
    TIMED(PMPI_Start(request));
    lock();
    st_call(ID_MPI_Start, 0, dt_);
    if (rc == MPI_SUCCESS && maybe_tracked()) start_req(r, dt_);
    unlock();
    return rc;
}

int MPI_Startall(int count, MPI_Request array_of_requests[])
{
    TIMED(PMPI_Startall(count, array_of_requests));
    lock();
    st_call(ID_MPI_Startall, 0, dt_);
    if (rc == MPI_SUCCESS && maybe_tracked())
        for (int i = 0; i < count; i++) start_req(array_of_requests[i], dt_ / count);
    unlock();
    return rc;
}

int MPI_Request_free(MPI_Request *request)
{
    ent_t saved = save_request(*request);
    TIMED(PMPI_Request_free(request));
    lock();
    st_call(ID_MPI_Request_free, 0, dt_);
    if (rc == MPI_SUCCESS && saved.used) {
        ent_t *e = tab_find(&g_reqs, saved.key);
        if (e && e->seq == saved.seq) {  /* not a newer request's */
            tab_del(&g_reqs, e);
            reqs_changed();
        }
    }
    unlock();
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Collectives                                                               */
/* `bytes` = the data this rank hands to the collective (see README).        */
/* ------------------------------------------------------------------------ */

static inline void rec_coll(int id, int rc, uint64_t bytes, double t)
{
    lock();
    st_call(id, rc == MPI_SUCCESS ? bytes : 0, t);
    unlock();
}

#define SUM_COUNTS(T)                                            \
    static uint64_t sum_counts_##T(const T *c, int n)            \
    {                                                            \
        uint64_t s = 0;                                          \
        if (!c) return 0;                                        \
        for (int i = 0; i < n; i++) if (c[i] > 0) s += (uint64_t)c[i]; \
        return s;                                                \
    }
SUM_COUNTS(int)
#if PMPIS_LARGE_COUNT
SUM_COUNTS(MPI_Count)
#endif

int MPI_Barrier(MPI_Comm comm)
{
    TIMED(PMPI_Barrier(comm));
    rec_coll(ID_MPI_Barrier, rc, 0, dt_);
    return rc;
}

int MPI_Ibarrier(MPI_Comm comm, MPI_Request *request)
{
    TIMED(PMPI_Ibarrier(comm, request));
    rec_coll(ID_MPI_Ibarrier, rc, 0, dt_);
    return rc;
}

/* -- byte helpers (called only after a successful call) -- */
static uint64_t bcast_bytes(MPI_Count count, MPI_Datatype dt, int root)
{
    return root == MPI_PROC_NULL ? 0 : nbytes(count, dt);
}

static uint64_t reduce_bytes(MPI_Count count, MPI_Datatype dt, int root, MPI_Comm comm)
{
    (void)comm;
    return root == MPI_PROC_NULL ? 0 : nbytes(count, dt);
}

static uint64_t gather_bytes(const void *sendbuf, MPI_Count sendcount, MPI_Datatype sendtype,
                             MPI_Count recvcount, MPI_Datatype recvtype, int root)
{
    if (root == MPI_PROC_NULL || root == MPI_ROOT) return 0;
    if (sendbuf == MPI_IN_PLACE) return nbytes(recvcount, recvtype);
    return nbytes(sendcount, sendtype);
}

static uint64_t allgather_bytes(const void *sendbuf, MPI_Count sendcount, MPI_Datatype sendtype,
                                MPI_Count recvcount, MPI_Datatype recvtype)
{
    if (sendbuf == MPI_IN_PLACE) return nbytes(recvcount, recvtype);
    return nbytes(sendcount, sendtype);
}

#define DEF_BCAST(NAME, CT)                                                          \
    int NAME(void *buffer, CT count, MPI_Datatype datatype, int root, MPI_Comm comm) \
    {                                                                                \
        TIMED(P##NAME(buffer, count, datatype, root, comm));                         \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? bcast_bytes(count, datatype, root) : 0, dt_); \
        return rc;                                                                   \
    }
#define DEF_IBCAST(NAME, CT)                                                         \
    int NAME(void *buffer, CT count, MPI_Datatype datatype, int root, MPI_Comm comm, \
             MPI_Request *request)                                                   \
    {                                                                                \
        TIMED(P##NAME(buffer, count, datatype, root, comm, request));                \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? bcast_bytes(count, datatype, root) : 0, dt_); \
        return rc;                                                                   \
    }

#define DEF_REDUCE(NAME, CT)                                                         \
    int NAME(const void *sendbuf, void *recvbuf, CT count, MPI_Datatype datatype,    \
             MPI_Op op, int root, MPI_Comm comm)                                     \
    {                                                                                \
        TIMED(P##NAME(sendbuf, recvbuf, count, datatype, op, root, comm));           \
        rec_coll(ID_##NAME, rc,                                                      \
                 rc == MPI_SUCCESS ? reduce_bytes(count, datatype, root, comm) : 0, dt_); \
        return rc;                                                                   \
    }
#define DEF_IREDUCE(NAME, CT)                                                        \
    int NAME(const void *sendbuf, void *recvbuf, CT count, MPI_Datatype datatype,    \
             MPI_Op op, int root, MPI_Comm comm, MPI_Request *request)               \
    {                                                                                \
        TIMED(P##NAME(sendbuf, recvbuf, count, datatype, op, root, comm, request));  \
        rec_coll(ID_##NAME, rc,                                                      \
                 rc == MPI_SUCCESS ? reduce_bytes(count, datatype, root, comm) : 0, dt_); \
        return rc;                                                                   \
    }

#define DEF_ALLREDUCE(NAME, CT)                                                      \
    int NAME(const void *sendbuf, void *recvbuf, CT count, MPI_Datatype datatype,    \
             MPI_Op op, MPI_Comm comm)                                               \
    {                                                                                \
        TIMED(P##NAME(sendbuf, recvbuf, count, datatype, op, comm));                 \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? nbytes(count, datatype) : 0, dt_); \
        return rc;                                                                   \
    }
#define DEF_IALLREDUCE(NAME, CT)                                                     \
    int NAME(const void *sendbuf, void *recvbuf, CT count, MPI_Datatype datatype,    \
             MPI_Op op, MPI_Comm comm, MPI_Request *request)                         \
    {                                                                                \
        TIMED(P##NAME(sendbuf, recvbuf, count, datatype, op, comm, request));        \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? nbytes(count, datatype) : 0, dt_); \
        return rc;                                                                   \
    }

#define DEF_GATHER(NAME, CT)                                                         \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             CT recvcount, MPI_Datatype recvtype, int root, MPI_Comm comm)           \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, root, comm)); \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? gather_bytes(sendbuf, sendcount, sendtype, \
                                                   recvcount, recvtype, root) : 0, dt_); \
        return rc;                                                                   \
    }
#define DEF_IGATHER(NAME, CT)                                                        \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             CT recvcount, MPI_Datatype recvtype, int root, MPI_Comm comm,           \
             MPI_Request *request)                                                   \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, root, comm, \
                      request));                                                     \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? gather_bytes(sendbuf, sendcount, sendtype, \
                                                   recvcount, recvtype, root) : 0, dt_); \
        return rc;                                                                   \
    }

/* Gatherv: the own contribution (recvcounts[rank] at an MPI_IN_PLACE root). */
#define GATHERV_BYTES(CT)                                                            \
    ((root == MPI_PROC_NULL || root == MPI_ROOT) ? 0 :                               \
     (sendbuf == MPI_IN_PLACE) ? (recvcounts ? nbytes(recvcounts[comm_rank(comm)], recvtype) : 0) \
                               : nbytes(sendcount, sendtype))
#define DEF_GATHERV(NAME, CT, DT)                                                    \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             const CT recvcounts[], const DT displs[], MPI_Datatype recvtype, int root, \
             MPI_Comm comm)                                                          \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcounts, displs, recvtype, \
                      root, comm));                                                  \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? GATHERV_BYTES(CT) : 0, dt_);     \
        return rc;                                                                   \
    }
#define DEF_IGATHERV(NAME, CT, DT)                                                   \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             const CT recvcounts[], const DT displs[], MPI_Datatype recvtype, int root, \
             MPI_Comm comm, MPI_Request *request)                                    \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcounts, displs, recvtype, \
                      root, comm, request));                                         \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? GATHERV_BYTES(CT) : 0, dt_);     \
        return rc;                                                                   \
    }

/* Scatter(v): the whole send buffer at the root, 0 elsewhere. */
#define SCATTER_BYTES                                                                \
    (is_root(comm, root) ? nbytes(sendcount, sendtype) * (uint64_t)comm_nprocs(comm) : 0)
#define DEF_SCATTER(NAME, CT)                                                        \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             CT recvcount, MPI_Datatype recvtype, int root, MPI_Comm comm)           \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, root, comm)); \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? SCATTER_BYTES : 0, dt_);         \
        return rc;                                                                   \
    }
#define DEF_ISCATTER(NAME, CT)                                                       \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             CT recvcount, MPI_Datatype recvtype, int root, MPI_Comm comm,           \
             MPI_Request *request)                                                   \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, root, comm, \
                      request));                                                     \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? SCATTER_BYTES : 0, dt_);         \
        return rc;                                                                   \
    }

#define SCATTERV_BYTES(CT)                                                           \
    (is_root(comm, root)                                                             \
         ? sum_counts_##CT(sendcounts, comm_nprocs(comm)) * type_bytes(sendtype) : 0)
#define DEF_SCATTERV(NAME, CT, DT)                                                   \
    int NAME(const void *sendbuf, const CT sendcounts[], const DT displs[],          \
             MPI_Datatype sendtype, void *recvbuf, CT recvcount, MPI_Datatype recvtype, \
             int root, MPI_Comm comm)                                                \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcounts, displs, sendtype, recvbuf, recvcount, recvtype, \
                      root, comm));                                                  \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? SCATTERV_BYTES(CT) : 0, dt_);    \
        return rc;                                                                   \
    }
#define DEF_ISCATTERV(NAME, CT, DT)                                                  \
    int NAME(const void *sendbuf, const CT sendcounts[], const DT displs[],          \
             MPI_Datatype sendtype, void *recvbuf, CT recvcount, MPI_Datatype recvtype, \
             int root, MPI_Comm comm, MPI_Request *request)                          \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcounts, displs, sendtype, recvbuf, recvcount, recvtype, \
                      root, comm, request));                                         \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? SCATTERV_BYTES(CT) : 0, dt_);    \
        return rc;                                                                   \
    }

#define DEF_ALLGATHER(NAME, CT)                                                      \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             CT recvcount, MPI_Datatype recvtype, MPI_Comm comm)                     \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm)); \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? allgather_bytes(sendbuf, sendcount, \
                                                   sendtype, recvcount, recvtype) : 0, dt_); \
        return rc;                                                                   \
    }
#define DEF_IALLGATHER(NAME, CT)                                                     \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             CT recvcount, MPI_Datatype recvtype, MPI_Comm comm, MPI_Request *request) \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm, \
                      request));                                                     \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? allgather_bytes(sendbuf, sendcount, \
                                                   sendtype, recvcount, recvtype) : 0, dt_); \
        return rc;                                                                   \
    }

#define ALLGATHERV_BYTES                                                             \
    ((sendbuf == MPI_IN_PLACE) ? (recvcounts ? nbytes(recvcounts[comm_rank(comm)], recvtype) : 0) \
                               : nbytes(sendcount, sendtype))
#define DEF_ALLGATHERV(NAME, CT, DT)                                                 \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             const CT recvcounts[], const DT displs[], MPI_Datatype recvtype,        \
             MPI_Comm comm)                                                          \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcounts, displs, recvtype, \
                      comm));                                                        \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? ALLGATHERV_BYTES : 0, dt_);      \
        return rc;                                                                   \
    }
#define DEF_IALLGATHERV(NAME, CT, DT)                                                \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             const CT recvcounts[], const DT displs[], MPI_Datatype recvtype,        \
             MPI_Comm comm, MPI_Request *request)                                    \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcounts, displs, recvtype, \
                      comm, request));                                               \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? ALLGATHERV_BYTES : 0, dt_);      \
        return rc;                                                                   \
    }

#define ALLTOALL_BYTES                                                               \
    ((sendbuf == MPI_IN_PLACE ? nbytes(recvcount, recvtype) : nbytes(sendcount, sendtype)) \
     * (uint64_t)comm_nprocs(comm))
#define DEF_ALLTOALL(NAME, CT)                                                       \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             CT recvcount, MPI_Datatype recvtype, MPI_Comm comm)                     \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm)); \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? ALLTOALL_BYTES : 0, dt_);        \
        return rc;                                                                   \
    }
#define DEF_IALLTOALL(NAME, CT)                                                      \
    int NAME(const void *sendbuf, CT sendcount, MPI_Datatype sendtype, void *recvbuf, \
             CT recvcount, MPI_Datatype recvtype, MPI_Comm comm, MPI_Request *request) \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm, \
                      request));                                                     \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? ALLTOALL_BYTES : 0, dt_);        \
        return rc;                                                                   \
    }

#define ALLTOALLV_BYTES(CT)                                                          \
    ((sendbuf == MPI_IN_PLACE)                                                       \
         ? sum_counts_##CT(recvcounts, comm_nprocs(comm)) * type_bytes(recvtype)     \
         : sum_counts_##CT(sendcounts, comm_nprocs(comm)) * type_bytes(sendtype))
#define DEF_ALLTOALLV(NAME, CT, DT)                                                  \
    int NAME(const void *sendbuf, const CT sendcounts[], const DT sdispls[],         \
             MPI_Datatype sendtype, void *recvbuf, const CT recvcounts[],            \
             const DT rdispls[], MPI_Datatype recvtype, MPI_Comm comm)               \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls, \
                      recvtype, comm));                                              \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? ALLTOALLV_BYTES(CT) : 0, dt_);   \
        return rc;                                                                   \
    }
#define DEF_IALLTOALLV(NAME, CT, DT)                                                 \
    int NAME(const void *sendbuf, const CT sendcounts[], const DT sdispls[],         \
             MPI_Datatype sendtype, void *recvbuf, const CT recvcounts[],            \
             const DT rdispls[], MPI_Datatype recvtype, MPI_Comm comm,               \
             MPI_Request *request)                                                   \
    {                                                                                \
        TIMED(P##NAME(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls, \
                      recvtype, comm, request));                                     \
        rec_coll(ID_##NAME, rc, rc == MPI_SUCCESS ? ALLTOALLV_BYTES(CT) : 0, dt_);   \
        return rc;                                                                   \
    }

DEF_BCAST(MPI_Bcast, int)
DEF_IBCAST(MPI_Ibcast, int)
DEF_REDUCE(MPI_Reduce, int)
DEF_IREDUCE(MPI_Ireduce, int)
DEF_ALLREDUCE(MPI_Allreduce, int)
DEF_IALLREDUCE(MPI_Iallreduce, int)
DEF_GATHER(MPI_Gather, int)
DEF_IGATHER(MPI_Igather, int)
DEF_GATHERV(MPI_Gatherv, int, int)
DEF_IGATHERV(MPI_Igatherv, int, int)
DEF_SCATTER(MPI_Scatter, int)
DEF_ISCATTER(MPI_Iscatter, int)
DEF_SCATTERV(MPI_Scatterv, int, int)
DEF_ISCATTERV(MPI_Iscatterv, int, int)
DEF_ALLGATHER(MPI_Allgather, int)
DEF_IALLGATHER(MPI_Iallgather, int)
DEF_ALLGATHERV(MPI_Allgatherv, int, int)
DEF_IALLGATHERV(MPI_Iallgatherv, int, int)
DEF_ALLTOALL(MPI_Alltoall, int)
DEF_IALLTOALL(MPI_Ialltoall, int)
DEF_ALLTOALLV(MPI_Alltoallv, int, int)
DEF_IALLTOALLV(MPI_Ialltoallv, int, int)
#if PMPIS_LARGE_COUNT
DEF_BCAST(MPI_Bcast_c, MPI_Count)
DEF_IBCAST(MPI_Ibcast_c, MPI_Count)
DEF_REDUCE(MPI_Reduce_c, MPI_Count)
DEF_IREDUCE(MPI_Ireduce_c, MPI_Count)
DEF_ALLREDUCE(MPI_Allreduce_c, MPI_Count)
DEF_IALLREDUCE(MPI_Iallreduce_c, MPI_Count)
DEF_GATHER(MPI_Gather_c, MPI_Count)
DEF_IGATHER(MPI_Igather_c, MPI_Count)
DEF_GATHERV(MPI_Gatherv_c, MPI_Count, MPI_Aint)
DEF_IGATHERV(MPI_Igatherv_c, MPI_Count, MPI_Aint)
DEF_SCATTER(MPI_Scatter_c, MPI_Count)
DEF_ISCATTER(MPI_Iscatter_c, MPI_Count)
DEF_SCATTERV(MPI_Scatterv_c, MPI_Count, MPI_Aint)
DEF_ISCATTERV(MPI_Iscatterv_c, MPI_Count, MPI_Aint)
DEF_ALLGATHER(MPI_Allgather_c, MPI_Count)
DEF_IALLGATHER(MPI_Iallgather_c, MPI_Count)
DEF_ALLGATHERV(MPI_Allgatherv_c, MPI_Count, MPI_Aint)
DEF_IALLGATHERV(MPI_Iallgatherv_c, MPI_Count, MPI_Aint)
DEF_ALLTOALL(MPI_Alltoall_c, MPI_Count)
DEF_IALLTOALL(MPI_Ialltoall_c, MPI_Count)
DEF_ALLTOALLV(MPI_Alltoallv_c, MPI_Count, MPI_Aint)
DEF_IALLTOALLV(MPI_Ialltoallv_c, MPI_Count, MPI_Aint)
#endif
