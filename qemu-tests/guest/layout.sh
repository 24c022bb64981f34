# shellcheck shell=sh disable=SC2034  # used by the files that source it
# Disk layout shared by the host (run.sh) and the guest (/lib/vctest.sh).
# Sizes in bytes. The disk is 256 MiB = 4096 regions of 64 KiB (vhost-clone's
# default region size). Zones are placed so that writes are unaligned to
# regions and straddle region boundaries.
M=1048576
K=1024
DISK_BYTES=$((256 * M))
REGION=$((64 * K))

# fio zones of the standard write workload (case 2, 3, 5, 6)
ZA_OFF=$((16 * M));            ZA_LEN=$((32 * M))   # bs=4k: partial regions
ZB_OFF=$((64 * M + 32 * K));   ZB_LEN=$((32 * M))   # bs=64k at +32k: every write straddles a boundary
ZC_OFF=$((112 * M + 7 * 512)); ZC_LEN=$((16 * M))   # bs 512..132k, 512-aligned: odd sectors
# scratch zone: written without verification (unsynced writes, QEMU killed mid-I/O)
ZD_OFF=$((160 * M));           ZD_LEN=$((64 * M))
# marker zone: one 4 KiB block telling a rebooted guest which phase it is in
ZM_OFF=$((224 * M));           ZM_LEN=$((64 * K))

# spans the standard workload never touches: they must keep the source's data
UNTOUCHED_SPANS="0:$ZA_OFF \
$((ZA_OFF + ZA_LEN)):$((ZB_OFF - ZA_OFF - ZA_LEN)) \
$((ZB_OFF + ZB_LEN)):$((ZC_OFF - ZB_OFF - ZB_LEN)) \
$((ZC_OFF + ZC_LEN)):$((ZD_OFF - ZC_OFF - ZC_LEN)) \
$((ZM_OFF + ZM_LEN)):$((DISK_BYTES - ZM_OFF - ZM_LEN))"
