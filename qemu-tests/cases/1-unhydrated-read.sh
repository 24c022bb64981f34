# shellcheck shell=bash disable=SC2034  # BACKENDS is read by run.sh
# Case 1: unhydrated read. A fresh clone (nothing copied yet) must show the
# guest exactly the source: the guest reads the whole disk with O_DIRECT and
# its checksums (8 spans of 32 MiB) must equal the source image's. vhost-clone
# runs without background hydration, so every read is served from the source,
# and afterwards no region may be hydrated (reads never copy).
# Sabotage: flip 512 bytes of the source after the expected sums are taken.
BACKENDS="vhost-clone qsd"

run_case() {
	fresh_files
	local want
	want=$(src_sums "$(whole_disk_spans 8)")
	sabotage "overwrite 512 bytes of the source at 100 MiB" \
		bash -c "chmod u+w '$SRC' && printf '%0512d' 0 | dd of='$SRC' bs=512 seek=204800 conv=notrunc 2>/dev/null"
	DAEMON_ARGS="--no-hydration" daemon_start
	boot read SPANS="$want" <<'GUEST'
check_device
check_spans "$SPANS"
GUEST
	daemon_stop
	if [ "$BACKEND" = vhost-clone ]; then
		# Captured first: `grep -q` would close the pipe early, and under
		# pipefail dump's EPIPE would fail the check.
		local dumped
		dumped=$("$VHOST_CLONE" dump --metadata "$META" --json) || die "dump failed"
		grep -q '"hydrated": 0,' <<< "$dumped" ||
			die "reads hydrated regions: $("$VHOST_CLONE" dump --metadata "$META" | head -2)"
	fi
	offline_check
	sabotaging || source_unchanged
}
