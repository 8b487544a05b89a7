/* The compiled fast path of a ublk queue (optional; vdisk/ublk/fastpath.py builds and loads it).
 *
 * fl_run() is the queue loop of vdisk/ublk/queue.py for the requests that need no Python:
 * a READ/WRITE linked to its commit on the backing file (the file target's templates) and
 * every request of the null backend (whose READs leave the buffer unwritten, as ublksrv's do),
 * and a READ/WRITE whose guest range the host-extent table (qcow2, see vdisk/qcow2/extents.py)
 * maps to one host range of the image file. A READ/WRITE the kernel would punt to an io-wq
 * worker (file_target.py's probe: every buffered WRITE on 6.1) runs here with pread/pwrite,
 * as file_target.FileTarget.serve would run it, but without the GIL. It submits, waits in io_uring_enter and queues commits
 * without the GIL (ctypes releases it around the call), and returns to Python only with the
 * CQEs Python must handle (anything else: inline backends, failed or short I/O, aborts,
 * NEED_GET_DATA, refused commits), on a timeout or EINTR, after max_requests requests (to
 * renew a qcow2 image's ticket), or every report_ns (so that Python can hand the tallies to
 * the metrics).
 *
 * The ring layout is Python's (ring_layout.py): tag t owns SQE slots 2t (backing op) and
 * 2t+1 (command); user_data is kind << 16 | tag, kind 0 being a new request. The SQ index
 * array and its tail are shared with Python's Ring: Python publishes its tail before the call
 * and re-reads it afterwards. x86-64 and arm64 only need the acquire/release below.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define ENTER_GETEVENTS 1u
#define ENTER_EXT_ARG 8u
#define OP_READ 0
#define OP_WRITE 1
#define OP_FLUSH 2
#define OP_DISCARD 3
#define OP_WRITE_ZEROES 5
#define NOPS 8
#define FUA_FLAG (1u << 13)

#define FL_TIMEOUT 1u   /* wait with a timeout (IORING_FEAT_EXT_ARG) */
#define FL_TIMING 2u    /* measure each batch's service time (for the metrics) */
#define FL_NULL 4u      /* the null backend: every request succeeds, reads leave the buffer as it is */
#define KIND_EXTENT 4u  /* user_data kind of an extent READ/WRITE (ring_layout.EXTENT) */
#define KIND_RING_RW 5u /* user_data kind of an unlinked inline op (ring_layout.RING_RW) */
#define EXTENT_READABLE 1u
#define EXTENT_WRITABLE 2u
#define EXTENT_FLAGS 511u

struct cqe {
	uint64_t user_data;
	int32_t res;
	uint32_t flags;
};

struct getevents_arg {
	uint64_t sigmask;
	uint32_t sigmask_sz;
	uint32_t pad;
	uint64_t ts;
};

struct fl_state {
	int32_t ring_fd;
	uint32_t flags;
	uint32_t sq_mask;
	uint32_t cq_mask;
	uint32_t *sq_head;
	uint32_t *sq_tail;
	uint32_t *sq_array;
	uint32_t *cq_head;
	uint32_t *cq_tail;
	struct cqe *cqes;
	uint8_t *sqes;
	const uint8_t *descs;        /* struct ublksrv_io_desc[depth], 24 bytes each */
	uint8_t *bufs;               /* tag t's buffer at bufs + t * buf_size */
	uint64_t buf_size;
	uint64_t buf_addr_base;      /* the address the commit templates carry for tag 0 */
	const uint8_t *commit_tpl;   /* 64 bytes per tag */
	const uint8_t *linked_tpl[2];/* READ, WRITE: 64 bytes per tag, or NULL (not linked) */
	uint32_t depth;
	uint32_t result_offset;      /* io_cmd.result in a command SQE */
	uint32_t rwf_dsync;
	uint32_t out_cap;
	struct cqe *out;             /* the CQEs handed back to Python */
	uint64_t max_requests;       /* return after this many requests (0: never) */
	int64_t timeout_ns;
	uint64_t counts[NOPS];
	uint64_t bytes[NOPS];
	uint64_t latency_ns[NOPS];   /* sum over requests of their batch's service time */
	uint64_t max_latency_ns[NOPS];
	/* Host extents: entry per guest cluster, host | READABLE [| WRITABLE], or 0 (ask Python).
	 * An extent READ/WRITE is linked to its commit but posts its success CQE, so that its
	 * end is known: inflight[] counts them per epoch (the queue renews its image ticket once
	 * the old epoch's count is 0, see queue.py). */
	const uint64_t *extents;     /* NULL: no table */
	uint64_t extent_count;
	uint32_t cluster_bits;
	uint32_t epoch;              /* 0 or 1: the epoch new extent I/O counts in */
	uint64_t inflight[2];
	uint8_t *tag_epoch;          /* per tag: the epoch of its extent I/O in flight */
	uint32_t *tag_len;           /* per tag: the length its extent I/O must complete */
	const uint8_t *extent_tpl[2];/* READ, WRITE: 64 bytes per tag, or NULL (not through the ring) */
	uint64_t extent_ios;         /* extent READs/WRITEs queued (for tests) */
	/* Inline READ/WRITE (not through the ring): pread/pwrite on inline_fd at the guest
	 * offset, or with a host-extent table at the host offset. Anything short or failed, and
	 * every FUA write, goes back to Python, which runs the whole request again (so errors
	 * are logged and FUA's fdatasync is Python's). */
	int32_t inline_fd;
	uint32_t inline_ops;         /* bit 1 << op for READ, WRITE */
	uint64_t inline_ios;         /* requests served inline here (for tests) */
	/* An inline op of at least ring_min_len bytes (0: none) goes through the ring instead,
	 * unlinked (ring_tpl, user_data kind KIND_RING_RW), and is committed here on its CQE:
	 * the kernel's io-wq worker then copies it while this thread takes the next request, as
	 * ublksrv's loop target does. A linked commit would run on that worker, which Linux 6.1
	 * refuses. A failed or short one goes to Python (the file target's finish). */
	const uint8_t *ring_tpl[2];  /* READ, WRITE: 64 bytes per tag, or NULL */
	uint32_t ring_min_len;
	uint64_t ring_ios;           /* requests queued that way (for tests) */
	/* With FL_TIMING, return to Python this often while busy (0: never), so that the
	 * metrics see what C served. By time, not by count: at 30k requests a second, coming
	 * back every 256 took the GIL over a hundred times a second per queue. */
	uint64_t report_ns;
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static long enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags, void *arg,
		  size_t argsz)
{
	return syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, arg, argsz);
}

/* The host offset of guest range [off, off+len) when the extent table maps it to one
 * contiguous host range allowing `need`, else -1. */
static int64_t extent_host(const struct fl_state *s, uint64_t off, uint32_t len, uint64_t need)
{
	uint32_t cb = s->cluster_bits;
	uint64_t gc = off >> cb, last = (off + len - 1) >> cb;
	if (!len || last >= s->extent_count)
		return -1;
	uint64_t e = __atomic_load_n(&s->extents[gc], __ATOMIC_ACQUIRE);
	if (!(e & need))
		return -1;
	uint64_t host = e & ~(uint64_t)EXTENT_FLAGS;
	for (uint64_t i = gc + 1; i <= last; i++) {
		uint64_t f = __atomic_load_n(&s->extents[i], __ATOMIC_ACQUIRE);
		if (!(f & need) || (f & ~(uint64_t)EXTENT_FLAGS) != host + ((i - gc) << cb))
			return -1;
	}
	return (int64_t)(host + (off & (((uint64_t)1 << cb) - 1)));
}

/* Queue tag's READ/WRITE on the backing file: its template with off, len and rw_flags. */
static void queue_rw(struct fl_state *s, uint32_t tag, const uint8_t *tpl, uint64_t off,
		     uint32_t len, uint32_t rw_flags, uint32_t *tail)
{
	uint8_t *sqe = s->sqes + (size_t)tag * 128;
	memcpy(sqe, tpl + (size_t)tag * 64, 64);
	memcpy(sqe + 8, &off, 8);
	memcpy(sqe + 24, &len, 4);
	memcpy(sqe + 28, &rw_flags, 4);
	s->sq_array[*tail & s->sq_mask] = tag * 2;
	(*tail)++;
}

static void queue_commit(struct fl_state *s, uint32_t tag, int32_t res, uint32_t *tail)
{
	uint8_t *cmd = s->sqes + (size_t)tag * 128 + 64;
	memcpy(cmd, s->commit_tpl + (size_t)tag * 64, 64);
	memcpy(cmd + s->result_offset, &res, 4);
	s->sq_array[*tail & s->sq_mask] = tag * 2 + 1;
	(*tail)++;
}

static void count(struct fl_state *s, uint32_t op, uint32_t len, uint64_t *done_ops)
{
	s->counts[op]++;
	s->bytes[op] += (op <= OP_WRITE) ? len : 0;
	done_ops[op]++;
}

/* One new request on tag: queue its SQEs, or return 0 when Python must serve it. */
static int serve(struct fl_state *s, uint32_t tag, uint32_t *tail, uint64_t *done_ops)
{
	const uint8_t *d = s->descs + (size_t)tag * 24;
	uint32_t op_flags, nr_sectors;
	uint64_t start;
	memcpy(&op_flags, d, 4);
	memcpy(&nr_sectors, d + 4, 4);
	memcpy(&start, d + 8, 8);
	uint32_t op = op_flags & 0xff;
	uint32_t len = nr_sectors << 9;
	int32_t res;
	int inline_op = op <= OP_WRITE && (s->inline_ops & (1u << op));
	if (inline_op && s->ring_tpl[op] && s->ring_min_len && len >= s->ring_min_len &&
	    len <= s->buf_size && !s->extents) {
		queue_rw(s, tag, s->ring_tpl[op], start << 9, len,
			 (op_flags & FUA_FLAG) ? s->rwf_dsync : 0, tail);
		s->ring_ios++;
		count(s, op, len, done_ops);
		return 1; /* committed on its CQE */
	}
	if (op <= OP_WRITE && s->linked_tpl[op]) {
		queue_rw(s, tag, s->linked_tpl[op], start << 9, len,
			 (op_flags & FUA_FLAG) ? s->rwf_dsync : 0, tail);
		res = (int32_t)len;
	} else if (op <= OP_WRITE && s->extent_tpl[op] && !(op == OP_WRITE && (op_flags & FUA_FLAG))) {
		/* A FUA write goes to Python: the image's flush makes the mapping durable too. */
		int64_t host = extent_host(s, start << 9, len,
					   op == OP_READ ? EXTENT_READABLE : EXTENT_WRITABLE);
		if (host < 0)
			return 0;
		queue_rw(s, tag, s->extent_tpl[op], (uint64_t)host, len, 0, tail);
		s->tag_epoch[tag] = (uint8_t)s->epoch;
		s->tag_len[tag] = len;
		s->inflight[s->epoch]++;
		s->extent_ios++;
		res = (int32_t)len;
	} else if (inline_op && !(op == OP_WRITE && (op_flags & FUA_FLAG))) {
		uint64_t off = start << 9;
		if (len > s->buf_size)
			return 0;
		if (s->extents) {
			int64_t host = extent_host(s, off, len,
						   op == OP_READ ? EXTENT_READABLE : EXTENT_WRITABLE);
			if (host < 0)
				return 0;
			off = (uint64_t)host;
		}
		uint8_t *buf = s->bufs + (size_t)tag * s->buf_size;
		ssize_t done = op == OP_READ ? pread(s->inline_fd, buf, len, (off_t)off)
					     : pwrite(s->inline_fd, buf, len, (off_t)off);
		if (done != (ssize_t)len)
			return 0; /* Python runs it again, whole, and reports what fails */
		s->inline_ios++;
		res = (int32_t)len;
	} else if (s->flags & FL_NULL) {
		/* As ublksrv's null target: a READ returns the tag's buffer as it is (zeros until
		 * that tag first carries a WRITE), not a fresh memset; the mem backend reads zeros. */
		if (op == OP_READ || op == OP_WRITE) {
			if (len > s->buf_size)
				return 0;
			res = (int32_t)len;
		} else if (op == OP_FLUSH || op == OP_DISCARD || op == OP_WRITE_ZEROES) {
			res = 0;
		} else {
			return 0;
		}
	} else {
		return 0;
	}
	queue_commit(s, tag, res, tail);
	count(s, op, len, done_ops);
	return 1;
}

/* Serve until Python is needed. Returns how many CQEs were copied to s->out (0 on a timeout,
 * EINTR or after max_requests), or -errno. */
long fl_run(struct fl_state *s)
{
	uint32_t tail = __atomic_load_n(s->sq_tail, __ATOMIC_RELAXED);
	uint64_t handled = 0;
	uint64_t started = (s->flags & FL_TIMING) ? now_ns() : 0;
	struct __kernel_timespec { int64_t tv_sec; int64_t tv_nsec; } ts = {
		s->timeout_ns / 1000000000, s->timeout_ns % 1000000000 };
	struct getevents_arg arg = { 0, 8, 0, (uint64_t)(uintptr_t)&ts };
	for (;;) {
		uint32_t to_submit = tail - __atomic_load_n(s->sq_head, __ATOMIC_ACQUIRE);
		uint32_t ready = __atomic_load_n(s->cq_tail, __ATOMIC_ACQUIRE) - *s->cq_head;
		long ret = 0;
		if (!ready) {
			if (s->flags & FL_TIMEOUT)
				ret = enter(s->ring_fd, to_submit, 1, ENTER_GETEVENTS | ENTER_EXT_ARG,
					    &arg, sizeof(arg));
			else
				ret = enter(s->ring_fd, to_submit, 1, ENTER_GETEVENTS, NULL, 0);
		} else if (to_submit) {
			ret = enter(s->ring_fd, to_submit, 0, 0, NULL, 0);
		}
		if (ret < 0) {
			int err = errno;
			if (err == EINTR || err == ETIME)
				return 0;
			if (err != EBUSY)
				return -err;
		}
		uint32_t head = *s->cq_head;
		uint32_t ctail = __atomic_load_n(s->cq_tail, __ATOMIC_ACQUIRE);
		if (head == ctail && !ready && ret >= 0 && (s->flags & FL_TIMEOUT))
			return 0; /* woken without a completion: let Python look around */
		uint64_t t0 = (s->flags & FL_TIMING) ? now_ns() : 0;
		uint64_t done_ops[NOPS] = { 0 };
		uint32_t out = 0;
		for (; head != ctail; head++) {
			struct cqe *c = &s->cqes[head & s->cq_mask];
			if (c->res == 0 && c->user_data < s->depth &&
			    serve(s, (uint32_t)c->user_data, &tail, done_ops)) {
				handled++;
				continue;
			}
			if (c->user_data >> 16 == KIND_RING_RW) {
				uint32_t tag = (uint32_t)(c->user_data & 0xffff);
				uint32_t nr_sectors;
				if (tag < s->depth) {
					memcpy(&nr_sectors, s->descs + (size_t)tag * 24 + 4, 4);
					if (c->res >= 0 && (uint32_t)c->res == nr_sectors << 9) {
						queue_commit(s, tag, c->res, &tail);
						continue;
					}
				}
			}
			if (c->user_data >> 16 == KIND_EXTENT && s->extents) {
				uint32_t tag = (uint32_t)(c->user_data & 0xffff);
				if (tag < s->depth && c->res >= 0 && (uint32_t)c->res == s->tag_len[tag]) {
					/* done in full; its linked commit runs now */
					s->inflight[s->tag_epoch[tag]]--;
					continue;
				}
			}
			if (out == s->out_cap)
				break; /* the rest waits for the next call */
			s->out[out++] = *c;
		}
		__atomic_store_n(s->cq_head, head, __ATOMIC_RELEASE);
		__atomic_store_n(s->sq_tail, tail, __ATOMIC_RELEASE);
		uint64_t t1 = 0;
		if (s->flags & FL_TIMING) {
			t1 = now_ns();
			uint64_t spent = t1 - t0;
			for (int op = 0; op < NOPS; op++) {
				if (!done_ops[op])
					continue;
				s->latency_ns[op] += spent * done_ops[op];
				if (spent > s->max_latency_ns[op])
					s->max_latency_ns[op] = spent;
			}
		}
		if (out)
			return out;
		if (s->max_requests && handled >= s->max_requests)
			return 0;
		if (s->report_ns && t1 && t1 - started >= s->report_ns)
			return 0;
	}
}
