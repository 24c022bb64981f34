# shellcheck shell=bash
# qemu-tests/lib.sh: host-side helpers for the cases (sourced by run.sh).
# A case runs in its own subshell with $D (its work dir) and $BACKEND set.
# Any helper that finds a problem calls `die REASON`, which ends the case.

die() { echo "FAIL: $*" > "$D/fail-reason"; echo "FAIL: $*"; exit 1; }
# skip REASON: the case cannot run on this machine (not a failure; run.sh
# reports it as SKIP and counts it apart)
skip() { echo "$*" > "$D/skip-reason"; echo "SKIP: $*"; exit 77; }
note() { echo "[$(date +%T)] $*"; }
sabotaging() { [ -n "${SABOTAGE:-}" ]; }
# sabotage WHAT CMD...: only in --sabotage mode, run CMD to break the thing
# the case guards; the case must then fail.
sabotage() {
	local what=$1; shift
	sabotaging || return 0
	note "SABOTAGE: $what"
	"$@" || die "sabotage command failed"
}

# ---- files ------------------------------------------------------------------
SRC='' DST='' META='' SOCK=''
# SRC_URI: the source as vhost-clone opens it (serve and check), when it is
# not the file SRC itself: an NBD URI of a server exporting SRC (case 11).
SRC_URI=''
# fresh_files: a new random source image and no destination yet
fresh_files() {
	SRC=$D/source.img DST=$D/dest.img META=$D/dest.meta SOCK=$D/disk.sock
	rm -f "$SRC" "$DST" "$META" "$SOCK"
	head -c "$DISK_BYTES" /dev/urandom > "$SRC"
	chmod 0444 "$SRC"
	SRC_MD5=$(md5sum < "$SRC" | cut -d' ' -f1)
	if [ "$BACKEND" = qsd ]; then
		# QSD's analogue of a clone: a qcow2 overlay whose backing file is the
		# read-only source; guest writes allocate clusters in the overlay, and
		# qcow2 keeps its L2 tables in QSD's memory until a flush, which is
		# what makes case 3 able to fail.
		DST=$D/dest.qcow2
		"$QEMU_IMG" create -q -f qcow2 -F raw -b "$SRC" "$DST" || die "qemu-img create"
	fi
}

# src_sums "OFF:LEN ...": print "OFF:LEN:MD5 ..." of the source image
src_sums() {
	local s out=
	for s in $1; do
		out+="$s:$(dd if="$SRC" bs=1M iflag=skip_bytes,count_bytes skip=${s%%:*} count=${s#*:} 2>/dev/null |
			md5sum | cut -d' ' -f1) "
	done
	echo "$out"
}
# whole_disk_spans N: the disk cut in N equal spans
whole_disk_spans() {
	local i n=$1 len=$((DISK_BYTES / $1)) out=
	for ((i = 0; i < n; i++)); do out+="$((i * len)):$len "; done
	echo "$out"
}

source_unchanged() {
	[ "$(md5sum < "$SRC" | cut -d' ' -f1)" = "$SRC_MD5" ] || die "the source image changed"
}

# ---- the daemon -------------------------------------------------------------
DAEMON_PID='' DAEMON_N=0
# DAEMON_ARGS: extra arguments for `vhost-clone serve` (e.g. --commit-interval 0);
# cases set it for themselves. VHOST_CLONE_EXTRA_ARGS (environment) is added to
# every daemon of the run, e.g. "--direct" to run every case with O_DIRECT files
# and so with the io_uring queue engine.
DAEMON_ARGS=${DAEMON_ARGS:-}
VHOST_CLONE_EXTRA_ARGS=${VHOST_CLONE_EXTRA_ARGS:-}
DAEMON_LAST_ARGS=''
daemon_start() {
	DAEMON_N=$((DAEMON_N + 1))
	local log=$D/daemon.$DAEMON_N.log
	DAEMON_LAST_ARGS=$DAEMON_ARGS
	rm -f "$SOCK"
	case $BACKEND in
	vhost-clone)
		"$VHOST_CLONE" serve --source "${SRC_URI:-$SRC}" --dest "$DST" --metadata "$META" \
			--socket-path "$SOCK" --num-queues 2 $DAEMON_ARGS $VHOST_CLONE_EXTRA_ARGS > "$log" 2>&1 &
		;;
	qsd)
		"$QSD" \
			--blockdev driver=file,node-name=src-file,filename="$SRC",read-only=on,cache.direct=off,aio=threads \
			--blockdev driver=raw,node-name=src,file=src-file,read-only=on \
			--blockdev driver=file,node-name=dst-file,filename="$DST",cache.direct=off,aio=threads,discard=unmap \
			--blockdev driver=qcow2,node-name=dst,file=dst-file,backing=src,discard=unmap \
			--export type=vhost-user-blk,id=e,node-name=dst,addr.type=unix,addr.path="$SOCK",writable=on,num-queues=2 \
			> "$log" 2>&1 &
		;;
	esac
	DAEMON_PID=$!
	wait_socket daemon "$log"
	sandbox_check "started"
}

# wait_socket WHAT LOG [NOTE]: wait up to 30 s for $SOCK while $DAEMON_PID lives;
# if it dies first, show the end of LOG and fail.
wait_socket() {
	local what=$1 log=$2 extra=${3:+, $3} i
	for ((i = 0; i < 300; i++)); do
		[ -S "$SOCK" ] && { note "$what $DAEMON_N up (pid $DAEMON_PID$extra)"; return 0; }
		kill -0 "$DAEMON_PID" 2> /dev/null || { tail -20 "$log"; die "$what exited at start"; }
		sleep 0.1
	done
	die "$what socket $SOCK did not appear in 30 s"
}

# sandbox_check [WHEN]: unless the daemon runs with --sandbox none, every thread
# of it runs under a seccomp filter (Seccomp: 2, Seccomp_filters >= 1 in
# /proc/PID/task/*/status). The main thread installs its filter once the
# services run, shortly after the socket appears: wait up to 10 s for that.
sandbox_check() {
	[ "$BACKEND" = vhost-clone ] && [ -n "$DAEMON_PID" ] || return 0
	case " $DAEMON_LAST_ARGS $VHOST_CLONE_EXTRA_ARGS " in *" --sandbox none "* | *" --sandbox=none "*) return 0 ;; esac
	local i t bad n
	for ((i = 0; i < 100; i++)); do
		bad='' n=0
		for t in /proc/"$DAEMON_PID"/task/*; do
			[ -r "$t/status" ] || continue
			n=$((n + 1))
			awk '$1 == "Seccomp:" { m = $2 } $1 == "Seccomp_filters:" { f = $2 }
				END { exit !(m == 2 && f >= 1) }' "$t/status" 2> /dev/null ||
				{ [ -r "$t/status" ] && bad="$bad $(cat "$t/comm" 2> /dev/null)"; }
		done
		[ -z "$bad" ] && [ $n -gt 0 ] && { note "sandbox: $n threads of daemon $DAEMON_N filtered${1:+ ($1)}"; return 0; }
		kill -0 "$DAEMON_PID" 2> /dev/null || die "daemon $DAEMON_N died${1:+ ($1)}"
		sleep 0.1
	done
	die "daemon $DAEMON_N threads without a seccomp filter${1:+ ($1)}:$bad"
}

# daemon_stop: SIGTERM; the daemon must exit by itself, with status 0
daemon_stop() {
	[ -n "$DAEMON_PID" ] || return 0
	sandbox_check "before SIGTERM"
	local pid=$DAEMON_PID i rc
	DAEMON_PID=
	kill -TERM "$pid" 2> /dev/null
	for ((i = 0; i < 300; i++)); do
		kill -0 "$pid" 2> /dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2> /dev/null; then
		kill -KILL "$pid"
		wait "$pid" 2> /dev/null
		die "daemon did not exit within 30 s of SIGTERM"
	fi
	wait "$pid"
	rc=$?
	[ $rc = 0 ] || { tail -20 "$D/daemon.$DAEMON_N.log"; die "daemon exited with status $rc on SIGTERM"; }
	note "daemon $DAEMON_N stopped (SIGTERM, status 0)"
}

# daemon_kill: SIGKILL, as in a crash
daemon_kill() {
	[ -n "$DAEMON_PID" ] || return 0
	sandbox_check "before SIGKILL"
	kill -KILL "$DAEMON_PID" 2> /dev/null
	wait "$DAEMON_PID" 2> /dev/null
	note "daemon $DAEMON_N killed (SIGKILL)"
	DAEMON_PID=
}

# daemon_standby SOCKET: start `serve --standby` on the running daemon's files
# and arguments, on SOCKET: the target daemon of a migration over shared
# storage, simulated on one host. It answers QEMU at once and takes the clone
# over when the running daemon stops (daemon_handover). Its log is
# $D/standby.log until then.
STANDBY_PID='' STANDBY_SOCK=''
daemon_standby() {
	STANDBY_SOCK=$1
	rm -f "$STANDBY_SOCK"
	# shellcheck disable=SC2086
	"$VHOST_CLONE" serve --standby --source "${SRC_URI:-$SRC}" --dest "$DST" --metadata "$META" \
		--socket-path "$STANDBY_SOCK" --num-queues 2 $DAEMON_LAST_ARGS $VHOST_CLONE_EXTRA_ARGS \
		> "$D/standby.log" 2>&1 &
	STANDBY_PID=$!
	SOCK=$STANDBY_SOCK DAEMON_PID=$STANDBY_PID wait_socket standby "$D/standby.log" "on $STANDBY_SOCK"
}

# daemon_handover: stop the running daemon (daemon_stop); the standby takes
# the clone over and becomes the daemon (DAEMON_PID, DAEMON_N, SOCK); its log
# moves to daemon.N.log. Waits (30 s) for the takeover in its log.
# HANDOVER_MS: how long after the old daemon exited the standby logged the
# takeover (20 ms resolution).
HANDOVER_MS=''
daemon_handover() {
	local i t0
	[ -n "$STANDBY_PID" ] || die "daemon_handover: no standby"
	daemon_stop
	t0=${EPOCHREALTIME/./}
	DAEMON_N=$((DAEMON_N + 1))
	mv "$D/standby.log" "$D/daemon.$DAEMON_N.log"
	DAEMON_PID=$STANDBY_PID SOCK=$STANDBY_SOCK STANDBY_PID=''
	for ((i = 0; i < 1500; i++)); do
		grep -q "lock is free; taking the clone over" "$D/daemon.$DAEMON_N.log" && break
		kill -0 "$DAEMON_PID" 2> /dev/null || { tail -20 "$D/daemon.$DAEMON_N.log"; die "the standby exited"; }
		sleep 0.02
	done
	grep -q "lock is free; taking the clone over" "$D/daemon.$DAEMON_N.log" || die "the standby did not take the clone over in 30 s"
	HANDOVER_MS=$(((${EPOCHREALTIME/./} - t0) / 1000))
	note "daemon $DAEMON_N (the standby) took the clone over ${HANDOVER_MS} ms after the old one exited"
	sandbox_check "after the takeover"
}

# daemon_restart: start the daemon again with the arguments of the last
# daemon_start (same files, same socket, same DAEMON_ARGS), e.g. after
# daemon_kill or daemon_stop. A guest booted with --reconnect reconnects.
daemon_restart() { DAEMON_ARGS=$DAEMON_LAST_ARGS daemon_start; }

# wait_reconnect [TIMEOUT]: wait (default 30 s) until a frontend (QEMU) is
# connected to the daemon: one of the daemon's sockets is an accepted unix
# stream (state 03 in /proc/net/unix, with the listener's name, which may be
# the name it was bound under before a rename) other than a control-socket
# client ($SOCK.ctl).
wait_reconnect() {
	local t=${1:-30} t0=$SECONDS inodes
	[ -n "$DAEMON_PID" ] || die "wait_reconnect: no daemon"
	while :; do
		kill -0 "$DAEMON_PID" 2> /dev/null || die "daemon $DAEMON_N died before QEMU connected"
		inodes=$(find /proc/"$DAEMON_PID"/fd -lname 'socket:*' -printf '%l\n' 2> /dev/null | tr -dc '0-9\n')
		awk -v ino="$inodes" -v ctl="$SOCK.ctl" '
			BEGIN { n = split(ino, a, "\n"); for (i = 1; i <= n; i++) mine[a[i]] = 1 }
			$6 == "03" && ($7 in mine) && NF >= 8 && $8 != ctl { f = 1 }
			END { exit !f }' /proc/net/unix && break
		((SECONDS - t0 > t)) && die "QEMU did not connect to daemon $DAEMON_N within $t s"
		sleep 0.05
	done
	note "QEMU connected to daemon $DAEMON_N after $((SECONDS - t0)) s"
	sandbox_check "QEMU connected"
}

# offline_check: the on-disk state is consistent (daemon stopped)
offline_check() {
	local rc
	case $BACKEND in
	vhost-clone)
		"$VHOST_CLONE" check --source "${SRC_URI:-$SRC}" --dest "$DST" --metadata "$META" > "$D/check.log" 2>&1
		rc=$?
		[ $rc = 0 ] || { tail -20 "$D/check.log"; die "vhost-clone check: exit $rc"; }
		;;
	qsd)
		# 0 = clean, 3 = only leaked clusters (normal after a SIGKILL)
		"$QEMU_IMG" check -q "$DST" > "$D/check.log" 2>&1
		rc=$?
		[ $rc = 0 ] || [ $rc = 3 ] || { cat "$D/check.log"; die "qemu-img check: exit $rc"; }
		;;
	esac
	note "offline check ok"
}

# hydration_state: "HYDRATED TOTAL" (regions) from the running daemon's status.
# The status contract (vhost-clone only): `status --socket-path SOCK --json`
# prints JSON with "hydrated_regions": N and "regions": M.
hydration_state() {
	local out h t
	out=$("$VHOST_CLONE" status --socket-path "$SOCK" --json 2>&1) || { echo "status failed: $out" >&2; return 1; }
	h=$(echo "$out" | grep -o '"hydrated_regions": *[0-9]*' | grep -o '[0-9]*$')
	t=$(echo "$out" | grep -o '"regions": *[0-9]*' | grep -o '[0-9]*$')
	[ -n "$h" ] && [ -n "$t" ] || { echo "status without region counts: $out" >&2; return 1; }
	echo "$h $t"
}

# wait_hydrated: poll the daemon's status every second, for up to 180 s,
# until every region is hydrated (cases 5 and 11).
wait_hydrated() {
	local t0=$SECONDS st errors=0
	while :; do
		if st=$(hydration_state); then
			[ "${st% *}" = "${st#* }" ] && { note "hydrated ${st% *}/${st#* } regions"; return 0; }
		else
			errors=$((errors + 1))
			[ $errors -ge 5 ] && die "vhost-clone status failed 5 times"
		fi
		((SECONDS - t0 > 180)) && die "hydration not complete after 180 s: ${st:-no status}"
		sleep 1
	done
}

# dest_equals_source "OFF:LEN ...": with the daemon stopped, the destination
# FILE holds the source image's bytes in each span (compared with cmp)
dest_equals_source() {
	local s off len
	for s in $1; do
		off=${s%%:*} len=${s#*:}
		cmp -s <(dd if="$SRC" bs=1M iflag=skip_bytes,count_bytes skip=$off count=$len 2> /dev/null) \
			<(dd if="$DST" bs=1M iflag=skip_bytes,count_bytes skip=$off count=$len 2> /dev/null) ||
			die "destination differs from the source in unwritten span $off+$len"
	done
	note "destination equals the source outside the written zones"
}

# corrupt OFF: overwrite 512 bytes of what the guest sees at OFF, behind the
# daemon's back (daemon stopped). Only meaningful where the guest has written.
corrupt() {
	case $BACKEND in
	qsd) "$QEMU_IO" -f qcow2 -c "write -q -P 0xa5 $1 512" "$DST" > /dev/null ;;
	vhost-clone) printf '\245%.0s' $(seq 512) | dd of="$DST" bs=512 seek=$(($1 / 512)) conv=notrunc 2> /dev/null ;;
	esac
}

# ---- guests -----------------------------------------------------------------
# boot_start NAME [--reboot] [--reconnect] [--control] [--qmp] [KEY=VALUE...] < SCRIPT
# boot_start NAME [--control] [--qmp] [--socket PATH] --incoming FROM URI
#   Start a guest in the background running SCRIPT (busybox sh, with
#   /lib/vctest.sh loaded and KEY=VALUE in its environment). Its serial
#   console goes to $D/NAME.serial. --reboot lets a guest reboot in place.
#   --reconnect: QEMU reconnects (every 100 ms) to a daemon that died or
#   stopped, instead of losing the disk (restart it with daemon_restart).
#   --control: a second serial port (the guest's /dev/ttyS1) carries lines
#   from the host (guest_send) to the guest (ctl_open/ctl_wait in vctest.sh).
#   --qmp: a QMP monitor on $D/NAME.qmp (tools/qmp.py talks to it).
#   --socket PATH: the daemon's socket to attach to (default $SOCK).
#   --incoming FROM URI: the same machine as guest FROM, waiting for FROM's
#   migration stream on URI (QEMU's -incoming); the guest and its script
#   continue here, with the output going to $D/NAME.serial from then on.
BOOT_TIMEOUT=${BOOT_TIMEOUT:-240}
declare -A QEMU_PID BOOT_T0

# guest_initrd NAME [KEY=VALUE...] < SCRIPT: $D/NAME.boot/initrd, the cached
# initramfs with SCRIPT and its parameters appended (see "How a boot works").
guest_initrd() {
	local name=$1 kv v
	shift
	local b=$D/$name.boot
	rm -rf "$b" && mkdir -p "$b/case"
	cat > "$b/case/script.sh"
	{
		echo "VCTEST_SCRIPT=$name"
		for kv in "$@"; do
			v=${kv#*=}
			printf "%s='%s'\n" "${kv%%=*}" "${v//\'/\'\\\'\'}"
		done
	} > "$b/case/env"
	(cd "$b" && find case | "$BUSYBOX" cpio -o -H newc 2> /dev/null) > "$b/case.cpio"
	cat "$INITRD" "$b/case.cpio" > "$b/initrd"
}

boot_start() {
	local name=$1 noreboot=-no-reboot reconnect='' from='' sock=$SOCK
	local -a ctl=() extra=()
	shift
	while :; do
		case ${1:-} in
		--reboot) noreboot='' ;;
		--reconnect) reconnect=,reconnect-ms=100 ;;
		--control)
			rm -f "$D/$name.ctl.in" "$D/$name.ctl.out"
			mkfifo "$D/$name.ctl.in" "$D/$name.ctl.out"
			# shellcheck disable=SC2054 # the commas belong to QEMU's option
			ctl=(-chardev pipe,id=ctl,path="$D/$name.ctl" -serial chardev:ctl) ;;
		--qmp) extra+=(-qmp unix:"$D/$name.qmp",server=on,wait=off) ;;
		--incoming) from=$2 extra+=(-incoming "$3"); shift 2 ;;
		--socket) sock=$2; shift ;;
		*) break ;;
		esac
		shift
	done
	local b=$D/$name.boot
	if [ -n "$from" ]; then
		# The same machine as guest $from, whose RAM (and running script) arrives
		# by migration: its initrd, no script of its own.
		b=$D/$from.boot
	else
		guest_initrd "$name" "$@"
	fi
	: > "$D/$name.serial"
	# shellcheck disable=SC2086
	"$QEMU" -M pc -accel tcg -cpu max -smp 2 -m 1G \
		-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
		-nodefaults -no-user-config -display none $noreboot \
		-serial file:"$D/$name.serial" "${ctl[@]}" \
		-kernel "$KERNEL" -initrd "$b/initrd" \
		-append "console=ttyS0 quiet tsc=reliable panic=-1" \
		-chardev socket,id=vub0,path="$sock"$reconnect \
		-device vhost-user-blk-pci,chardev=vub0,num-queues=2 "${extra[@]}" \
		> "$D/$name.qemu.log" 2>&1 &
	QEMU_PID[$name]=$!
	BOOT_T0[$name]=$SECONDS
	note "guest $name started (qemu pid $!)"
}

# boot_wait NAME: wait for the guest to power off (or BOOT_TIMEOUT), then
# require its PASS line. Prints the guest's own log lines.
boot_wait() {
	local name=$1 pid=${QEMU_PID[$1]} rc i=0
	while kill -0 "$pid" 2> /dev/null; do
		# Every 5 s, while the guest runs (vring workers included).
		(( i++ % 25 == 12 )) && sandbox_check "guest $name running"
		if ((SECONDS - BOOT_T0[$name] > BOOT_TIMEOUT)); then
			kill -KILL "$pid"
			wait "$pid" 2> /dev/null
			unset "QEMU_PID[$name]"
			tail -15 "$D/$name.serial"
			die "guest $name: timeout after $BOOT_TIMEOUT s"
		fi
		sleep 0.2
	done
	wait "$pid"
	rc=$?
	unset "QEMU_PID[$name]"
	guest_result "$name" $rc
	note "guest $name PASS in $((SECONDS - BOOT_T0[$name])) s"
}

# guest_result NAME RC: the guest has ended and its emulator exited with RC;
# require its PASS line. Prints the guest's own log lines.
guest_result() {
	local name=$1 rc=$2 res
	grep -a '^vctest:' "$D/$name.serial" | sed "s/^/  [$name] /"
	res=$(grep -a '^VCTEST-RESULT: ' "$D/$name.serial" | tail -1 | tr -d '\r')
	case $res in
	"VCTEST-RESULT: PASS") ;;
	"VCTEST-RESULT: "*)
		grep -av "^vctest:" "$D/$name.serial" | tail -40
		die "guest $name: ${res#VCTEST-RESULT: }" ;;
	*)
		tail -15 "$D/$name.serial"; tail -5 "$D/$name.qemu.log"
		die "guest $name: no result line (qemu exit $rc)" ;;
	esac
	[ $rc = 0 ] || die "guest $name passed but qemu exited with $rc"
}

# boot NAME [--reboot] [KEY=VALUE...] < SCRIPT: boot_start + boot_wait
boot() { boot_start "$@"; boot_wait "$1"; }

# verify_again SPANS: a new daemon on the same files and a new guest verify the
# standard workload and the untouched spans; then the offline check, and the
# source must be unchanged.
verify_again() {
	daemon_start
	boot verify SPANS="$1" <<'GUEST'
check_device
fio_std verify
check_spans "$SPANS"
GUEST
	daemon_stop
	offline_check
	source_unchanged
}

# wait_event NAME EVENT [TIMEOUT]: wait for "VCTEST-EVENT: EVENT" from the guest
wait_event() {
	local name=$1 ev=$2 t=${3:-$BOOT_TIMEOUT} t0=$SECONDS
	until grep -aq "^VCTEST-EVENT: $ev\b" "$D/$name.serial"; do
		kill -0 "${QEMU_PID[$name]}" 2> /dev/null || { boot_wait "$name"; die "guest $name ended before event $ev"; }
		((SECONDS - t0 > t)) && die "guest $name: no event $ev within $t s"
		sleep 0.05
	done
}

# event_values NAME EVENT: the values of all "VCTEST-EVENT: EVENT VALUE" lines
event_values() { grep -a "^VCTEST-EVENT: $2 " "$D/$1.serial" | cut -d' ' -f3- | tr -d '\r' | tr '\n' ' '; }

# guest_send NAME LINE: send LINE to a guest booted with --control (it reads
# it with ctl_wait). Waits first until the guest has opened its end (ctl_open
# says "ctl-open"): a serial port drops what arrives while it is closed. The
# FIFO is opened read-write, so the write never blocks.
guest_send() {
	[ -p "$D/$1.ctl.in" ] || die "guest $1 has no control channel"
	wait_event "$1" ctl-open
	echo "$2" 1<> "$D/$1.ctl.in"
}

# stuck NAME WHEN: guest NAME's I/O stopped (its script runs ctl_commands):
# ask it what it has in flight, fail
stuck() {
	local t
	guest_send "$1" diag
	for ((t = 0; t < 100; t++)); do
		grep -aq '^VCTEST-EVENT: diag' "$D/$1.serial" && break
		sleep 0.1
	done
	die "$2: the guest's I/O is stuck: daemon $DAEMON_N (started after round $((DAEMON_N - 1)))" \
		"served no request for 6 s; guest: $(event_values "$1" diag)"
}

# io_active: the daemon completes requests: its read+write counters (status
# over the control socket) move within 0.3 s. True if status has no counters.
io_active() {
	local a b
	a=$("$VHOST_CLONE" status --socket-path "$SOCK" --json 2> /dev/null | tr -d ' \n' |
		grep -o '"\(reads\|writes\)":[0-9]*' | awk -F: '{ s += $2 } END { print s + 0 }')
	sleep 0.3
	b=$("$VHOST_CLONE" status --socket-path "$SOCK" --json 2> /dev/null | tr -d ' \n' |
		grep -o '"\(reads\|writes\)":[0-9]*' | awk -F: '{ s += $2 } END { print s + 0 }')
	[ "$a" = 0 ] || [ "$b" -gt "$a" ]
}

# rw_boot NAME IODEPTH SPANS: boot guest NAME (--reconnect, --control) running
# fio_rw_loop IODEPTH until told to stop, then check_spans SPANS (src_sums
# output); returns once its workload runs. rw_wait_io and rw_finish go with it.
rw_boot() {
	boot_start "$1" --reconnect --control IODEPTH="$2" SPANS="$3" <<'GUEST'
ctl_open
check_device
ctl_commands &
event running
fio_rw_loop "$IODEPTH"
# in a subshell: its "wait" must not wait for the command reader above
(check_spans "$SPANS")
GUEST
	wait_event "$1" running
}

# rw_wait_io NAME WHEN: until the daemon serves requests while guest NAME runs;
# fails (with what the guest has in flight) if it serves none for 6 s
rw_wait_io() {
	local i
	for ((i = 0; i < 20; i++)); do
		kill -0 "${QEMU_PID[$1]}" 2> /dev/null || { boot_wait "$1"; die "guest $1 ended before $2"; }
		io_active && return 0
	done
	stuck "$1" "$2"
}

# rw_finish NAME WHEN: tell guest NAME to stop; it ends its fio run, verifies,
# checks the spans and powers off, never 6 s without I/O unless a request is
# stuck; require its PASS
rw_finish() {
	local i=0
	guest_send "$1" stop
	while kill -0 "${QEMU_PID[$1]}" 2> /dev/null; do
		if io_active; then i=0; else i=$((i + 1)); fi
		((i < 20)) || stuck "$1" "$2"
	done
	boot_wait "$1"
}

# qemu_kill NAME: SIGKILL a running guest's QEMU
qemu_kill() {
	local pid=${QEMU_PID[$1]:-}
	[ -n "$pid" ] || return 0
	kill -KILL "$pid" 2> /dev/null
	wait "$pid" 2> /dev/null
	unset "QEMU_PID[$1]"
	note "qemu of guest $1 killed (SIGKILL)"
}

# cleanup: end whatever this case started (by pid)
cleanup() {
	local n
	for n in "${!QEMU_PID[@]}"; do kill -KILL "${QEMU_PID[$n]}" 2> /dev/null; done
	[ -n "$DAEMON_PID" ] && kill -KILL "$DAEMON_PID" 2> /dev/null
	[ -n "${EXTRA_PID:-}" ] && kill -KILL "$EXTRA_PID" 2> /dev/null
	wait 2> /dev/null
}
