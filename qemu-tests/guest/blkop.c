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

int main(int argc, char **argv)
{
	if (argc == 6 && !strcmp(argv[1], "cmpwin"))
		return cmpwin(argv[2], strtoull(argv[3], NULL, 0), argv[4], argv[5]);
	if (argc != 5) {
		fprintf(stderr, "usage: blkop discard|zeroout|punch OFFSET LENGTH DEV\n"
				"       blkop cmpwin zero|discard MARGIN BEFORE AFTER\n");
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
