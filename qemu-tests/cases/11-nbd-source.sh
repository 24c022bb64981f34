# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 11 (vhost-clone only): a clone of an NBD source, read and written by
# the guest while it hydrates. The source image is exported read-only by an
# NBD server, twice: phase 1 by qemu-nbd over a unix socket
# (`--source nbd+unix:///src?socket=...`), phase 2 by nbdkit's file plugin
# over TCP on 127.0.0.1 (`--source nbd://127.0.0.1:PORT/src`); both allow
# several connections (qemu-nbd --shared=8, so it sets CAN_MULTI_CONN), so
# the daemon opens its default 4. Each phase makes a fresh clone:
# - background hydration is off until the guest has booted, then the host
#   turns it on, limited to 16 MiB/s (--hydration-rate; guest reads are never
#   throttled);
# - the guest reads the whole disk from the top down (16 spans of 16 MiB,
#   O_DIRECT, two at a time) and checks each span's md5 against the source's,
#   while the hydrator copies from the bottom up, so that most reads go to the
#   NBD server for regions not yet hydrated. The host samples the daemon's
#   status at each pair of spans and requires that at least one pair was read
#   entirely above the hydrated part while hydration advanced (else the case
#   no longer tests what it says, and fails). Then it lifts the rate limit
#   (`message hydration-rate 0`);
# - the guest writes the standard workload (zones A, B, C, fio crc32c) and
#   reads it back: partial writes into unhydrated regions copy them from the
#   server first;
# - the host waits until every region is hydrated, stops the daemon (status 0),
#   runs `check` against the export, stops the server, and compares the
#   destination FILE with the source image byte for byte outside zones A-C.
#   The source must be unchanged.
# Sabotage: 512 bytes of the source image at 200 MiB are overwritten after
# the expected sums are taken (phase 2): the server then serves other data.
BACKENDS="vhost-clone"

# Hydration while the guest reads: at most 16 MiB/s, so that the 256 MiB take
# at least 16 s and the guest's first reads (of the top of the disk) surely
# find their regions unhydrated, even on a loaded machine where the guest runs
# slowly. Unlimited, an unthrottled qemu-nbd was hydrated in 2-5 s.
HYDRATION_RATE=16M

# nbd_start qemu-nbd|nbdkit: export $SRC read-only (export name "src"); sets
# SRC_URI for serve/check and EXTRA_PID (ended by cleanup or nbd_stop).
nbd_start() {
	local i port log=$D/$1.log
	case $1 in
	qemu-nbd)
		rm -f "$D/nbd.sock"
		# -t: keep serving after a client disconnects (the daemon reconnects,
		# then `check` connects again); -e 8: 8 clients at once, which also
		# makes qemu-nbd offer CAN_MULTI_CONN for a read-only export.
		"$QEMU_NBD" --read-only --persistent --shared=8 --format=raw --export-name=src \
			--socket="$D/nbd.sock" "$SRC" > "$log" 2>&1 &
		EXTRA_PID=$!
		for ((i = 0; i < 100; i++)); do
			[ -S "$D/nbd.sock" ] && break
			kill -0 "$EXTRA_PID" 2> /dev/null || { cat "$log"; die "qemu-nbd exited at start"; }
			sleep 0.1
		done
		[ -S "$D/nbd.sock" ] || die "qemu-nbd: no socket in 10 s"
		SRC_URI="nbd+unix:///src?socket=$D/nbd.sock"
		;;
	nbdkit)
		# A free port: try random ones until nbdkit binds one (it writes its
		# pid file once it listens, and exits at once when the port is taken).
		for ((i = 0; i < 20; i++)); do
			port=$((20000 + RANDOM % 30000))
			rm -f "$D/nbdkit.pid"
			"$NBDKIT" --foreground --readonly --exit-with-parent --exportname=src \
				--ipaddr=127.0.0.1 --port=$port --pidfile="$D/nbdkit.pid" \
				file "$SRC" > "$log" 2>&1 &
			EXTRA_PID=$!
			while kill -0 "$EXTRA_PID" 2> /dev/null && [ ! -s "$D/nbdkit.pid" ]; do sleep 0.05; done
			[ -s "$D/nbdkit.pid" ] && break
			wait "$EXTRA_PID" 2> /dev/null
			EXTRA_PID=
		done
		[ -n "$EXTRA_PID" ] || { cat "$log"; die "nbdkit did not start (20 ports tried)"; }
		SRC_URI="nbd://127.0.0.1:$port/src"
		;;
	esac
	note "$1 exports the source as $SRC_URI (pid $EXTRA_PID)"
}

nbd_stop() {
	kill -TERM "$EXTRA_PID" 2> /dev/null
	wait "$EXTRA_PID" 2> /dev/null
	EXTRA_PID=
	SRC_URI=
}

# phase NAME SERVER SPANS: one clone of the export, hydrated while the guest
# reads and writes it (see the top of this file). SPANS: "OFF:LEN:MD5 ...",
# top span first, read two at a time ("pairs").
phase() {
	local name=$1 server=$2 spans=$3 st h0 h total k lo ahead=0 mib=0 first=''
	local -a pairs=()
	# the lowest offset of each pair of spans
	set -- $spans
	while [ $# -gt 0 ]; do
		lo=${1%%:*}
		[ $# -gt 1 ] && [ "${2%%:*}" -lt "$lo" ] && lo=${2%%:*}
		pairs+=("$lo")
		shift
		[ $# -gt 0 ] && shift
	done
	rm -f "$DST" "$META"
	nbd_start "$server"
	DAEMON_ARGS="--no-hydration --hydration-rate $HYDRATION_RATE" daemon_start
	boot_start "$name" SPANS="$spans" <<'GUEST'
check_device
event reading
set -- $SPANS
pair=0 # (check_spans uses n)
while [ $# -gt 0 ]; do
	event pair-$pair
	check_spans "$1 ${2:-}" > /dev/null
	shift; [ $# -gt 0 ] && shift
	pair=$((pair + 1))
done
log "spans ok: $(echo $SPANS | wc -w), read top down while the host hydrated bottom up"
event read-done
fio_std write
GUEST
	wait_event "$name" reading
	"$VHOST_CLONE" message --socket-path "$SOCK" enable-hydration > /dev/null || die "enable-hydration failed"
	st=$(hydration_state) || die "status failed"
	h0=${st% *} total=${st#* }
	# Hydration goes bottom up and the guest's reads copy nothing: after H
	# regions are hydrated, exactly [0, H x 64 KiB) is.
	# A pair read entirely above that line when it was done (sampled at the
	# next pair's start, i.e. late, which only overstates H) was read from the
	# NBD server, not from the destination.
	for ((k = 0; k < ${#pairs[@]}; k++)); do
		if ((k + 1 < ${#pairs[@]})); then wait_event "$name" "pair-$((k + 1))"; else wait_event "$name" read-done; fi
		st=$(hydration_state) || die "status failed"
		h=${st% *}
		if ((h * REGION <= pairs[k])); then
			ahead=$((ahead + 1))
			[ -n "$first" ] || first=$h
		fi
	done
	# the rest at full speed while the guest writes
	"$VHOST_CLONE" message --socket-path "$SOCK" hydration-rate 0 > /dev/null || die "hydration-rate 0 failed"
	boot_wait "$name"
	mib=$((ahead * DISK_BYTES / ${#pairs[@]} / M))
	echo "nbd-source: $server: $ahead of ${#pairs[@]} pairs of spans ($mib MiB) read from unhydrated regions while hydration went from $h0 to $h of $total regions"
	[ "$ahead" -gt 0 ] || die "$server: the guest read no span before hydration reached it"
	[ "$first" -gt "$h0" ] || die "$server: no region was hydrated while the guest read from the server"
	wait_hydrated
	daemon_stop
	offline_check
	nbd_stop
	dest_equals_source "$UNTOUCHED_SPANS $ZD_OFF:$ZD_LEN $ZM_OFF:$ZM_LEN"
}

run_case() {
	fresh_files
	local spans
	# the whole disk, top span first (the hydrator goes bottom up)
	spans=$(src_sums "$(whole_disk_spans 16 | tr ' ' '\n' | tac | tr '\n' ' ')")
	phase qemu-nbd-unix qemu-nbd "$spans"
	sabotage "overwrite 512 bytes of the source at 200 MiB" \
		bash -c "chmod u+w '$SRC' && printf '%0512d' 0 | dd of='$SRC' bs=512 seek=409600 conv=notrunc 2>/dev/null"
	phase nbdkit-tcp nbdkit "$spans"
	sabotaging || source_unchanged
}
