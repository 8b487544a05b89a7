/* The compiled fast path of an NBD connection (optional; vdisk/nbd/fastpath.py builds and loads it).
 *
 * nbd_serve() is the transmission loop of vdisk/nbd/server.py for the requests that need no
 * Python on a host file: a READ (flags: FUA at most) shorter than read_max, read into the reply
 * arena behind its header, and a WRITE without flags, its payload received whole into the
 * receive buffer and written with one pwrite. It receives, reads, writes and sends without the
 * GIL (ctypes releases it around the call), one send per batch of buffered requests, as the
 * Python loop does, and returns to Python, every reply sent, with the receive buffer from the
 * first request it does not serve: any other command, flag or magic, a request past the end,
 * a READ or WRITE that failed or came up short (Python serves it again, with the same outcome),
 * the peer's EOF, a socket error, or max_requests requests served (for the metrics).
 *
 * A WRITE of at least async_min bytes is received into one of two payload slots and written by
 * a writer thread while the next request is received (a 1 MiB pwrite on tmpfs takes about as
 * long as receiving the next 1 MiB): at most one such write is in flight, and the loop waits
 * for it before anything else is served, before it blocks for a request header with nothing
 * buffered (the client may be waiting for that reply), and before it returns. A failed one
 * (which cannot be handed back: the payload is consumed) returns RET_WRITE_FAILED with its
 * cookie and errno for Python to answer, the request received after it put back in the buffer.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_FLAG_FUA 1u
#define REPLY_FLAG_DONE 1u
#define REPLY_TYPE_OFFSET_DATA 1u
#define REQUEST_SIZE 28u
#define SIMPLE_REPLY_SIZE 16u
#define READ_CHUNK_SIZE 28u  /* structured chunk header (20) and the data's offset (8) */
#define IN_START (256u << 10)

#define RET_HANDBACK 0  /* the buffer starts with a request for Python */
#define RET_PAUSE 1     /* max_requests served */
#define RET_EOF 2       /* the peer closed its side (the buffer may hold a partial request) */
#define RET_WRITE_FAILED 3 /* failed_cookie's write failed with failed_errno */

struct writer {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int started, quit, busy;  /* busy: a write handed over and not done */
	const uint8_t *data;
	uint64_t offset, length;
	int fd;
	int error;                /* the last write's errno (0: written whole) */
	uint8_t *slot[2];
	uint64_t slot_cap[2];
	int next_slot;
	uint8_t cookie[8];        /* the write in flight's */
};

struct nbd_state {
	int32_t sock;
	int32_t fd;
	uint32_t structured;
	uint32_t writes;         /* serve WRITEs (writable, no FUA, zero detection or bitmaps) */
	uint64_t size;           /* the export's */
	uint64_t read_max;       /* serve READs shorter than this */
	uint64_t max_payload;
	uint64_t max_requests;   /* return after this many (0: never) */
	uint8_t *in;             /* receive buffer: bytes in_start..in_end not taken yet */
	uint64_t in_cap;
	uint64_t in_start;
	uint64_t in_end;
	uint8_t *out;            /* reply arena */
	uint64_t out_cap;
	/* tallies since Python last took them: READ, WRITE */
	uint64_t count[2];
	uint64_t bytes[2];
	uint64_t latency_ns[2];  /* sum over requests of their batch's service time */
	uint64_t async_min;      /* WRITEs this long go to the writer thread (0: none do) */
	uint8_t failed_cookie[8];
	int32_t failed_errno;
	struct writer *writer;
	uint64_t poll_ns;        /* with nothing buffered, poll this long before blocking */
};

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64(const uint8_t *p)
{
	return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static void put64(uint8_t *p, uint64_t v)
{
	put32(p, v >> 32);
	put32(p + 4, (uint32_t)v);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *writer_main(void *arg)
{
	struct writer *w = arg;
	pthread_mutex_lock(&w->lock);
	for (;;) {
		while (!w->busy && !w->quit)
			pthread_cond_wait(&w->cond, &w->lock);
		if (w->quit)
			break;
		const uint8_t *data = w->data;
		uint64_t offset = w->offset, left = w->length;
		pthread_mutex_unlock(&w->lock);
		int error = 0;
		while (left) {  /* a short write is carried on, as the device would */
			ssize_t n = pwrite(w->fd, data, left, (off_t)offset);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				error = n < 0 ? errno : ENOSPC;
				break;
			}
			data += n;
			offset += (uint64_t)n;
			left -= (uint64_t)n;
		}
		pthread_mutex_lock(&w->lock);
		w->error = error;
		w->busy = 0;
		pthread_cond_broadcast(&w->cond);
	}
	pthread_mutex_unlock(&w->lock);
	return NULL;
}

/* Wait for the write in flight: its errno (0: done). */
static int writer_wait(struct writer *w)
{
	pthread_mutex_lock(&w->lock);
	while (w->busy)
		pthread_cond_wait(&w->cond, &w->lock);
	pthread_mutex_unlock(&w->lock);
	return w->error;
}

/* Free the buffers and stop the writer (the state itself is Python's). */
void nbd_free(struct nbd_state *s)
{
	struct writer *w = s->writer;
	if (w != NULL) {
		if (w->started) {
			pthread_mutex_lock(&w->lock);
			w->quit = 1;
			pthread_cond_broadcast(&w->cond);
			pthread_mutex_unlock(&w->lock);
			pthread_join(w->thread, NULL);
		}
		pthread_mutex_destroy(&w->lock);
		pthread_cond_destroy(&w->cond);
		free(w->slot[0]);
		free(w->slot[1]);
		free(w);
		s->writer = NULL;
	}
	free(s->in);
	free(s->out);
	s->in = s->out = NULL;
	s->in_cap = s->out_cap = s->in_start = s->in_end = 0;
}

static int send_all(struct nbd_state *s, uint64_t *pos)
{
	uint64_t done = 0;
	while (done < *pos) {
		ssize_t n = send(s->sock, s->out + done, *pos - done, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		done += (uint64_t)n;
	}
	*pos = 0;
	return 0;
}

/* Receive until `need` bytes from in_start are buffered, moving or growing the buffer to hold
 * them contiguously, no more than that when `exact`. 1: done; 0: EOF; <0: -errno. */
static int fill(struct nbd_state *s, uint64_t need, int exact)
{
	uint64_t have = s->in_end - s->in_start;
	if (s->in_cap - s->in_start < need) {
		if (s->in_cap < need) {
			uint64_t cap = s->in_cap ? s->in_cap : IN_START;
			while (cap < need)
				cap *= 2;
			uint8_t *in = malloc(cap);
			if (in == NULL)
				return -ENOMEM;
			if (have)
				memcpy(in, s->in + s->in_start, have);
			free(s->in);
			s->in = in;
			s->in_cap = cap;
		} else {
			memmove(s->in, s->in + s->in_start, have);
		}
		s->in_start = 0;
		s->in_end = have;
	}
	while (s->in_end - s->in_start < need) {
		uint64_t room = s->in_cap - s->in_end;
		if (exact)
			room = need - (s->in_end - s->in_start);
		ssize_t n = recv(s->sock, s->in + s->in_end, room, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return 0;
		s->in_end += (uint64_t)n;
	}
	return 1;
}

/* Poll the socket for up to poll_ns before fill() blocks: a client in a tight loop (QD1) sends
 * its next request within microseconds, and catching it awake saves the sleep and the wake-up,
 * which on an idle host cost more than the request (QEMU's iothreads poll for the same reason).
 * Yields the CPU at each turn, so runnable threads are not kept waiting. 1: go on (data or
 * not); 0: EOF; <0: -errno. */
static int poll_briefly(struct nbd_state *s, uint64_t room)
{
	uint64_t deadline = now_ns() + s->poll_ns;
	for (;;) {
		ssize_t n = recv(s->sock, s->in + s->in_end, room, MSG_DONTWAIT);
		if (n > 0) {
			s->in_end += (uint64_t)n;
			return 1;
		}
		if (n == 0)
			return 0;
		if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
			return -errno;
		if (now_ns() >= deadline)
			return 1;
		sched_yield();
	}
}

static void tally(struct nbd_state *s, const uint64_t batch[2], uint64_t t0)
{
	uint64_t elapsed = now_ns() - t0;
	for (int op = 0; op < 2; op++) {
		s->count[op] += batch[op];
		s->latency_ns[op] += batch[op] * elapsed;
	}
}

/* Put a request back in front of the buffer (header, then `got` bytes of its payload). */
static int unread(struct nbd_state *s, const uint8_t *header, const uint8_t *payload, uint64_t got)
{
	uint64_t have = s->in_end - s->in_start, need = REQUEST_SIZE + got + have;
	uint8_t *in = malloc(need > IN_START ? need : IN_START);
	if (in == NULL)
		return -ENOMEM;
	memcpy(in, header, REQUEST_SIZE);
	if (got)
		memcpy(in + REQUEST_SIZE, payload, got);
	if (have)
		memcpy(in + REQUEST_SIZE + got, s->in + s->in_start, have);
	free(s->in);
	s->in = in;
	s->in_cap = need > IN_START ? need : IN_START;
	s->in_start = 0;
	s->in_end = need;
	return 0;
}

static void put_simple_reply(uint8_t *reply, const uint8_t *cookie)
{
	put32(reply, SIMPLE_REPLY_MAGIC);
	put32(reply + 4, 0);
	memcpy(reply + 8, cookie, 8);
}

/* Finish the write in flight, if any: its reply queued at out[*pos], or 0 < its errno (kept in
 * failed_*). */
static int finish_write(struct nbd_state *s, uint64_t *pos, uint64_t *inflight, uint64_t *batch)
{
	if (!*inflight)
		return 0;
	struct writer *w = s->writer;
	int error = writer_wait(w);
	if (error) {
		memcpy(s->failed_cookie, w->cookie, 8);
		s->failed_errno = error;
		*inflight = 0;
		return error;
	}
	if (*pos + SIMPLE_REPLY_SIZE > s->out_cap) {
		int rc = send_all(s, pos);
		if (rc < 0)
			return rc;
	}
	put_simple_reply(s->out + *pos, w->cookie);
	*pos += SIMPLE_REPLY_SIZE;
	batch[1]++;
	s->bytes[1] += *inflight;
	*inflight = 0;
	return 0;
}

/* The writer thread, started on the first long WRITE; 0 when it cannot be (the long WRITEs are
 * then written in line, as the short ones). */
static int writer_start(struct nbd_state *s)
{
	struct writer *w = calloc(1, sizeof(*w));
	if (w == NULL)
		return 0;
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	w->fd = s->fd;
	s->writer = w;
	if (pthread_create(&w->thread, NULL, writer_main, w) != 0)
		return 0;
	w->started = 1;
	return 1;
}

/* Receive a long WRITE (header at in_start) into a free payload slot and hand it to the writer
 * (after the one in flight): 0, else RET_* or -errno to return with. */
static long async_write(struct nbd_state *s, uint64_t *pos, uint64_t *inflight, uint64_t *batch,
			uint64_t offset, uint64_t length)
{
	struct writer *w = s->writer;
	int rc;
	int k = w->next_slot;
	if (w->slot_cap[k] < length) {
		free(w->slot[k]);
		w->slot[k] = malloc(length);
		w->slot_cap[k] = w->slot[k] ? length : 0;
		if (w->slot[k] == NULL)
			return -ENOMEM;
	}
	uint8_t header[REQUEST_SIZE];
	memcpy(header, s->in + s->in_start, REQUEST_SIZE);
	uint64_t got = s->in_end - s->in_start - REQUEST_SIZE;
	if (got > length)
		got = length;
	memcpy(w->slot[k], s->in + s->in_start + REQUEST_SIZE, got);
	s->in_start += REQUEST_SIZE + got;
	if (s->in_start == s->in_end)
		s->in_start = s->in_end = 0;
	if (got < length && (rc = send_all(s, pos)) < 0)
		return rc;
	while (got < length) {
		ssize_t n = recv(s->sock, w->slot[k] + got, length - got, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {  /* gone mid-payload: nothing of it is written; Python sees it cut */
			int error = n < 0 ? errno : 0;
			if ((rc = finish_write(s, pos, inflight, batch)) < 0)
				return rc;
			if ((rc = unread(s, header, w->slot[k], got)) < 0)
				return rc;
			if (s->failed_errno)
				return RET_WRITE_FAILED;
			return error ? -error : RET_EOF;
		}
		got += (uint64_t)n;
	}
	if ((rc = finish_write(s, pos, inflight, batch)) != 0) {
		if (rc < 0)
			return rc;
		if ((rc = unread(s, header, w->slot[k], length)) < 0)
			return rc;
		return RET_WRITE_FAILED;
	}
	pthread_mutex_lock(&w->lock);
	w->data = w->slot[k];
	w->offset = offset;
	w->length = length;
	memcpy(w->cookie, header + 8, 8);
	w->busy = 1;
	pthread_cond_broadcast(&w->cond);
	pthread_mutex_unlock(&w->lock);
	w->next_slot = 1 - k;
	*inflight = length;
	return 0;
}

long nbd_serve(struct nbd_state *s)
{
	uint64_t pos = 0, served = 0, batch[2] = {0, 0}, t0 = 0;
	uint64_t inflight = 0;  /* the length of the writer's write in flight (0: none) */
	int streaming = 0;      /* the last request was a long WRITE */
	uint64_t read_hdr = s->structured ? READ_CHUNK_SIZE : SIMPLE_REPLY_SIZE;
	long ret = RET_HANDBACK;
	int rc;
	if (s->out == NULL) {
		s->out_cap = 2u << 20;
		if (s->out_cap < read_hdr + s->read_max)
			s->out_cap = read_hdr + s->read_max;
		s->out = malloc(s->out_cap);
		if (s->out == NULL)
			return -ENOMEM;
	}
	for (;;) {
		if (s->in_end - s->in_start < REQUEST_SIZE) {
			if (inflight) {
				/* the client may be waiting for that write's reply before it sends more */
				struct pollfd pfd = {.fd = s->sock, .events = POLLIN};
				int more = s->in_end > s->in_start || poll(&pfd, 1, 0) > 0;
				if (!more || (s->max_requests && served >= s->max_requests)) {
					if ((rc = finish_write(s, &pos, &inflight, batch)) < 0)
						return rc;
					if (rc > 0) {
						ret = RET_WRITE_FAILED;
						break;
					}
				}
			}
			/* every reply of the batch in one send, then wait for the next requests */
			int lone_read = batch[0] == 1 && batch[1] == 0 && !inflight;
			if (batch[0] || batch[1]) {
				tally(s, batch, t0);
				batch[0] = batch[1] = 0;
			}
			if ((rc = send_all(s, &pos)) < 0)
				return rc;
			if (!inflight && s->max_requests && served >= s->max_requests)
				return RET_PAUSE;
			if (s->in_start == s->in_end)
				s->in_start = s->in_end = 0;
			/* after a long WRITE, take the next header alone: if it is another, its
			 * payload is then received straight into a slot, not copied there */
			/* only after a batch of one READ (a QD1 reader): polling between deeper or
			 * write batches took CPU from the client and the writer (4K and 1M writes QD8:
			 * 0.90x and 0.82x without it) */
			if (s->poll_ns && lone_read && s->in_start == s->in_end) {
				rc = poll_briefly(s, streaming ? REQUEST_SIZE : s->in_cap - s->in_end);
				if (rc <= 0) {
					ret = rc == 0 ? RET_EOF : rc;
					break;
				}
			}
			rc = fill(s, REQUEST_SIZE, streaming);
			if (rc <= 0) {
				ret = rc == 0 ? RET_EOF : rc;
				break;
			}
			t0 = now_ns();
			continue;
		}
		const uint8_t *req = s->in + s->in_start;
		uint32_t magic = be32(req);
		uint32_t flags = (uint32_t)req[4] << 8 | req[5];
		uint32_t type = (uint32_t)req[6] << 8 | req[7];
		uint64_t offset = be64(req + 16);
		uint64_t length = be32(req + 24);
		if (magic != REQUEST_MAGIC || length > s->max_payload || offset > s->size ||
		    length > s->size - offset)
			break;
		int is_write = type == CMD_WRITE && flags == 0 && s->writes;
		streaming = is_write && s->async_min && length >= s->async_min;
		if (streaming && s->writer == NULL && !writer_start(s))
			s->async_min = streaming = 0;
		if (streaming) {
			long r = async_write(s, &pos, &inflight, batch, offset, length);
			if (r != 0) {
				ret = r;
				break;
			}
			served++;
			continue;
		}
		if (inflight && (is_write || type == CMD_READ)) {
			if ((rc = finish_write(s, &pos, &inflight, batch)) < 0)
				return rc;
			if (rc > 0) {
				ret = RET_WRITE_FAILED;
				break;
			}
		}
		if (type == CMD_READ && !(flags & ~CMD_FLAG_FUA) && length < s->read_max) {
			if (pos + read_hdr + length > s->out_cap && (rc = send_all(s, &pos)) < 0)
				return rc;
			uint8_t *reply = s->out + pos;
			ssize_t n;
			do
				n = pread(s->fd, reply + read_hdr, length, (off_t)offset);
			while (n < 0 && errno == EINTR);
			if (n != (ssize_t)length)
				break;
			if (s->structured) {
				put32(reply, STRUCTURED_REPLY_MAGIC);
				reply[4] = 0;
				reply[5] = REPLY_FLAG_DONE;
				reply[6] = 0;
				reply[7] = REPLY_TYPE_OFFSET_DATA;
				memcpy(reply + 8, req + 8, 8);  /* the cookie, as sent */
				put32(reply + 16, (uint32_t)length + 8);
				put64(reply + 20, offset);
			} else {
				put_simple_reply(reply, req + 8);
			}
			pos += read_hdr + length;
			s->in_start += REQUEST_SIZE;
			batch[0]++;
			s->bytes[0] += length;
		} else if (is_write) {
			if (s->in_end - s->in_start < REQUEST_SIZE + length) {
				/* the payload is still coming: answer what is done first */
				if ((rc = send_all(s, &pos)) < 0)
					return rc;
				rc = fill(s, REQUEST_SIZE + length, 0);
				if (rc <= 0) {
					ret = rc == 0 ? RET_EOF : rc;
					break;
				}
				req = s->in + s->in_start;
			}
			ssize_t n;
			do
				n = pwrite(s->fd, req + REQUEST_SIZE, length, (off_t)offset);
			while (n < 0 && errno == EINTR);
			if (n != (ssize_t)length)
				break;
			if (pos + SIMPLE_REPLY_SIZE > s->out_cap && (rc = send_all(s, &pos)) < 0)
				return rc;
			put_simple_reply(s->out + pos, req + 8);
			pos += SIMPLE_REPLY_SIZE;
			s->in_start += REQUEST_SIZE + length;
			batch[1]++;
			s->bytes[1] += length;
		} else {
			break;
		}
		served++;
	}
	/* whatever stopped the loop, the write in flight is finished and every reply sent */
	if (inflight && (rc = finish_write(s, &pos, &inflight, batch)) < 0)
		return rc;
	if (s->failed_errno && ret >= 0)
		ret = RET_WRITE_FAILED;
	if (batch[0] || batch[1])
		tally(s, batch, t0);
	if ((rc = send_all(s, &pos)) < 0)
		return rc;
	return ret;
}
