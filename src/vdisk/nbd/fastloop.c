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
 */
#include <errno.h>
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

/* Free the buffers (the state itself is Python's). */
void nbd_free(struct nbd_state *s)
{
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
 * them contiguously. 1: done; 0: EOF; <0: -errno. */
static int fill(struct nbd_state *s, uint64_t need)
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
		ssize_t n = recv(s->sock, s->in + s->in_end, s->in_cap - s->in_end, 0);
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

static void tally(struct nbd_state *s, const uint64_t batch[2], uint64_t t0)
{
	uint64_t elapsed = now_ns() - t0;
	for (int op = 0; op < 2; op++) {
		s->count[op] += batch[op];
		s->latency_ns[op] += batch[op] * elapsed;
	}
}

long nbd_serve(struct nbd_state *s)
{
	uint64_t pos = 0, served = 0, batch[2] = {0, 0}, t0 = 0;
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
			/* every reply of the batch in one send, then wait for the next requests */
			if (batch[0] || batch[1]) {
				tally(s, batch, t0);
				batch[0] = batch[1] = 0;
			}
			if ((rc = send_all(s, &pos)) < 0)
				return rc;
			if (s->max_requests && served >= s->max_requests)
				return RET_PAUSE;
			if (s->in_start == s->in_end)
				s->in_start = s->in_end = 0;
			rc = fill(s, REQUEST_SIZE);
			if (rc <= 0)
				return rc == 0 ? RET_EOF : rc;
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
				put32(reply, SIMPLE_REPLY_MAGIC);
				put32(reply + 4, 0);
				memcpy(reply + 8, req + 8, 8);
			}
			pos += read_hdr + length;
			s->in_start += REQUEST_SIZE;
			batch[0]++;
			s->bytes[0] += length;
		} else if (type == CMD_WRITE && flags == 0 && s->writes) {
			if (s->in_end - s->in_start < REQUEST_SIZE + length) {
				/* the payload is still coming: answer what is done first */
				if ((rc = send_all(s, &pos)) < 0)
					return rc;
				rc = fill(s, REQUEST_SIZE + length);
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
			uint8_t *reply = s->out + pos;
			put32(reply, SIMPLE_REPLY_MAGIC);
			put32(reply + 4, 0);
			memcpy(reply + 8, req + 8, 8);
			pos += SIMPLE_REPLY_SIZE;
			s->in_start += REQUEST_SIZE + length;
			batch[1]++;
			s->bytes[1] += length;
		} else {
			break;
		}
		served++;
	}
	if (batch[0] || batch[1])
		tally(s, batch, t0);
	if ((rc = send_all(s, &pos)) < 0)
		return rc;
	return ret;
}
