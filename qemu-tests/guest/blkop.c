/* blkop: the block ioctls that busybox lacks, for the qemu-tests guest.
 *   blkop discard OFFSET LENGTH DEV   BLKDISCARD  (-> VIRTIO_BLK_T_DISCARD)
 *   blkop zeroout OFFSET LENGTH DEV   BLKZEROOUT  (-> VIRTIO_BLK_T_WRITE_ZEROES, no unmap)
 *   blkop punch   OFFSET LENGTH DEV   fallocate(PUNCH_HOLE) (-> WRITE_ZEROES with unmap)
 *   blkop cmpwin zero|discard MARGIN BEFORE AFTER
 *       BEFORE and AFTER are copies of a window read before and after an op on
 *       the range [MARGIN, size - MARGIN) of the window. The margins must be
 *       unchanged. Inside, "zero": every byte 0; "discard": each 512-byte
 *       sector unchanged or all zero (virtio leaves discarded data unspecified,
 *       but neither garbage nor someone else's data is acceptable).
 *   blkop stamp write|check SEED OFFSET STRIDE COUNT DEV [PASSES [STALL_MS]]
 *       COUNT blocks of 4 KiB at OFFSET + i * STRIDE, one at a time with
 *       O_DIRECT. Each block is stamped: a header (magic, SEED, its offset)
 *       and a body derived from both. "write" writes them in order, PASSES
 *       times (default 1; pass p stamps with SEED + p), never flushes, and
 *       stops early after the first write slower than STALL_MS (if given and
 *       not 0): a write that stalled while the daemon was down. It prints
 *       "stamp write: N blocks in T ms, slowest S ms, last pass P block B".
 *       Blocks 0..B then hold pass P's stamps, the rest pass P-1's.
 *       "check" (PASSES must be 1) reads them back and prints "stamp check:
 *       N blocks, K ok, B lost (Z zero, F foreign, T torn)" (foreign: no
 *       stamp, e.g. the source's data, or an older stamp of this block; torn:
 *       its header with a wrong body), naming the first 5 lost blocks on
 *       stderr. Exit 1 if any block is lost.
 * OFFSET and LENGTH are bytes (multiples of 512). Exit 0 on success. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static char *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f) {
		perror(path);
		exit(1);
	}
	fseek(f, 0, SEEK_END);
	*len = (size_t)ftell(f);
	rewind(f);
	char *buf = malloc(*len ? *len : 1);
	if (!buf || fread(buf, 1, *len, f) != *len) {
		fprintf(stderr, "%s: read failed\n", path);
		exit(1);
	}
	fclose(f);
	return buf;
}

static int cmpwin(const char *mode, size_t margin, const char *before_path, const char *after_path)
{
	size_t n, n2, zeroed = 0, kept = 0, bad = 0;
	char *b = slurp(before_path, &n), *a = slurp(after_path, &n2);
	static const char zero[512];
	if (n != n2 || n < 2 * margin || margin % 512 || n % 512) {
		fprintf(stderr, "cmpwin: bad sizes %zu %zu margin %zu\n", n, n2, margin);
		return 1;
	}
	for (size_t off = 0; off < n; off += 512) {
		int same = !memcmp(a + off, b + off, 512), isz = !memcmp(a + off, zero, 512);
		int inside = off >= margin && off < n - margin;
		int ok = !inside ? same : !strcmp(mode, "zero") ? isz : (same || isz);
		if (!ok) {
			if (bad < 5)
				fprintf(stderr, "cmpwin %s: sector at window offset %zu is %s\n", mode, off,
					inside ? "neither zero nor unchanged" : "changed outside the range");
			bad++;
		} else if (inside) {
			zeroed += isz;
			kept += !isz;
		}
	}
	printf("cmpwin %s: %zu sectors zero, %zu unchanged, %zu bad\n", mode, zeroed, kept, bad);
	return bad ? 1 : 0;
}

#define STAMP_BS 4096
#define STAMP_MAGIC 0x504d415453435643ull /* "CVCSTAMP" in memory (little endian) */

static uint64_t splitmix(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* the content of the block at OFF for SEED: header, then pseudo-random words */
static void stamp_fill(uint64_t *w, uint64_t seed, uint64_t off)
{
	uint64_t x = seed * 0x2545f4914f6cdd1dull ^ off;
	w[0] = STAMP_MAGIC;
	w[1] = seed;
	w[2] = off;
	for (size_t i = 3; i < STAMP_BS / 8; i++)
		w[i] = splitmix(&x);
}

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int stamp(const char *op, uint64_t seed, uint64_t off, uint64_t stride, uint64_t count,
		 const char *dev, uint64_t passes, double stall_ms)
{
	int wr = !strcmp(op, "write");
	if ((!wr && strcmp(op, "check")) || !passes || (!wr && passes != 1)) {
		fprintf(stderr, "blkop stamp: bad op %s or pass count %llu\n", op, (unsigned long long)passes);
		return 2;
	}
	if (off % STAMP_BS || stride % STAMP_BS || !stride || !count) {
		fprintf(stderr, "blkop stamp: OFFSET and STRIDE must be multiples of %d, COUNT > 0\n",
			STAMP_BS);
		return 2;
	}
	int fd = open(dev, (wr ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		perror(dev);
		return 1;
	}
	uint64_t *want, *got;
	if (posix_memalign((void **)&want, STAMP_BS, STAMP_BS) ||
	    posix_memalign((void **)&got, STAMP_BS, STAMP_BS)) {
		fprintf(stderr, "blkop stamp: out of memory\n");
		return 1;
	}
	static const char zero[STAMP_BS];
	size_t ok = 0, zeroed = 0, foreign = 0, torn = 0;
	double t0 = now_ms(), slowest = 0;
	uint64_t i;
	for (i = 0; i < count * passes; i++) {
		uint64_t o = off + (i % count) * stride, s = seed + i / count;
		stamp_fill(want, s, o);
		double t1 = now_ms();
		ssize_t n = wr ? pwrite(fd, want, STAMP_BS, (off_t)o) : pread(fd, got, STAMP_BS, (off_t)o);
		if (n != STAMP_BS) {
			fprintf(stderr, "blkop stamp %s: block at %llu: %s\n", op, (unsigned long long)o,
				n < 0 ? strerror(errno) : "short transfer");
			return 1;
		}
		double t = now_ms() - t1;
		if (t > slowest)
			slowest = t;
		if (wr && stall_ms > 0 && t > stall_ms) {
			i++;
			break;
		}
		if (wr)
			continue;
		char what[64] = "";
		if (!memcmp(got, want, STAMP_BS))
			ok++;
		else if (!memcmp(got, zero, STAMP_BS))
			zeroed++, strcpy(what, "all zero");
		else if (got[0] == STAMP_MAGIC && got[2] == o && got[1] != seed)
			foreign++, snprintf(what, sizeof(what), "an older stamp (seed %llu)",
					    (unsigned long long)got[1]);
		else if (got[0] != STAMP_MAGIC || got[1] != seed || got[2] != o)
			foreign++, strcpy(what, "no stamp (the source's data?)");
		else
			torn++, strcpy(what, "its header, a wrong body");
		if (*what && zeroed + foreign + torn <= 5)
			fprintf(stderr, "blkop stamp: block at %llu lost: %s\n", (unsigned long long)o, what);
	}
	close(fd);
	if (wr) {
		printf("stamp write: %llu blocks in %.0f ms, slowest %.0f ms, last pass %llu block %llu\n",
		       (unsigned long long)i, now_ms() - t0, slowest, (unsigned long long)((i - 1) / count),
		       (unsigned long long)((i - 1) % count));
		return 0;
	}
	size_t lost = zeroed + foreign + torn;
	printf("stamp check: %llu blocks, %zu ok, %zu lost (%zu zero, %zu foreign, %zu torn)\n",
	       (unsigned long long)count, ok, lost, zeroed, foreign, torn);
	return lost ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc >= 8 && argc <= 10 && !strcmp(argv[1], "stamp"))
		return stamp(argv[2], strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0),
			     strtoull(argv[5], NULL, 0), strtoull(argv[6], NULL, 0), argv[7],
			     argc >= 9 ? strtoull(argv[8], NULL, 0) : 1,
			     argc >= 10 ? strtod(argv[9], NULL) : 0);
	if (argc == 6 && !strcmp(argv[1], "cmpwin"))
		return cmpwin(argv[2], strtoull(argv[3], NULL, 0), argv[4], argv[5]);
	if (argc != 5) {
		fprintf(stderr, "usage: blkop discard|zeroout|punch OFFSET LENGTH DEV\n"
				"       blkop cmpwin zero|discard MARGIN BEFORE AFTER\n"
				"       blkop stamp write|check SEED OFFSET STRIDE COUNT DEV [PASSES [STALL_MS]]\n");
		return 2;
	}
	uint64_t range[2] = { strtoull(argv[2], NULL, 0), strtoull(argv[3], NULL, 0) };
	int fd = open(argv[4], O_RDWR | O_DIRECT);
	if (fd < 0) {
		perror(argv[4]);
		return 1;
	}
	int rc;
	if (!strcmp(argv[1], "discard"))
		rc = ioctl(fd, BLKDISCARD, range);
	else if (!strcmp(argv[1], "zeroout"))
		rc = ioctl(fd, BLKZEROOUT, range);
	else if (!strcmp(argv[1], "punch"))
		rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			       (off_t)range[0], (off_t)range[1]);
	else {
		fprintf(stderr, "blkop: unknown op %s\n", argv[1]);
		return 2;
	}
	if (rc) {
		fprintf(stderr, "blkop %s %s %s: %s\n", argv[1], argv[2], argv[3], strerror(errno));
		return 1;
	}
	return 0;
}
