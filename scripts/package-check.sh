#!/usr/bin/env bash
# scripts/package-check.sh: build the Debian package (scripts/package.sh),
# install it with dpkg -i, check what it installed, boot one guest against the
# installed /usr/bin/vhost-clone (qemu-tests case 2, write-verify), then purge
# the package. Needs root (dpkg -i); scripts/test.sh runs it in CI, on a fresh
# machine. Prints one line per check and "N passed, N failed" last; the boot
# case counts as one check. Leaves the machine without the package, whether
# it was installed before or not.
#
#   scripts/package-check.sh [--no-boot]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

BOOT=1
[ "${1:-}" = --no-boot ] && BOOT=
passed=0 failed=0
ok() { echo "PASS  package: $*"; passed=$((passed + 1)); }
ko() { echo "FAIL  package: $*"; failed=$((failed + 1)); }
check() { # check WHAT CMD...: one check, CMD's status decides
	local what=$1; shift
	if "$@"; then ok "$what"; else ko "$what"; fi
}
finish() { echo "$passed passed, $failed failed"; [ "$failed" = 0 ]; }

if [ "$(id -u)" != 0 ]; then
	echo "package-check: needs root (dpkg -i); nothing checked"
	finish
	exit
fi

NAME=vhost-clone
UPSTREAM=$(sed -n '/^version = "/{s/^version = "\(.*\)"$/\1/p;q}' Cargo.toml)
# What the package must install, independently of scripts/package.sh's list.
EXPECTED=(
	/usr/bin/vhost-clone
	/lib/systemd/system/vhost-clone@.service
	/lib/systemd/system/vhost-clone@.socket
	/usr/share/doc/vhost-clone/examples/example.conf
	/usr/share/doc/vhost-clone/README.md
	/usr/share/doc/vhost-clone/usage.md
	/usr/share/doc/vhost-clone/operations.md
	/usr/share/doc/vhost-clone/copyright
	/usr/share/doc/vhost-clone/changelog.Debian.gz
	/usr/share/bash-completion/completions/vhost-clone
	/usr/share/zsh/vendor-completions/_vhost-clone
	/usr/share/fish/vendor_completions.d/vhost-clone.fish
	/usr/share/qemu/vhost-user/50-vhost-clone.json
)
for page in vhost-clone vhost-clone-{serve,status,message,create,check,dump}; do
	EXPECTED+=("/usr/share/man/man1/$page.1.gz")
done

t0=$SECONDS
deb=$(scripts/package.sh) || deb=
check "scripts/package.sh builds ${deb:-nothing} ($((SECONDS - t0)) s)" test -f "${deb:-/nonexistent}"
[ -n "$deb" ] || { finish; exit; }

t0=$SECONDS
rc=0
dpkg -i "$deb" || rc=$?
check "dpkg -i ($((SECONDS - t0)) s)" test $rc = 0
check "dpkg -s: installed, version $UPSTREAM-*" \
	bash -c "dpkg-query -W -f '\${Status} \${Version}\n' $NAME | grep -qx 'install ok installed $UPSTREAM-[0-9.]*'"
check "Depends computed from the binary (libc6)" \
	bash -c "dpkg-query -W -f '\${Depends}\n' $NAME | grep -q 'libc6 (>= '"
listed=$(dpkg -L "$NAME" 2> /dev/null)
missing=()
for f in "${EXPECTED[@]}"; do
	grep -qx "$f" <<< "$listed" && [ -f "$f" ] || missing+=("$f")
done
check "dpkg -L lists and the disk holds all ${#EXPECTED[@]} files${missing:+ (missing: ${missing[*]})}" \
	test ${#missing[@]} = 0
version=$(/usr/bin/vhost-clone --version 2>&1)
check "/usr/bin/vhost-clone --version: $version" grep -q "^vhost-clone $UPSTREAM\b" <<< "$version"
check "/usr/bin/vhost-clone is stripped" \
	bash -c "! readelf -S /usr/bin/vhost-clone | grep -q '\.symtab'"
if command -v man > /dev/null; then
	check "man -w vhost-clone: $(man -w vhost-clone 2>&1)" \
		test "$(man -w vhost-clone 2>&1)" = /usr/share/man/man1/vhost-clone.1.gz
	check "man -w vhost-clone-serve" \
		test "$(man -w vhost-clone-serve 2>&1)" = /usr/share/man/man1/vhost-clone-serve.1.gz
fi

if [ -n "$BOOT" ]; then
	# One boot case against the installed binary; run.sh names the binary it
	# uses, which must be the installed one.
	out=target/qemu-tests-package.txt
	VHOST_CLONE=/usr/bin/vhost-clone bash qemu-tests/run.sh 2 2>&1 | tee "$out"
	line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out" | tail -1)
	check "boot test (qemu-tests case 2) with the installed binary: ${line:-did not finish}" \
		bash -c "grep -q '^qemu-tests: binary /usr/bin/vhost-clone ' '$out' && [ '$line' = '1 passed, 0 failed' ]"
fi

check "dpkg --purge" dpkg --purge "$NAME"
left=()
for f in "${EXPECTED[@]}"; do [ -e "$f" ] && left+=("$f"); done
check "purge leaves no file${left:+ (left: ${left[*]})}" test ${#left[@]} = 0
finish
