/* blkop: the block ioctls that busybox lacks, for the qemu-tests guest.
 *   blkop discard OFFSET LENGTH DEV   BLKDISCARD  (-> VIRTIO_BLK_T_DISCARD)
 *   blkop zeroout OFFSET LENGTH DEV   BLKZEROOUT  (-> VIRTIO_BLK_T_WRITE_ZEROES, no unmap)
 *   blkop punch   OFFSET LENGTH DEV   fallocate(PUNCH_HOLE) (-> WRITE_ZEROES with unmap)
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

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: blkop discard|zeroout|punch OFFSET LENGTH DEV\n");
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
