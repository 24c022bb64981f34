#!/usr/bin/env bash
# qemu-tests/run.sh: boot real guests (QEMU TCG, Linux virtio_blk, fio) against
# a vhost-user-blk daemon and check what they see. See README.md.
#
#   run.sh [--backend vhost-clone|qsd] [--sabotage] [--keep] [--list] [CASE...]
#
# CASE is a number or a name from cases/ (default: every case the backend
# supports); "7" means --backend qsd (issue 5's case 7). --sabotage runs
# each case with its deliberate breakage: every case must then FAIL, and is
# counted as passed when it does.
# Environment: VHOST_CLONE (default target/release/vhost-clone), BOOT_TIMEOUT
# (s per guest boot, default 240), QT_WORK (work dir, default /dev/shm).
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BACKEND=vhost-clone
SABOTAGE=
KEEP=
SELECT=()
while [ $# -gt 0 ]; do
	case $1 in
	--backend) BACKEND=$2; shift 2 ;;
	--backend=*) BACKEND=${1#*=}; shift ;;
	--sabotage) SABOTAGE=1; shift ;;
	--keep) KEEP=1; shift ;;
	--list)
		for f in "$HERE"/cases/*.sh; do
			printf '%-22s [%s]\n' "$(basename "$f" .sh)" "$(sed -n 's/^BACKENDS="\(.*\)"/\1/p' "$f")"
		done
		exit 0 ;;
	7) BACKEND=qsd; shift ;; # case 7 of issue 5: the harness against QSD
	-h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	-*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
	*) SELECT+=("$1"); shift ;;
	esac
done
case $BACKEND in
vhost-clone | qsd) ;;
*) echo "run.sh: backend must be vhost-clone or qsd" >&2; exit 2 ;;
esac
export SABOTAGE

VHOST_CLONE=${VHOST_CLONE:-$ROOT/target/release/vhost-clone}
if [ "$BACKEND" = vhost-clone ] && [ ! -x "$VHOST_CLONE" ]; then
	echo "run.sh: $VHOST_CLONE not found (build it, or set VHOST_CLONE)" >&2
	exit 2
fi

bash "$HERE/setup.sh" || { echo "run.sh: setup failed" >&2; exit 2; }
# shellcheck source=/dev/null
. "${QT_CACHE:-$ROOT/target/qemu-tests}/env.sh"
. "$HERE/guest/layout.sh"
. "$HERE/lib.sh"

WORK=$(mktemp -d "${QT_WORK:-/dev/shm}/vhost-clone-qemu-tests.XXXXXX")
echo "qemu-tests: backend $BACKEND$([ -n "$SABOTAGE" ] && echo ", SABOTAGE mode"), work dir $WORK"
[ "$BACKEND" = vhost-clone ] && echo "qemu-tests: binary $VHOST_CLONE ($("$VHOST_CLONE" --version 2>&1))"

# the cases to run: cases/N-name.sh whose BACKENDS line names this backend
cases=()
for f in "$HERE"/cases/*.sh; do
	c=$(basename "$f" .sh)
	if [ ${#SELECT[@]} -gt 0 ]; then
		printf '%s\n' "${SELECT[@]}" | grep -qx "${c%%-*}\|$c" || continue
	fi
	if ! grep -q "^BACKENDS=.*\b$BACKEND\b" "$f"; then
		[ ${#SELECT[@]} -gt 0 ] && echo "SKIP  $c (not for backend $BACKEND)"
		continue
	fi
	cases+=("$c")
done

passed=0 failed=0 skipped=() t_all=$SECONDS
INTERRUPTED=
trap 'INTERRUPTED=1' INT TERM
for c in "${cases[@]}"; do
	[ -n "$INTERRUPTED" ] && { echo "qemu-tests: interrupted"; failed=$((failed + 1)); break; }
	D=$WORK/$c
	mkdir -p "$D"
	t0=$SECONDS
	(
		trap cleanup EXIT
		trap 'exit 130' INT TERM HUP
		# shellcheck source=/dev/null
		. "$HERE/cases/$c.sh"
		run_case
	) > "$D/case.log" 2>&1
	rc=$?
	[ $rc = 130 ] || [ $rc = 143 ] && INTERRUPTED=1
	dt=$((SECONDS - t0))
	reason=$(cat "$D/fail-reason" 2> /dev/null || echo "exit status $rc")
	if [ $rc = 77 ] && [ -f "$D/skip-reason" ]; then
		# the case cannot run on this machine (lib.sh's skip): neither passed nor failed
		printf 'SKIP  %-22s %4ds  %s\n' "$c" "$dt" "$(cat "$D/skip-reason")"
		skipped+=("$c")
		[ -n "$KEEP" ] || rm -rf "$D"
		continue
	fi
	if [ -z "$SABOTAGE" ] && [ $rc = 0 ]; then
		ok=1 line=$(printf 'PASS  %-22s %4ds' "$c" "$dt")
	elif [ -z "$SABOTAGE" ]; then
		ok='' line=$(printf 'FAIL  %-22s %4ds  %s' "$c" "$dt" "$reason")
	elif [ $rc != 0 ]; then
		ok=1 line=$(printf 'PASS  %-22s %4ds  sabotage detected: %s' "$c" "$dt" "$reason")
	else
		ok='' line=$(printf 'FAIL  %-22s %4ds  sabotage NOT detected' "$c" "$dt")
	fi
	echo "$line"
	# a case's figures (e.g. "kill-restart: 20 loops, ..."), also when it passed
	grep -aE '^((kill|sigterm)-restart|nbd-source|migrate|live-upgrade): ' "$D/case.log" | sed 's/^/      /'
	if [ -n "$ok" ]; then
		passed=$((passed + 1))
		[ -n "$KEEP" ] || rm -rf "$D"
	else
		failed=$((failed + 1))
		sed 's/^/      | /' "$D/case.log" | tail -40
		# keep the logs of a failed case, drop its disk images
		[ -n "$KEEP" ] || rm -rf "$D"/*.img "$D"/*.qcow2 "$D"/*.meta "$D"/*.boot/initrd
	fi
done

if [ -n "$(ls -A "$WORK")" ]; then
	echo "qemu-tests: backend $BACKEND, $((SECONDS - t_all)) s in all, logs in $WORK"
else
	rmdir "$WORK"
	echo "qemu-tests: backend $BACKEND, $((SECONDS - t_all)) s in all"
fi
[ ${#skipped[@]} = 0 ] || echo "qemu-tests: ${#skipped[@]} skipped: ${skipped[*]}"
echo "$passed passed, $failed failed"
[ $failed = 0 ] && [ $((passed + failed)) -gt 0 ]
