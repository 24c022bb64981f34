# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 4: discard and write-zeroes from the guest. The device must offer both
# (discard_max_bytes, write_zeroes_max_bytes > 0). For each range below (whole
# regions, inside one region, straddling a region boundary, odd sectors, more
# than one request) the guest reads a window of range +-64 KiB, issues the
# op, reads the window again and checks: the 64 KiB margins are unchanged;
# inside, zeroout (BLKZEROOUT = WRITE_ZEROES) and punch (fallocate
# PUNCH_HOLE = WRITE_ZEROES with unmap) read all zero; discard reads, per
# sector, unchanged or zero (virtio leaves it unspecified; anything else is
# wrong). A new daemon + guest must then read each window identically.
# Sabotage: overwrite 512 bytes inside a zeroed range between the daemons.
BACKENDS="vhost-clone qsd"

OPS="zeroout:$((16 * M)):$((4 * M)) \
zeroout:$((24 * M + 4 * K)):$((8 * K)) \
zeroout:$((32 * M + 60 * K)):$((8 * K)) \
zeroout:$((40 * M + 512)):$((M + 1024)) \
zeroout:$((128 * M)):$((20 * M)) \
punch:$((48 * M + 32 * K)):$((2 * M)) \
discard:$((64 * M)):$((4 * M)) \
discard:$((72 * M + 4 * K)):$((8 * K)) \
discard:$((80 * M + 60 * K)):$((8 * K)) \
discard:$((88 * M + 512)):$((M + 1024)) \
discard:$((160 * M)):$((20 * M))"

run_case() {
	fresh_files
	daemon_start
	boot ops OPS="$OPS" <<'GUEST'
check_device
[ "$(cat /sys/block/vda/queue/discard_max_bytes)" -gt 0 ] || fail "no discard support"
[ "$(cat /sys/block/vda/queue/write_zeroes_max_bytes)" -gt 0 ] || fail "no write-zeroes support"
for op in $OPS; do
	kind=${op%%:*}; rest=${op#*:}; off=${rest%%:*}; len=${rest#*:}
	# With 4 KiB logical blocks (--direct) only whole blocks can be asked for.
	r=$(lbs_inward $off $len); off=${r% *} len=${r#* }
	[ "$len" -gt 0 ] || { log "$op: no whole $LBS-byte block, skipped"; continue; }
	woff=$((off - 64 * K)); wlen=$((len + 128 * K))
	win() { dd if=$DEV of=$1 bs=64k iflag=skip_bytes,count_bytes,direct skip=$woff count=$wlen 2>/dev/null || fail "read $op"; }
	win /tmp/before
	blkop $kind $off $len $DEV || fail "blkop $op"
	win /tmp/after
	mode=zero; [ $kind = discard ] && mode=discard
	r=$(blkop cmpwin $mode $((64 * K)) /tmp/before /tmp/after) || fail "$op: $r"
	log "$op: $r"
	event win $woff:$wlen:$(md5sum < /tmp/after | cut -d' ' -f1)
done
GUEST
	local wins
	wins=$(event_values ops win)
	[ "$(echo $wins | wc -w)" -gt 0 ] && [ "$(echo $wins | wc -w)" -le "$(echo $OPS | wc -w)" ] ||
		die "missing window sums from guest ops"
	daemon_stop
	offline_check
	sabotage "overwrite 512 bytes inside the zeroed range at 16 MiB" corrupt $((17 * M))
	daemon_start
	boot reread SPANS="$wins" <<'GUEST'
check_device
check_spans "$SPANS"
GUEST
	daemon_stop
	offline_check
	source_unchanged
}
