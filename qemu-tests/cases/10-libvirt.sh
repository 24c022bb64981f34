# shellcheck shell=bash disable=SC2034,SC2004  # BACKENDS is read by run.sh; BOOT_T0 is lib.sh's associative array
# Case 10 (vhost-clone only): the libvirt domain of docs/examples/libvirt-domain.xml.
# libvirt (qemu:///system, a TCG domain, QEMU run as libvirt's unprivileged
# user) boots the test guest on the example's vhost-user disk and shared memfd
# memory, with the daemon's socket given to libvirt's QEMU group by
# --socket-group (mode 0660) in a directory only that group may enter. The
# guest writes zones A, B and C and checks the untouched spans; the host then
# restarts the daemon (SIGTERM, exit 0, same command line) under the running
# domain: the example's <reconnect> brings QEMU back, and the guest verifies
# everything again. The domain powers off, the daemon stops cleanly, the
# offline check passes and the source is unchanged. Both the example and the
# domain made from it must pass virt-xml-validate.
# libvirt: a running daemon is used as it is; otherwise the case starts
# virtlogd and libvirtd itself and stops them at the end. The case is skipped
# (not failed) only when libvirt is not installed (setup.sh installs it).
# QSD is not run: the case tests vhost-clone's socket options.
# Sabotage: the daemon starts without --socket-group (its socket stays 0600),
# so libvirt's QEMU cannot connect.
BACKENDS="vhost-clone"

export LIBVIRT_DEFAULT_URI=qemu:///system
LV_DOM='' LV_PIDS=()

# lv_cleanup: remove the domain, stop the libvirt daemons this case started
lv_cleanup() {
	local p
	if [ -n "$LV_DOM" ]; then
		virsh destroy "$LV_DOM" > /dev/null 2>&1
		virsh undefine "$LV_DOM" > /dev/null 2>&1
		unset "QEMU_PID[guest]"
		LV_DOM=
	fi
	for p in "${LV_PIDS[@]}"; do kill -TERM "$p" 2> /dev/null; done
	for p in "${LV_PIDS[@]}"; do wait "$p" 2> /dev/null; done
	LV_PIDS=()
}

# lv_up: a libvirt daemon answering on qemu:///system (no systemd here: the
# case starts virtlogd and libvirtd in the foreground, in the background)
lv_up() {
	local i
	virsh version > /dev/null 2>&1 && { note "libvirt: using the running daemon"; return 0; }
	virtlogd > "$D/virtlogd.log" 2>&1 &
	LV_PIDS+=($!)
	libvirtd > "$D/libvirtd.log" 2>&1 &
	LV_PIDS+=($!)
	for ((i = 0; i < 150; i++)); do
		virsh version > /dev/null 2>&1 && { note "libvirt: started virtlogd and libvirtd (pids ${LV_PIDS[*]})"; return 0; }
		kill -0 "${LV_PIDS[1]}" 2> /dev/null || { tail -20 "$D/libvirtd.log"; die "libvirtd exited at start"; }
		sleep 0.2
	done
	die "libvirtd did not answer within 30 s"
}

# lv_wait NAME: wait for the domain to be shut off (or BOOT_TIMEOUT), then
# require the guest's PASS line and a guest-initiated power-off.
lv_wait() {
	local name=$1 st
	while :; do
		st=$(virsh domstate --reason "$LV_DOM" 2>&1)
		case $st in "shut off"*) break ;; esac
		if ((SECONDS - BOOT_T0[$name] > BOOT_TIMEOUT)); then
			virsh destroy "$LV_DOM" > /dev/null 2>&1
			tail -15 "$D/$name.serial"
			die "guest $name: timeout after $BOOT_TIMEOUT s (domain state: $st)"
		fi
		sleep 0.5
	done
	unset "QEMU_PID[$name]"
	guest_result "$name" 0
	[ "$st" = "shut off (shutdown)" ] || die "domain $LV_DOM ended as: $st"
	note "guest $name PASS in $((SECONDS - BOOT_T0[$name])) s"
}

run_case() {
	trap 'lv_cleanup; cleanup' EXIT
	local example=$ROOT/docs/examples/libvirt-domain.xml tool
	for tool in virsh libvirtd virtlogd virt-xml-validate xmllint; do
		command -v $tool > /dev/null ||
			skip "libvirt is not installed ($tool missing; qemu-tests/setup.sh installs libvirt-daemon-system, libvirt-daemon-driver-qemu, libvirt-clients and libxml2-utils)"
	done
	virt-xml-validate "$example" domain > "$D/validate.log" 2>&1 ||
		{ cat "$D/validate.log"; die "virt-xml-validate refuses $example"; }
	lv_up

	# libvirt runs QEMU as its own user and group (qemu.conf; libvirt-qemu on
	# Debian). What QEMU opens must be reachable by it: the work directories
	# are made traversable, and the socket goes into a directory of the
	# daemon's that only that group may enter, as an operator's /run/vhost-clone.
	local group
	group=$(sed -n 's/^ *group *= *"\(.*\)".*/\1/p' /etc/libvirt/qemu.conf 2> /dev/null | tail -1)
	group=${group:-libvirt-qemu}
	getent group "$group" > /dev/null || die "libvirt's QEMU group $group does not exist"
	chmod o+x "$(dirname "$D")" "$D"
	fresh_files
	mkdir -m 0750 "$D/run" && chgrp "$group" "$D/run"
	SOCK=$D/run/disk.sock
	local spans group_args="--socket-group $group"
	spans=$(src_sums "$UNTOUCHED_SPANS")
	sabotaging && { note "SABOTAGE: no --socket-group"; group_args=; }
	DAEMON_ARGS="--no-hydration $group_args" daemon_start
	local perm
	perm=$(stat -c '%a %G' "$SOCK")
	note "socket $SOCK: mode and group $perm"
	sabotaging || [ "$perm" = "660 $group" ] || die "socket has mode and group $perm, not 660 $group"

	guest_initrd guest SPANS="$spans" <<'GUEST'
check_device
fio_std write
check_spans "$SPANS"
ctl_open
ctl_wait go
fio_std verify
check_spans "$SPANS"
GUEST
	cp "$KERNEL" "$D/vmlinuz"
	rm -f "$D/guest.ctl.in" "$D/guest.ctl.out"
	mkfifo "$D/guest.ctl.in" "$D/guest.ctl.out"
	: > "$D/guest.serial"
	LV_DOM=vhost-clone-qt-$$-$RANDOM
	python3 "$HERE/tools/libvirt-domain.py" "$example" "$LV_DOM" "$SOCK" "$D/vmlinuz" \
		"$D/guest.boot/initrd" "$D/guest.serial" "$D/guest.ctl" > "$D/domain.xml" ||
		die "cannot make the domain from $example"
	virt-xml-validate "$D/domain.xml" domain > "$D/validate.log" 2>&1 ||
		{ cat "$D/validate.log"; die "virt-xml-validate refuses the test domain"; }
	note "virsh define $LV_DOM"
	virsh define "$D/domain.xml" > "$D/virsh.log" 2>&1 || { cat "$D/virsh.log"; die "virsh define failed"; }
	local g=guest
	BOOT_T0[$g]=$SECONDS
	# QEMU must connect before the domain runs; with <reconnect> it retries
	# until it can, and virsh start waits that long. The daemon is listening,
	# so a refused connection (in QEMU's log) is final: fail at once.
	local qlog=/var/log/libvirt/qemu/$LV_DOM.log vpid t0=$SECONDS
	note "virsh start $LV_DOM"
	virsh start "$LV_DOM" > "$D/virsh.log" 2>&1 &
	vpid=$!
	while kill -0 $vpid 2> /dev/null; do
		grep -aq 'Unable to connect' "$qlog" 2> /dev/null &&
			die "QEMU cannot connect to the daemon: $(grep -ao 'Unable to connect.*' "$qlog" | tail -1)"
		((SECONDS - t0 > 300)) && die "virsh start did not return within 300 s"
		sleep 0.5
	done
	wait $vpid || { cat "$D/virsh.log"; die "virsh start failed: $(grep -a error "$D/virsh.log" | head -1)"; }
	local pid uid
	pid=$(cat "/run/libvirt/qemu/$LV_DOM.pid" 2> /dev/null) || die "no pid file for domain $LV_DOM"
	QEMU_PID[$g]=$pid
	uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
	note "domain $LV_DOM started: qemu pid $pid, uid $uid ($(id -nu "$uid" 2> /dev/null))"
	[ "$uid" != 0 ] || note "note: qemu.conf runs QEMU as root, so --socket-group is not what lets it in"

	# The guest has written and checked, and waits: restart the daemon under it.
	wait_event guest ctl-open
	daemon_stop
	daemon_restart
	wait_reconnect
	guest_send guest go
	lv_wait guest
	virsh undefine "$LV_DOM" > /dev/null || die "virsh undefine failed"
	LV_DOM=
	daemon_stop
	offline_check
	source_unchanged
}
