/* The repo backfill's and event stream's hot paths in compiled code, each the fast path of a Python
   reference: parse() of snapshot.read_snapshot (a whole CAR to records and blocks), copy_lines() of the
   store (the records' COPY lines, their atproto JSON made from their blocks), staged_lines() of a
   spooled snapshot's staged_blocks (a batch of blocks' COPY lines, the same JSON), walk() of the
   snapshot's MST walk for a CAR too big to parse whole (with sections() of car.CarReader, which reads
   it as it streams, and subtrees() of the node decode that gathers its nodes), blocks() of
   car.read_blocks and lookup() of mst.lookup (a stream event's CAR slice, its ops' MST lookups); each
   has its own comment below.

   parse(car, data_root) checks the CAR's header is the usual one (one root, the commit: `head`), reads
   its sections, checks every block against its CID, finds the commit, asks `data_root(commit block)`
   for the MST's root link, walks the MST in key order and returns
       (head, records, blocks)
   records: (collection, rkey, CID text, binary CID) of every MST entry, in key order;
   blocks:  (binary CID, block) of every block but the commit and the MST nodes reached, in CAR order
            (the reference lists unreached node-shaped blocks last; callers look blocks up by CID).

   It takes only what atproto hosts write: the usual header, CIDv1 sha2-256 DAG-CBOR or raw links, one- to three-byte
   section lengths, canonical MST nodes, record keys that pass their syntax. On anything else (a bad
   hash, a missing or malformed node, keys out of order or on the wrong layer, an invalid key, a block
   repeated, a record whose block is also a node) it returns None, and the caller reads the same bytes
   through the Python reference path (atproto.car, atproto.repo, atproto.mst), which decides and words
   the error. So both paths accept the same repos alike: tests/repos/test_fast_parse.py checks them
   against each other. The collection's NSID syntax is left to the caller (a repo has few).

   Memory: the caller's CAR, an index of its blocks, and the results. Recursion depth is bounded by the
   MST's layers (each level down is one layer lower, and a layer is at most 128). */

#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED /* SHA256(): the one-shot call, without EVP's per-call fetch */
#include <Python.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <string.h>

#define LINK_SIZE 36 /* CIDv1, codec, sha2-256, 32-byte digest */
#define MAX_KEY 1024 /* longer than any valid key: NSID (317) + "/" + record key (512) */
#define MAX_RKEY 512
#define NOT_USUAL 1  /* a parse step's "leave it to the reference path" */
#define GAVE_UP -2   /* find(): the probe ran past MAX_PROBES */
#define MAX_PROBES 256

typedef struct {
    const uint8_t *link; /* LINK_SIZE bytes */
    const uint8_t *data;
    Py_ssize_t size;
    int reached; /* an MST node the walk visited */
} Block;

typedef struct {
    const uint8_t *car;
    Py_ssize_t end;
    Block *blocks;
    Py_ssize_t count, capacity;
    int32_t *table; /* open addressing: block index + 1, 0 empty */
    size_t mask;
    int shift; /* 64 - log2(slots): a hash's top bits pick its slot */
    PyObject *records;          /* list */
    const uint8_t **values;     /* each record's link, for the check after the walk */
    Py_ssize_t value_count, value_capacity;
    uint8_t last[MAX_KEY];
    Py_ssize_t last_size;
    int have_last;
    PyObject *sink;              /* walk(): called with each `batch` of records; NULL: parse() keeps them all */
    Py_ssize_t batch;
    PyObject *collection;        /* the last collection's str: keys are sorted, so a collection's records are together */
    uint8_t collection_bytes[MAX_KEY];
    Py_ssize_t collection_size;
} Parse;

static int usual_link(const uint8_t *p) {
    return p[0] == 0x01 && (p[1] == 0x71 || p[1] == 0x55) && p[2] == 0x12 && p[3] == 0x20;
}

/* An odd multiplier drawn at import (os.urandom): a host that crafts blocks whose digests share
   their low bits (cheap to find) cannot make them share a slot, so the index stays linear. */
static uint64_t hash_key = 0x9e3779b97f4a7c15ULL;

static size_t slot(const Parse *p, const uint8_t *link) {
    uint64_t h;
    memcpy(&h, link + 4, sizeof h);
    return (size_t)(((h ^ link[1]) * hash_key) >> p->shift);
}

/* The block index of `link`, -1 if absent, GAVE_UP past MAX_PROBES (then the reference decides). */
static Py_ssize_t find(const Parse *p, const uint8_t *link) {
    size_t i = slot(p, link);
    for (int probes = 0; p->table[i]; probes++) {
        const Block *b = &p->blocks[p->table[i] - 1];
        if (memcmp(b->link, link, LINK_SIZE) == 0)
            return p->table[i] - 1;
        if (probes == MAX_PROBES)
            return GAVE_UP;
        i = (i + 1) & p->mask;
    }
    return -1;
}

static int index_blocks(Parse *p);

/* The section at *pos of car[..end], if it is whole and of the usual kind (a minimal length of at most
   3 bytes, a usual link, the block's sha256 that link's digest): 0 with *pos past it, else NOT_USUAL
   with *pos unchanged. */
static int usual_section(const uint8_t *car, Py_ssize_t end, Py_ssize_t *pos, Block *block) {
    Py_ssize_t at = *pos, size = 0, shift = 0;
    for (int i = 0;; i++) {
        if (at >= end || i == 3)
            return NOT_USUAL;
        uint8_t byte = car[at++];
        size |= (Py_ssize_t)(byte & 0x7f) << shift;
        shift += 7;
        if (!(byte & 0x80)) {
            if (i > 0 && byte == 0)
                return NOT_USUAL;
            break;
        }
    }
    if (size < LINK_SIZE || size > end - at || !usual_link(car + at))
        return NOT_USUAL;
    uint8_t digest[SHA256_DIGEST_LENGTH];
    *block = (Block){car + at, car + at + LINK_SIZE, size - LINK_SIZE, 0};
    SHA256(block->data, (size_t)block->size, digest);
    if (memcmp(digest, car + at + 4, 32) != 0)
        return NOT_USUAL;
    *pos = at + size;
    return 0;
}

/* Split the sections, check each block's hash, index them. 0, NOT_USUAL, or -1 (memory). */
static int split(Parse *p, Py_ssize_t pos) {
    while (pos < p->end) {
        Block block;
        if (usual_section(p->car, p->end, &pos, &block))
            return NOT_USUAL;
        if (p->count == INT32_MAX - 1)
            return NOT_USUAL;
        if (p->count == p->capacity) {
            Py_ssize_t capacity = p->capacity ? 2 * p->capacity : 1024;
            Block *grown = PyMem_Realloc(p->blocks, (size_t)capacity * sizeof(Block));
            if (!grown)
                return -1;
            p->blocks = grown;
            p->capacity = capacity;
        }
        p->blocks[p->count++] = block;
    }
    return index_blocks(p);
}

/* Index p->blocks by link: 0, NOT_USUAL (a block repeated, or a probe too long), or -1 (no memory). */
static int index_blocks(Parse *p) {
    size_t slots = 16;
    p->shift = 60;
    while (slots < 2 * (size_t)p->count) {
        slots *= 2;
        p->shift--;
    }
    p->table = PyMem_Calloc(slots, sizeof(int32_t));
    if (!p->table)
        return -1;
    p->mask = slots - 1;
    for (Py_ssize_t n = 0; n < p->count; n++) {
        if (find(p, p->blocks[n].link) != -1)
            return NOT_USUAL; /* a block repeated, or a probe too long */
        size_t i = slot(p, p->blocks[n].link);
        while (p->table[i])
            i = (i + 1) & p->mask;
        p->table[i] = (int32_t)(n + 1);
    }
    return 0;
}

/* The usual CAR header, length first: {roots: [one usual link], version: 1}, canonical. */
static const uint8_t USUAL_HEADER_START[] = "\x3a\xa2\x65roots\x81\xd8\x2a\x58\x25\x00";
static const uint8_t USUAL_HEADER_END[] = "\x67version\x01";
#define USUAL_HEADER_SIZE (sizeof USUAL_HEADER_START - 1 + LINK_SIZE + sizeof USUAL_HEADER_END - 1)

#define HEADER_ROOT_AT (sizeof USUAL_HEADER_START - 1) /* where its root's link starts */

static int usual_header(const uint8_t *car, Py_ssize_t size) {
    return size >= (Py_ssize_t)USUAL_HEADER_SIZE && memcmp(car, USUAL_HEADER_START, HEADER_ROOT_AT) == 0
           && usual_link(car + HEADER_ROOT_AT)
           && memcmp(car + HEADER_ROOT_AT + LINK_SIZE, USUAL_HEADER_END, sizeof USUAL_HEADER_END - 1) == 0;
}

/* The sections of a CAR with the usual header, checked and indexed: 0, NOT_USUAL, or -1 (no memory). */
static int split_car(Parse *p) {
    return usual_header(p->car, p->end) ? split(p, USUAL_HEADER_SIZE) : NOT_USUAL;
}

/* --- canonical DAG-CBOR of an MST node: {e: [{k, p, t, v}...], l: link|null} --- */

typedef struct {
    const uint8_t *at, *end;
} Cursor;

static int take(Cursor *c, const char *bytes, Py_ssize_t n) {
    if (c->end - c->at < n || memcmp(c->at, bytes, (size_t)n) != 0)
        return 0;
    c->at += n;
    return 1;
}

/* A head of major type `major` (0 uint, 1 negative, 2 bytes, 3 text, 4 array, 5 map), minimal. */
static int head(Cursor *c, int major, uint64_t *value) {
    if (c->at >= c->end || (*c->at >> 5) != major)
        return 0;
    uint8_t info = *c->at++ & 0x1f;
    int extra = info < 24 ? 0 : info == 24 ? 1 : info == 25 ? 2 : info == 26 ? 4 : info == 27 ? 8 : -1;
    if (extra < 0 || c->end - c->at < extra)
        return 0;
    uint64_t v = info < 24 ? info : 0;
    for (int i = 0; i < extra; i++)
        v = (v << 8) | *c->at++;
    if ((extra == 1 && v < 24) || (extra == 2 && v < 0x100) || (extra == 4 && v < 0x10000)
        || (extra == 8 && v < 0x100000000ULL))
        return 0;
    *value = v;
    return 1;
}

/* A link (tag 42, bytes of 0x00 + a usual CID) or, where `nullable`, null (*link = NULL). */
static int link_or_null(Cursor *c, const uint8_t **link, int nullable) {
    if (nullable && c->at < c->end && *c->at == 0xf6) {
        c->at++;
        *link = NULL;
        return 1;
    }
    if (!take(c, "\xd8\x2a\x58\x25\x00", 5) || c->end - c->at < LINK_SIZE || !usual_link(c->at))
        return 0;
    *link = c->at;
    c->at += LINK_SIZE;
    return 1;
}

#define MIN_ENTRY_SIZE 53 /* {k: b"", p: 0, t: null, v: link}: what a node's entry count is held to */

typedef struct {
    Py_ssize_t key_at, key_size; /* in the node's key buffer */
    const uint8_t *value, *tree;
} Entry;

typedef struct {
    const uint8_t *left;
    Entry *entries;
    Py_ssize_t count;
    uint8_t *keys;
} Node;

static void free_node(Node *n) {
    PyMem_Free(n->entries);
    PyMem_Free(n->keys);
}

/* 0, NOT_USUAL, or -1 (memory). */
static int decode_node(const Block *b, Node *n) {
    Cursor c = {b->data, b->data + b->size};
    uint64_t count, prefix, key_size;
    memset(n, 0, sizeof *n);
    if (!take(&c, "\xa2\x61\x65", 3) || !head(&c, 4, &count) || count > (uint64_t)b->size / MIN_ENTRY_SIZE)
        return NOT_USUAL;
    Py_ssize_t capacity = 4096, used = 0, previous = 0, previous_size = 0;
    n->entries = PyMem_Malloc(((size_t)count + 1) * sizeof(Entry));
    n->keys = PyMem_Malloc((size_t)capacity);
    if (!n->entries || !n->keys)
        return -1;
    for (uint64_t i = 0; i < count; i++) {
        Entry *e = &n->entries[i];
        if (!take(&c, "\xa4\x61\x6b", 3) || !head(&c, 2, &key_size) || key_size > (uint64_t)(c.end - c.at))
            return NOT_USUAL;
        const uint8_t *suffix = c.at;
        c.at += key_size;
        if (!take(&c, "\x61\x70", 2) || !head(&c, 0, &prefix) || prefix > (uint64_t)previous_size
            || prefix + key_size > MAX_KEY)
            return NOT_USUAL;
        if (used + MAX_KEY > capacity) { /* room for this key, the longest one allowed */
            uint8_t *grown = PyMem_Realloc(n->keys, (size_t)(capacity *= 2));
            if (!grown)
                return -1;
            n->keys = grown;
        }
        e->key_at = used;
        e->key_size = (Py_ssize_t)(prefix + key_size);
        memcpy(n->keys + used, n->keys + previous, (size_t)prefix);
        memcpy(n->keys + used + prefix, suffix, (size_t)key_size);
        previous = used;
        previous_size = e->key_size;
        used += e->key_size;
        if (!take(&c, "\x61\x74", 2) || !link_or_null(&c, &e->tree, 1) || !take(&c, "\x61\x76", 2)
            || !link_or_null(&c, &e->value, 0))
            return NOT_USUAL;
    }
    n->count = (Py_ssize_t)count;
    if (!take(&c, "\x61\x6c", 2) || !link_or_null(&c, &n->left, 1) || c.at != c.end)
        return NOT_USUAL;
    return 0;
}

/* Leading zero bits of sha256(key), in 2-bit steps: the key's MST layer. */
static int key_layer(const uint8_t *key, Py_ssize_t size) {
    uint8_t digest[SHA256_DIGEST_LENGTH];
    int zeros = 0;
    SHA256(key, (size_t)size, digest);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        if (digest[i] == 0) {
            zeros += 8;
            continue;
        }
        zeros += __builtin_clz(digest[i]) - 24;
        break;
    }
    return zeros / 2;
}

static int rkey_char(uint8_t ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.'
           || ch == '_' || ch == '~' || ch == ':' || ch == '-';
}

#define CID_TEXT_SIZE (1 + (LINK_SIZE * 8 + 4) / 5)

/* The CID's text: multibase "b", base32 lower-case without padding, CID_TEXT_SIZE characters. */
static void base32_cid(const uint8_t *link, char *text) {
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyz234567";
    int out = 0;
    uint32_t buffer = 0;
    int bits = 0;
    text[out++] = 'b';
    for (int i = 0; i < LINK_SIZE; i++) {
        buffer = (buffer << 8) | link[i];
        bits += 8;
        while (bits >= 5) {
            text[out++] = alphabet[(buffer >> (bits - 5)) & 31];
            bits -= 5;
        }
    }
    if (bits)
        text[out++] = alphabet[(buffer << (5 - bits)) & 31];
}

static PyObject *cid_text(const uint8_t *link) {
    char text[CID_TEXT_SIZE];
    base32_cid(link, text);
    return PyUnicode_FromStringAndSize(text, CID_TEXT_SIZE);
}

/* The records so far to the sink, the list started again. 0 or -1 (the sink raised, or no memory). */
static int flush(Parse *p) {
    PyObject *rows = p->records;
    p->records = PyList_New(0);
    PyObject *done = p->records ? PyObject_CallOneArg(p->sink, rows) : NULL;
    Py_DECREF(rows);
    Py_XDECREF(done);
    return done ? 0 : -1;
}

/* One MST entry in key order: checked after the last, split, appended. 0, NOT_USUAL or -1. */
static int emit(Parse *p, const uint8_t *key, Py_ssize_t size, const uint8_t *value) {
    if (p->have_last) {
        Py_ssize_t common = size < p->last_size ? size : p->last_size;
        int order = memcmp(key, p->last, (size_t)common);
        if (order < 0 || (order == 0 && size <= p->last_size))
            return NOT_USUAL;
    }
    memcpy(p->last, key, (size_t)size);
    p->last_size = size;
    p->have_last = 1;
    const uint8_t *slash = memchr(key, '/', (size_t)size);
    if (!slash || slash == key)
        return NOT_USUAL;
    Py_ssize_t collection_size = slash - key, rkey_size = size - collection_size - 1;
    if (rkey_size < 1 || rkey_size > MAX_RKEY || (rkey_size == 1 && slash[1] == '.')
        || (rkey_size == 2 && slash[1] == '.' && slash[2] == '.'))
        return NOT_USUAL;
    for (Py_ssize_t i = 0; i < rkey_size; i++)
        if (!rkey_char(slash[1 + i]))
            return NOT_USUAL;
    for (Py_ssize_t i = 0; i < collection_size; i++)
        if (key[i] >= 0x80)
            return NOT_USUAL;
    if (!p->collection || collection_size != p->collection_size
        || memcmp(key, p->collection_bytes, (size_t)collection_size) != 0) {
        Py_XDECREF(p->collection);
        p->collection = PyUnicode_FromStringAndSize((const char *)key, collection_size);
        if (!p->collection)
            return -1;
        memcpy(p->collection_bytes, key, (size_t)collection_size);
        p->collection_size = collection_size;
    }
    PyObject *rkey = PyUnicode_FromStringAndSize((const char *)slash + 1, rkey_size);
    PyObject *text = cid_text(value);
    PyObject *link = PyBytes_FromStringAndSize((const char *)value, LINK_SIZE);
    PyObject *row = (rkey && text && link) ? PyTuple_Pack(4, p->collection, rkey, text, link) : NULL;
    Py_XDECREF(rkey);
    Py_XDECREF(text);
    Py_XDECREF(link);
    if (!row)
        return -1;
    int failed = PyList_Append(p->records, row);
    Py_DECREF(row);
    if (failed || (p->sink && PyList_GET_SIZE(p->records) >= p->batch && flush(p)))
        return -1;
    if (p->value_count == p->value_capacity) {
        Py_ssize_t capacity = p->value_capacity ? 2 * p->value_capacity : 1024;
        const uint8_t **grown = PyMem_Realloc(p->values, (size_t)capacity * sizeof *grown);
        if (!grown)
            return -1;
        p->values = grown;
        p->value_capacity = capacity;
    }
    p->values[p->value_count++] = value;
    return 0;
}

/* The subtree at `link`, whose keys belong on `layer` (-1: the root, any layer). 0, NOT_USUAL or -1. */
static int walk(Parse *p, const uint8_t *link, int layer) {
    Py_ssize_t index = find(p, link);
    if (index < 0 || p->blocks[index].reached)
        return NOT_USUAL; /* missing (the reference words it), met twice, or a probe too long */
    p->blocks[index].reached = 1;
    Node node;
    int status = decode_node(&p->blocks[index], &node);
    if (status == 0) {
        if (node.count == 0) {
            /* the empty root of an empty repo, or a node that only links a layer down (the tree skips
               its layer); the reference judges any other (an untrimmed root, an empty leaf) */
            if (layer == -1 && node.left == NULL)
                status = 0;
            else if (layer > 0 && node.left)
                status = walk(p, node.left, layer - 1);
            else
                status = NOT_USUAL;
            free_node(&node);
            return status;
        }
        int own = key_layer(node.keys + node.entries[0].key_at, node.entries[0].key_size);
        for (Py_ssize_t i = 1; i < node.count && status == 0; i++)
            if (key_layer(node.keys + node.entries[i].key_at, node.entries[i].key_size) != own)
                status = NOT_USUAL;
        if (status == 0 && layer != -1 && own != layer)
            status = NOT_USUAL;
        if (status == 0 && own == 0) {
            status = node.left ? NOT_USUAL : 0;
            for (Py_ssize_t i = 0; i < node.count && status == 0; i++)
                if (node.entries[i].tree)
                    status = NOT_USUAL;
        }
        if (status == 0 && node.left)
            status = walk(p, node.left, own - 1);
        for (Py_ssize_t i = 0; i < node.count && status == 0; i++) {
            const Entry *e = &node.entries[i];
            status = emit(p, node.keys + e->key_at, e->key_size, e->value);
            if (status == 0 && e->tree)
                status = walk(p, e->tree, own - 1);
        }
    }
    free_node(&node);
    return status;
}

/* The whole tree from `root` into p->records (and the sink), then the check that no record's block is
   also a node of it. 0, NOT_USUAL or -1. */
static int walk_tree(Parse *p, const uint8_t *root) {
    p->records = PyList_New(0);
    int status = p->records ? walk(p, root, -1) : -1;
    for (Py_ssize_t i = 0; i < p->value_count && status == 0; i++) {
        Py_ssize_t index = find(p, p->values[i]);
        if (index == GAVE_UP || (index >= 0 && p->blocks[index].reached))
            status = NOT_USUAL; /* a record's block that is also a node of the tree */
    }
    return status;
}

static PyObject *other_blocks(const Parse *p, Py_ssize_t commit) {
    PyObject *blocks = PyList_New(0);
    for (Py_ssize_t n = 0; blocks && n < p->count; n++) {
        const Block *b = &p->blocks[n];
        if (n == commit || b->reached)
            continue;
        PyObject *row = Py_BuildValue("(y#y#)", b->link, (Py_ssize_t)LINK_SIZE, b->data, b->size);
        if (!row || PyList_Append(blocks, row)) {
            Py_XDECREF(row);
            Py_CLEAR(blocks);
            break;
        }
        Py_DECREF(row);
    }
    return blocks;
}

static PyObject *parse_repo(Parse *p, PyObject *data_root) {
    int status = split_car(p);
    if (status)
        return status < 0 ? PyErr_NoMemory() : Py_NewRef(Py_None);
    const uint8_t *head = p->car + HEADER_ROOT_AT;
    Py_ssize_t commit = find(p, head);
    if (commit < 0)
        return Py_NewRef(Py_None);
    PyObject *block = PyBytes_FromStringAndSize((const char *)p->blocks[commit].data, p->blocks[commit].size);
    PyObject *root = block ? PyObject_CallOneArg(data_root, block) : NULL;
    Py_XDECREF(block);
    if (!root)
        return NULL;
    if (!PyBytes_Check(root) || PyBytes_GET_SIZE(root) != LINK_SIZE || !usual_link((uint8_t *)PyBytes_AS_STRING(root))) {
        Py_DECREF(root);
        return Py_NewRef(Py_None);
    }
    status = walk_tree(p, (const uint8_t *)PyBytes_AS_STRING(root));
    Py_DECREF(root);
    if (status)
        return status < 0 ? (PyErr_Occurred() ? NULL : PyErr_NoMemory()) : Py_NewRef(Py_None);
    PyObject *blocks = other_blocks(p, commit);
    if (!blocks)
        return NULL;
    return Py_BuildValue("(y#ON)", head, (Py_ssize_t)LINK_SIZE, p->records, blocks);
}

/* --- a record's atproto JSON form, as a COPY text line ---------------------------------------------

   copy_lines(records, blocks, prefix, suffix) writes, for each (collection, rkey, CID text, binary CID)
   of `records`, the line  prefix collection \t rkey \t CID \t JSON suffix  in COPY's text format, the
   JSON being what dagcbor.to_json_text makes of the record's block (`blocks[link]`). It takes what
   records usually hold: canonical DAG-CBOR of maps, lists, text, integers, booleans, null and links.
   For anything else in any record (a byte string, a float, U+0000, a block missing, a key out of
   canonical order, invalid UTF-8, ...) it returns None, and the caller makes the rows the Python way,
   which decides and words every refusal. tests/repos/test_fast_parse.py holds the two to the same text. */

#define MAX_JSON_DEPTH 64 /* deeper values (the reference allows 400) are left to the Python path */

typedef struct {
    char *data;
    Py_ssize_t size, capacity;
} Buffer;

static int reserve(Buffer *b, Py_ssize_t more) {
    if (b->size + more <= b->capacity)
        return 0;
    Py_ssize_t capacity = b->capacity ? b->capacity : 1 << 16;
    while (capacity < b->size + more)
        capacity *= 2;
    char *grown = PyMem_Realloc(b->data, (size_t)capacity);
    if (!grown)
        return -1;
    b->data = grown;
    b->capacity = capacity;
    return 0;
}

static int put(Buffer *b, const char *text, Py_ssize_t size) {
    if (size == 0)
        return 0;
    if (reserve(b, size))
        return -1;
    memcpy(b->data + b->size, text, (size_t)size);
    b->size += size;
    return 0;
}

static int put_unsigned(Buffer *b, uint64_t v) {
    char digits[24];
    int n = 0;
    do
        digits[sizeof digits - 1 - n++] = (char)('0' + v % 10);
    while (v /= 10);
    return put(b, digits + sizeof digits - n, n);
}

/* Length of the UTF-8 sequence at s (at most `left` bytes), 0 if it is not valid UTF-8 (overlong,
   a surrogate, past U+10FFFF, cut short), as Python's strict decoder refuses. */
static int utf8_length(const uint8_t *s, Py_ssize_t left) {
    uint8_t c = s[0];
    if (c < 0x80)
        return 1;
    int n = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (n == 0 || left < n)
        return 0;
    for (int i = 1; i < n; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    if ((c == 0xe0 && s[1] < 0xa0) || (c == 0xed && s[1] >= 0xa0) || (c == 0xf0 && s[1] < 0x90)
        || (c == 0xf4 && s[1] >= 0x90))
        return 0;
    return n;
}

/* A JSON string as json.dumps(ensure_ascii=False) writes it, each backslash doubled for COPY. */
static int json_string(Buffer *b, const uint8_t *s, Py_ssize_t size) {
    static const char hex[] = "0123456789abcdef";
    if (reserve(b, 2 + 7 * size)) /* the longest, per byte: \\u00XX, its backslash doubled for COPY */
        return -1;
    char *out = b->data + b->size;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < size;) {
        uint8_t c = s[i];
        if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
            *out++ = (char)c;
            i++;
            continue;
        }
        if (c >= 0x80) {
            int n = utf8_length(s + i, size - i);
            if (!n)
                return NOT_USUAL;
            memcpy(out, s + i, (size_t)n);
            out += n;
            i += n;
            continue;
        }
        if (c == 0)
            return NOT_USUAL; /* U+0000: jsonb can't hold it; snapshot.record_json decides */
        *out++ = '\\';
        *out++ = '\\';
        switch (c) {
        case '"': *out++ = '"'; break;
        case '\\': *out++ = '\\'; *out++ = '\\'; break;
        case '\b': *out++ = 'b'; break;
        case '\f': *out++ = 'f'; break;
        case '\n': *out++ = 'n'; break;
        case '\r': *out++ = 'r'; break;
        case '\t': *out++ = 't'; break;
        default:
            memcpy(out, "u00", 3);
            out += 3;
            *out++ = hex[c >> 4];
            *out++ = hex[c & 15];
        }
        i++;
    }
    *out++ = '"';
    b->size = out - b->data;
    return 0;
}

/* A text string's head and bytes. */
static int text(Cursor *c, const uint8_t **s, Py_ssize_t *size) {
    uint64_t n;
    if (!head(c, 3, &n) || n > (uint64_t)(c->end - c->at))
        return 0;
    *s = c->at;
    *size = (Py_ssize_t)n;
    c->at += n;
    return 1;
}

/* Whether map key a sorts before b in DAG-CBOR's canonical order: shorter first, then bytewise. */
static int canonical_before(const uint8_t *a, Py_ssize_t a_size, const uint8_t *b, Py_ssize_t b_size) {
    if (a_size != b_size)
        return a_size < b_size;
    return memcmp(a, b, (size_t)a_size) < 0;
}

static int json_value(Cursor *c, Buffer *b, int depth) {
    uint64_t n;
    const uint8_t *s;
    Py_ssize_t size;
    int status;
    if (c->at >= c->end || depth > MAX_JSON_DEPTH)
        return NOT_USUAL;
    switch (*c->at >> 5) {
    case 0:
        return head(c, 0, &n) ? put_unsigned(b, n) : NOT_USUAL;
    case 1: /* -1 - n */
        if (!head(c, 1, &n) || n >= (1ULL << 63))
            return NOT_USUAL;
        return put(b, "-", 1) ? -1 : put_unsigned(b, n + 1);
    case 3:
        return text(c, &s, &size) ? json_string(b, s, size) : NOT_USUAL;
    case 4:
        if (!head(c, 4, &n) || n > (uint64_t)(c->end - c->at))
            return NOT_USUAL;
        if (put(b, "[", 1))
            return -1;
        for (uint64_t i = 0; i < n; i++) {
            if (i && put(b, ",", 1))
                return -1;
            if ((status = json_value(c, b, depth + 1)))
                return status;
        }
        return put(b, "]", 1);
    case 5: {
        const uint8_t *last = NULL;
        Py_ssize_t last_size = 0;
        if (!head(c, 5, &n) || n > (uint64_t)(c->end - c->at))
            return NOT_USUAL;
        if (put(b, "{", 1))
            return -1;
        for (uint64_t i = 0; i < n; i++) {
            if (!text(c, &s, &size) || (last && !canonical_before(last, last_size, s, size)))
                return NOT_USUAL;
            last = s;
            last_size = size;
            if (i && put(b, ",", 1))
                return -1;
            if ((status = json_string(b, s, size)))
                return status;
            if (put(b, ":", 1))
                return -1;
            if ((status = json_value(c, b, depth + 1)))
                return status;
        }
        return put(b, "}", 1);
    }
    case 6: { /* tag 42, a link of the usual kind: {"$link": "bafy..."} */
        const uint8_t *link;
        if (!link_or_null(c, &link, 0))
            return NOT_USUAL;
        char cid[CID_TEXT_SIZE];
        base32_cid(link, cid);
        return put(b, "{\"$link\":\"", 10) || put(b, cid, CID_TEXT_SIZE) || put(b, "\"}", 2) ? -1 : 0;
    }
    case 7:
        switch (*c->at++) {
        case 0xf4: return put(b, "false", 5);
        case 0xf5: return put(b, "true", 4);
        case 0xf6: return put(b, "null", 4);
        }
        return NOT_USUAL; /* a float, undefined, another simple value */
    }
    return NOT_USUAL; /* a byte string (JSON {"$bytes": ...}): the Python path writes it */
}

/* A str's UTF-8 bytes if they need no COPY escaping (no backslash, no control character). */
static const char *plain(PyObject *value, Py_ssize_t *size) {
    const char *utf8 = PyUnicode_CheckExact(value) ? PyUnicode_AsUTF8AndSize(value, size) : NULL;
    if (!utf8) {
        PyErr_Clear();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *size; i++)
        if ((uint8_t)utf8[i] < 0x20 || utf8[i] == '\\' || utf8[i] == 0x7f)
            return NULL;
    return utf8;
}

/* A record block's JSON, COPY-escaped: 0, NOT_USUAL (not the usual DAG-CBOR, or bytes after its value),
   or -1 (memory). */
static int block_json(Buffer *b, PyObject *block) {
    Cursor c = {(const uint8_t *)PyBytes_AS_STRING(block), (const uint8_t *)PyBytes_AS_STRING(block) + PyBytes_GET_SIZE(block)};
    int status = json_value(&c, b, 0);
    if (status)
        return status;
    return c.at != c.end ? NOT_USUAL : 0;
}

/* `row` and `blocks` hold only exact str, bytes and tuples (no __eq__ or __hash__ of a caller's class
   runs during the lookup), and the caller holds a reference to `row`. */
static int copy_line(Buffer *b, PyObject *row, PyObject *blocks, Py_buffer *prefix, Py_buffer *suffix) {
    if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != 4 || !PyBytes_CheckExact(PyTuple_GET_ITEM(row, 3)))
        return NOT_USUAL;
    PyObject *block = PyDict_GetItemWithError(blocks, PyTuple_GET_ITEM(row, 3));
    if (!block)
        return PyErr_Occurred() ? -1 : NOT_USUAL; /* missing from the CAR: the Python path refuses it */
    if (!PyBytes_CheckExact(block))
        return NOT_USUAL;
    if (put(b, prefix->buf, prefix->len))
        return -1;
    for (int i = 0; i < 3; i++) {
        Py_ssize_t size;
        const char *field = plain(PyTuple_GET_ITEM(row, i), &size);
        if (!field)
            return NOT_USUAL;
        if (put(b, field, size) || put(b, "\t", 1))
            return -1;
    }
    int status = block_json(b, block);
    return status ? status : put(b, suffix->buf, suffix->len);
}

/* The lines written (bytes), None if a row was left to the Python path, or NULL with the error set. */
static PyObject *lines_or_none(Buffer *b, int status) {
    PyObject *result = NULL;
    if (status == 0)
        result = PyBytes_FromStringAndSize(b->data ? b->data : "", b->size);
    else if (status == NOT_USUAL)
        result = Py_NewRef(Py_None);
    else if (!PyErr_Occurred())
        PyErr_NoMemory();
    PyMem_Free(b->data);
    return result;
}

static PyObject *copy_lines(PyObject *module, PyObject *args) {
    PyObject *records, *blocks;
    Py_buffer prefix, suffix;
    if (!PyArg_ParseTuple(args, "O!O!y*y*:copy_lines", &PyList_Type, &records, &PyDict_Type, &blocks, &prefix, &suffix))
        return NULL;
    Buffer b = {NULL, 0, 0};
    int status = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(records) && status == 0; i++) {
        PyObject *row = Py_NewRef(PyList_GET_ITEM(records, i));
        status = copy_line(&b, row, blocks, &prefix, &suffix);
        Py_DECREF(row);
    }
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&suffix);
    return lines_or_none(&b, status);
}

/* A (binary CID, block) row as a line of incoming_blocks: the CID as bytea hex, the record's JSON, error
   and record_cbor NULL; nothing for a CID not in `wanted` (a set of exact bytes, or None: every one). */
static int staged_line(Buffer *b, PyObject *row, PyObject *wanted) {
    static const char hex[] = "0123456789abcdef";
    if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != 2)
        return NOT_USUAL;
    PyObject *link = PyTuple_GET_ITEM(row, 0), *block = PyTuple_GET_ITEM(row, 1);
    if (!PyBytes_CheckExact(link) || !PyBytes_CheckExact(block))
        return NOT_USUAL;
    if (wanted != Py_None) {
        int kept = PySet_Contains(wanted, link);
        if (kept <= 0)
            return kept;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(link);
    const uint8_t *bytes = (const uint8_t *)PyBytes_AS_STRING(link);
    if (reserve(b, 4 + 2 * size))
        return -1;
    char *out = b->data + b->size;
    memcpy(out, "\\\\x", 3); /* \\x: COPY's escape of bytea's \x */
    out += 3;
    for (Py_ssize_t i = 0; i < size; i++) {
        *out++ = hex[bytes[i] >> 4];
        *out++ = hex[bytes[i] & 15];
    }
    *out++ = '\t';
    b->size = out - b->data;
    int status = block_json(b, block);
    return status ? status : put(b, "\t\\N\t\\N\n", 7);
}

/* staged_lines(blocks, wanted) -> bytes | None: snapshot.staged_blocks's rows of a repo spooled to
   disk, for a list of (binary CID, block) rows, as COPY text lines of incoming_blocks (see staged_line);
   None where a block has no usual JSON form here (those copy_lines leaves too): the caller makes that
   list's rows the Python way. */
static PyObject *staged_lines(PyObject *module, PyObject *args) {
    PyObject *rows, *wanted;
    if (!PyArg_ParseTuple(args, "O!O:staged_lines", &PyList_Type, &rows, &wanted))
        return NULL;
    if (wanted != Py_None && !PySet_CheckExact(wanted)) {
        PyErr_SetString(PyExc_TypeError, "staged_lines: wanted must be a set or None");
        return NULL;
    }
    Buffer b = {NULL, 0, 0};
    int status = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(rows) && status == 0; i++) {
        PyObject *row = Py_NewRef(PyList_GET_ITEM(rows, i));
        status = staged_line(&b, row, wanted);
        Py_DECREF(row);
    }
    return lines_or_none(&b, status);
}

/* sections(buffer, pos, max_bytes) -> ([(binary CID, block), ...], pos): the sections of a streamed
   CAR's buffer from `pos` on, each whole and of the usual kind (see usual_section), up to the first that
   is cut short or is not, or until they hold `max_bytes` (a buffer holding a whole CAR is not copied
   into one list): car.CarReader.links's fast path, which reads the next one its own way (and words its
   error). */
static PyObject *sections(PyObject *module, PyObject *args) {
    Py_buffer buffer;
    Py_ssize_t pos, max_bytes;
    if (!PyArg_ParseTuple(args, "y*nn:sections", &buffer, &pos, &max_bytes))
        return NULL;
    PyObject *found = pos >= 0 && pos <= buffer.len ? PyList_New(0) : NULL;
    if (!found && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "sections: pos is outside the buffer");
    Block block;
    const Py_ssize_t start = pos;
    for (Py_ssize_t at = pos; found && at - start < max_bytes && usual_section(buffer.buf, buffer.len, &at, &block) == 0;
         pos = at) {
        PyObject *row = Py_BuildValue("(y#y#)", block.link, (Py_ssize_t)LINK_SIZE, block.data, block.size);
        if (!row || PyList_Append(found, row))
            Py_CLEAR(found);
        Py_XDECREF(row);
    }
    PyBuffer_Release(&buffer);
    return found ? Py_BuildValue("(Nn)", found, pos) : NULL;
}

static int append_link(PyObject *list, const uint8_t *link) {
    PyObject *item = PyBytes_FromStringAndSize((const char *)link, LINK_SIZE);
    int status = item ? PyList_Append(list, item) : -1;
    Py_XDECREF(item);
    return status;
}

/* subtrees(block) -> [binary CID, ...] | None: an MST node's subtree links (its `l`, then each entry's
   `t`; nulls left out), for repo.collect_repo_blocks to reach the nodes below it as the CAR streams.
   None for a block that is not a usual node: mst.decode_node decides. */
static PyObject *subtrees(PyObject *module, PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*:subtrees", &data))
        return NULL;
    Block block = {.data = data.buf, .size = data.len};
    Node n;
    int status = decode_node(&block, &n);
    PyObject *result = status < 0 ? PyErr_NoMemory() : status ? Py_NewRef(Py_None) : PyList_New(0);
    if (status == 0 && result && n.left && append_link(result, n.left))
        Py_CLEAR(result);
    for (Py_ssize_t i = 0; status == 0 && result && i < n.count; i++)
        if (n.entries[i].tree && append_link(result, n.entries[i].tree))
            Py_CLEAR(result);
    free_node(&n);
    PyBuffer_Release(&data);
    return result;
}

/* blocks(car) -> {binary CID: block} | None: the sections of a CAR held in memory (a stream event's
   slice) whose header is the usual one, each checked against its CID: car.read_blocks's fast path.
   None for anything unusual (a block repeated too), left to CarReader, which decides and words it. */
static PyObject *blocks(PyObject *module, PyObject *args) {
    Py_buffer car;
    if (!PyArg_ParseTuple(args, "y*:blocks", &car))
        return NULL;
    Parse p = {.car = car.buf, .end = car.len};
    int status = split_car(&p);
    PyObject *result = status < 0 ? PyErr_NoMemory() : status ? Py_NewRef(Py_None) : PyDict_New();
    for (Py_ssize_t n = 0; status == 0 && result && n < p.count; n++) {
        const Block *b = &p.blocks[n];
        PyObject *link = PyBytes_FromStringAndSize((const char *)b->link, LINK_SIZE);
        PyObject *data = link ? PyBytes_FromStringAndSize((const char *)b->data, b->size) : NULL;
        if (!data || PyDict_SetItem(result, link, data))
            Py_CLEAR(result);
        Py_XDECREF(link);
        Py_XDECREF(data);
    }
    PyMem_Free(p.blocks);
    PyMem_Free(p.table);
    PyBuffer_Release(&car);
    return result;
}

/* Bytes order, as Python compares bytes: bytewise, then the shorter first. */
static int compare_keys(const uint8_t *a, Py_ssize_t a_size, const uint8_t *b, Py_ssize_t b_size) {
    int order = memcmp(a, b, (size_t)(a_size < b_size ? a_size : b_size));
    return order ? order : (a_size > b_size) - (a_size < b_size);
}

/* One node's step of a lookup: 0 with *found (the key's value) or *next (the subtree to go down, NULL
   for none), NOT_USUAL, or -1. `link` points into the parent's block, held by `blocks`: it is copied
   into `name` before the dict lookup, which could run a caller's key __eq__ (and so free that block). */
static int lookup_step(PyObject *blocks, const uint8_t *link, const uint8_t *key, Py_ssize_t key_size,
                       const uint8_t **found, const uint8_t **next) {
    PyObject *name = PyBytes_FromStringAndSize((const char *)link, LINK_SIZE);
    PyObject *block = name ? PyDict_GetItemWithError(blocks, name) : NULL;
    Py_XDECREF(name);
    if (!block)
        return PyErr_Occurred() ? -1 : NOT_USUAL; /* missing: mst.lookup words it */
    if (!PyBytes_CheckExact(block))
        return NOT_USUAL;
    Block b = {link, (const uint8_t *)PyBytes_AS_STRING(block), PyBytes_GET_SIZE(block), 0};
    Node node;
    int status = decode_node(&b, &node);
    *found = NULL;
    *next = node.left;
    for (Py_ssize_t i = 0; status == 0 && i < node.count; i++) {
        const Entry *e = &node.entries[i];
        int order = compare_keys(node.keys + e->key_at, e->key_size, key, key_size);
        if (order == 0)
            *found = e->value;
        if (order >= 0)
            break;
        *next = e->tree;
    }
    free_node(&node);
    return status;
}

/* lookup(blocks, root, key) -> (binary CID or None,) | None: the value of `key` in the MST at `root`,
   over `blocks` ({binary CID: block}: a stream event's), found on canonical nodes; mst.lookup's fast
   path. None where a node on the way is missing or not canonical: mst.lookup's Python path decides and
   words it. Links point into blocks' values, which the dict keeps alive meanwhile. */
static PyObject *lookup(PyObject *module, PyObject *args) {
    PyObject *blocks;
    Py_buffer root, key;
    if (!PyArg_ParseTuple(args, "O!y*y*:lookup", &PyDict_Type, &blocks, &root, &key))
        return NULL;
    PyObject *result = NULL;
    const uint8_t *link = root.len == LINK_SIZE ? root.buf : NULL, *found = NULL, *next = NULL;
    int status = link ? 0 : NOT_USUAL;
    /* A content-addressed tree has no cycle; the bound only keeps a caller's odd dict from looping. */
    for (int depth = 0; status == 0; depth++) {
        status = depth > 1000 ? NOT_USUAL : lookup_step(blocks, link, key.buf, key.len, &found, &next);
        if (status == 0 && (found || !next)) {
            result = found ? Py_BuildValue("(y#)", found, (Py_ssize_t)LINK_SIZE) : Py_BuildValue("(O)", Py_None);
            break;
        }
        link = next;
    }
    if (status == NOT_USUAL)
        result = Py_NewRef(Py_None);
    else if (status < 0 && !PyErr_Occurred())
        PyErr_NoMemory();
    PyBuffer_Release(&root);
    PyBuffer_Release(&key);
    return result;
}

static PyObject *parse(PyObject *module, PyObject *args) {
    Py_buffer car;
    PyObject *data_root;
    if (!PyArg_ParseTuple(args, "y*O:parse", &car, &data_root))
        return NULL;
    Parse p = {.car = car.buf, .end = car.len};
    PyObject *result = parse_repo(&p, data_root);
    Py_XDECREF(p.records);
    Py_XDECREF(p.collection);
    PyMem_Free(p.blocks);
    PyMem_Free(p.table);
    PyMem_Free(p.values);
    PyBuffer_Release(&car);
    return result;
}

/* walk(nodes, root, sink, batch) -> True | None: parse()'s MST walk over `nodes` ({binary CID: block}:
   the MST nodes a streamed CAR's reader kept, their hashes checked as they came) from `root`;
   snapshot._walk_kept's fast path. The records, as parse() gives them, go to `sink(rows)` `batch` at a
   time in key order, so a repo of millions of records never makes one list of them. None where the walk
   meets anything unusual (a missing or non-canonical node, keys out of order, a record whose block is
   a node, ...): the caller discards what the sink took and walks in Python, which decides and words it.
   Links point into the dict's keys and values, which it keeps alive: the sink must not change it. */
static int index_nodes(Parse *p, PyObject *nodes) {
    Py_ssize_t count = PyDict_GET_SIZE(nodes), pos = 0;
    PyObject *link, *block;
    if (count >= INT32_MAX - 1)
        return NOT_USUAL;
    p->blocks = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(Block));
    if (!p->blocks)
        return -1;
    p->capacity = count;
    while (PyDict_Next(nodes, &pos, &link, &block)) {
        if (p->count == count || !PyBytes_CheckExact(link) || PyBytes_GET_SIZE(link) != LINK_SIZE
            || !usual_link((const uint8_t *)PyBytes_AS_STRING(link)) || !PyBytes_CheckExact(block))
            return NOT_USUAL;
        p->blocks[p->count++] = (Block){(const uint8_t *)PyBytes_AS_STRING(link),
                                        (const uint8_t *)PyBytes_AS_STRING(block), PyBytes_GET_SIZE(block), 0};
    }
    return index_blocks(p);
}

static PyObject *walk_nodes(PyObject *module, PyObject *args) {
    PyObject *nodes, *sink;
    Py_buffer root;
    Py_ssize_t batch;
    if (!PyArg_ParseTuple(args, "O!y*On:walk", &PyDict_Type, &nodes, &root, &sink, &batch))
        return NULL;
    Parse p = {.sink = sink, .batch = batch > 0 ? batch : 1};
    int status = root.len == LINK_SIZE && usual_link(root.buf) ? index_nodes(&p, nodes) : NOT_USUAL;
    if (status == 0)
        status = walk_tree(&p, root.buf);
    if (status == 0 && PyList_GET_SIZE(p.records) > 0)
        status = flush(&p);
    PyObject *result = status == 0 ? Py_NewRef(Py_True) : status == NOT_USUAL ? Py_NewRef(Py_None) : NULL;
    if (!result && !PyErr_Occurred())
        PyErr_NoMemory();
    Py_XDECREF(p.records);
    Py_XDECREF(p.collection);
    PyMem_Free(p.blocks);
    PyMem_Free(p.table);
    PyMem_Free(p.values);
    PyBuffer_Release(&root);
    return result;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_VARARGS,
     "parse(car, data_root) -> (head, records, blocks) | None: see the module's source."},
    {"blocks", blocks, METH_VARARGS, "blocks(car) -> {binary CID: block} | None: see the module's source."},
    {"lookup", lookup, METH_VARARGS, "lookup(blocks, root, key) -> (link | None,) | None: see the module's source."},
    {"walk", walk_nodes, METH_VARARGS, "walk(nodes, root, sink, batch) -> True | None: see the module's source."},
    {"subtrees", subtrees, METH_VARARGS, "subtrees(block) -> [link, ...] | None: see the module's source."},
    {"sections", sections, METH_VARARGS, "sections(buffer, pos, max_bytes) -> ([(link, block), ...], pos): see the module's source."},
    {"copy_lines", copy_lines, METH_VARARGS,
     "copy_lines(records, blocks, prefix, suffix) -> bytes | None: see the module's source."},
    {"staged_lines", staged_lines, METH_VARARGS, "staged_lines(blocks, wanted) -> bytes | None: see the module's source."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_fastrepo", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastrepo(void) {
    PyObject *os = PyImport_ImportModule("os");
    PyObject *random = os ? PyObject_CallMethod(os, "urandom", "i", (int)sizeof hash_key) : NULL;
    Py_XDECREF(os);
    if (!random)
        return NULL;
    memcpy(&hash_key, PyBytes_AS_STRING(random), sizeof hash_key);
    hash_key |= 1;
    Py_DECREF(random);
    return PyModule_Create(&module);
}
