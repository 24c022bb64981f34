#!/usr/bin/env bash
# scripts/package.sh: build the Debian package of vhost-clone with dpkg-deb
# (no cargo-deb: the tools used here, dpkg-dev, binutils and gzip, are on a
# fresh machine already; see docs/operations.md ("Installing from the Debian package") for the measurement).
#
#   scripts/package.sh [--no-build]
#
# Builds the release binary (cargo build --release --locked; --no-build takes
# target/release/vhost-clone as it is), lays out the package tree under
# target/debian/, and prints the path of the .deb on stdout (progress goes to
# stderr). Every asset listed below must exist: a missing unit, man page,
# completion or descriptor stops the build with its name, never a package
# without it. Environment: DEB_REVISION (default 1), SOURCE_DATE_EPOCH
# (default: the time of the last commit; the changelog date and file times).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
umask 022
trap 'echo "package.sh: failed (line $LINENO: $BASH_COMMAND)" >&2' ERR

BUILD=1
case ${1:-} in
--no-build) BUILD= ;;
'') ;;
*) echo "package.sh: unknown argument $1 (usage: scripts/package.sh [--no-build])" >&2; exit 2 ;;
esac

die() { echo "package.sh: $*" >&2; exit 1; }
for tool in dpkg-deb dpkg-shlibdeps dpkg-architecture strip gzip; do
	command -v "$tool" > /dev/null || die "$tool not found (apt-get install dpkg-dev binutils gzip)"
done

NAME=vhost-clone
# The first `version = "..."` of Cargo.toml is the [package] one.
UPSTREAM=$(sed -n '/^version = "/{s/^version = "\(.*\)"$/\1/p;q}' Cargo.toml)
[ -n "$UPSTREAM" ] || die "no version in Cargo.toml"
VERSION=$UPSTREAM-${DEB_REVISION:-1}
ARCH=$(dpkg-architecture -qDEB_HOST_ARCH)
COMMIT=$(git rev-parse --short=12 HEAD 2> /dev/null || echo unknown)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2> /dev/null || date +%s)}

# source in the repository -> path in the package, mode
ASSETS=(
	"packaging/systemd/vhost-clone@.service /lib/systemd/system/vhost-clone@.service 644"
	"packaging/systemd/vhost-clone@.socket /lib/systemd/system/vhost-clone@.socket 644"
	"packaging/systemd/example.conf /usr/share/doc/$NAME/examples/example.conf 644"
	"packaging/completions/vhost-clone.bash /usr/share/bash-completion/completions/vhost-clone 644"
	"packaging/completions/_vhost-clone /usr/share/zsh/vendor-completions/_vhost-clone 644"
	"packaging/completions/vhost-clone.fish /usr/share/fish/vendor_completions.d/vhost-clone.fish 644"
	"packaging/vhost-user/50-vhost-clone.json /usr/share/qemu/vhost-user/50-vhost-clone.json 644"
	"README.md /usr/share/doc/$NAME/README.md 644"
	"docs/usage.md /usr/share/doc/$NAME/usage.md 644"
	"docs/operations.md /usr/share/doc/$NAME/operations.md 644"
)
# man pages: these at least (gzipped into /usr/share/man/man1), and any other
# docs/man/vhost-clone*.1
MAN_PAGES=(vhost-clone vhost-clone-serve vhost-clone-status vhost-clone-message
	vhost-clone-create vhost-clone-check vhost-clone-dump)

missing=()
for a in "${ASSETS[@]}"; do
	read -r src _ _ <<< "$a"
	[ -f "$src" ] || missing+=("$src")
done
for m in "${MAN_PAGES[@]}"; do
	[ -f "docs/man/$m.1" ] || missing+=("docs/man/$m.1")
done
[ ${#missing[@]} = 0 ] || die "missing assets, no package built: ${missing[*]}"

if [ -n "$BUILD" ]; then
	echo "package.sh: cargo build --release --locked" >&2
	cargo build --release --locked >&2
fi
BIN=target/release/$NAME
[ -x "$BIN" ] || die "$BIN not found (run without --no-build)"

# dpkg-shlibdeps wants debian/control in its working directory and the
# binary under debian/PACKAGE/: lay the tree out that way.
WORK=$ROOT/target/debian/work
PKG=$WORK/debian/$NAME
rm -rf "$WORK"
mkdir -p "$PKG/DEBIAN"
: > "$WORK/debian/control"

install -D -m 755 "$BIN" "$PKG/usr/bin/$NAME"
# What dh_strip does for an executable: no symbols, no .comment/.note.
strip --remove-section=.comment --remove-section=.note "$PKG/usr/bin/$NAME"

for a in "${ASSETS[@]}"; do
	read -r src dst mode <<< "$a"
	install -D -m "$mode" "$src" "$PKG$dst"
done
mkdir -p "$PKG/usr/share/man/man1"
for page in docs/man/vhost-clone*.1; do
	gz=$PKG/usr/share/man/man1/$(basename "$page").gz
	gzip -9n < "$page" > "$gz"
done

DOC=$PKG/usr/share/doc/$NAME
FIRST=$(git log --max-parents=0 --format=%cd --date=format:%Y HEAD 2> /dev/null | sort -n | sed -n 1p)
LAST=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)
YEARS=${FIRST:-$LAST}
[ "$YEARS" = "$LAST" ] || YEARS=$YEARS-$LAST
# Debian's copyright file; the license text itself is in common-licenses.
{
	cat << EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: $NAME
Comment: Built from git commit $COMMIT by scripts/package.sh.
 The binary links these Rust crates statically (name, version, license):
EOF
	# proc macros run in the compiler and are not in the binary
	cargo tree --locked --offline -e normal --prefix none -f '{p} {l}' |
		grep -v -e '(proc-macro)' -e "^$NAME " | sed 's/ (\*)//' | sort -u | sed 's/^/  /'
	cat << EOF

Files: *
Copyright: $YEARS the vhost-clone authors
License: Apache-2.0

License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License"); you may not
 use this file except in compliance with the License.
 .
 On Debian systems, the full text of the Apache License, Version 2.0 can be
 found in the file /usr/share/common-licenses/Apache-2.0.
EOF
} > "$DOC/copyright"
chmod 644 "$DOC/copyright"
{
	echo "$NAME ($VERSION) unstable; urgency=medium"
	echo
	echo "  * Built from git commit $COMMIT by scripts/package.sh."
	echo
	echo " -- vhost-clone maintainers <vhost-clone@example.invalid>  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n > "$DOC/changelog.Debian.gz"

# Maintainer scripts: only systemd's daemon-reload, so that a new or changed
# unit is seen (what dh_installsystemd generates, less enabling and starting:
# the package starts nothing; an operator enables vhost-clone@NAME.socket).
maint_script() { # maint_script SCRIPT ACTION: daemon-reload after ACTION
	cat > "$PKG/DEBIAN/$1" << EOF
#!/bin/sh
set -e
if [ "\$1" = $2 ] && [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload > /dev/null || true
fi
EOF
	chmod 755 "$PKG/DEBIAN/$1"
}
maint_script postinst configure
maint_script postrm remove

DEPENDS=$(cd "$WORK" && dpkg-shlibdeps -O "debian/$NAME/usr/bin/$NAME" | sed -n 's/^shlibs:Depends=//p')
[ -n "$DEPENDS" ] || die "dpkg-shlibdeps computed no dependencies"
rm -rf "$WORK/debian/control"
SIZE=$(du -s -k --exclude=DEBIAN "$PKG" | cut -f1)
cat > "$PKG/DEBIAN/control" << EOF
Package: $NAME
Version: $VERSION
Architecture: $ARCH
Maintainer: vhost-clone maintainers <vhost-clone@example.invalid>
Installed-Size: $SIZE
Depends: $DEPENDS
Section: admin
Priority: optional
Description: vhost-user-blk disk server with dm-clone semantics
 vhost-clone serves a virtual disk to a VM (QEMU, cloud-hypervisor, libvirt)
 over vhost-user-blk while copying it from a read-only source image to a
 destination file or block device, as Linux dm-clone does: the VM boots at
 once from the source, every region it touches and, in the background, every
 other region is hydrated to the destination, and a crash-safe bitmap records
 which regions are copied. Writes go to the destination; after a crash or a
 power cut no flushed write is lost, and once hydration completes the source
 is no longer needed.
 .
 The package ships the daemon, systemd template units (vhost-clone@.socket
 and vhost-clone@.service; none is enabled or started on install), the
 vhost-user backend descriptor read by QEMU and libvirt, man pages and shell
 completions.
EOF
(cd "$PKG" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$PKG/DEBIAN/md5sums"
chmod 644 "$PKG/DEBIAN/control" "$PKG/DEBIAN/md5sums"
find "$PKG" -type d -exec chmod 755 {} +
find "$PKG" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

OUT=$ROOT/target/debian/${NAME}_${VERSION}_$ARCH.deb
dpkg-deb --root-owner-group -Zxz --build "$PKG" "$OUT" >&2
echo "$OUT"
