#!/usr/bin/env bash
# qemu-tests/setup.sh: make this machine ready to boot test guests.
# Idempotent and fast when already done. Installs on the host only QEMU 10
# (bookworm-backports) and the build tools; the guest's kernel, busybox and fio
# are downloaded and unpacked under target/qemu-tests, never installed.
# Output: target/qemu-tests/env.sh (QEMU, QSD, QEMU_IMG, KERNEL, INITRD).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
OUT=${QT_CACHE:-$ROOT/target/qemu-tests}
mkdir -p "$OUT/dl"
say() { echo "setup: $*" >&2; }

# ---- host packages --------------------------------------------------------
APT_UPDATED=
apt_update() {
	[ -n "$APT_UPDATED" ] && return
	say "apt-get update"
	apt-get update -qq
	APT_UPDATED=1
}

SOURCES=/etc/apt/sources.list.d/vhost-clone-qemu-tests.sources
if [ ! -f "$SOURCES" ]; then
	# bookworm-backports for QEMU 10; deb-src bookworm for fio's source. Both come
	# from the Debian mirror this machine is already configured with.
	MIRROR=$(awk '$1 == "URIs:" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
	[ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
	[ -n "$MIRROR" ] || { echo "setup: no Debian mirror found in /etc/apt" >&2; exit 1; }
	cat > "$SOURCES" <<EOF
# added by vhost-clone qemu-tests/setup.sh
Types: deb
URIs: $MIRROR
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: $MIRROR
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
	apt_update
fi

qemu_major() { "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1; }
need=()
[ "$(qemu_major qemu-system-x86_64)" -ge 10 ] 2>/dev/null || need+=(qemu-system-x86)
[ "$(qemu_major qemu-storage-daemon)" -ge 10 ] 2>/dev/null || need+=(qemu-utils)
command -v gcc > /dev/null && command -v make > /dev/null && [ -f /usr/lib/x86_64-linux-gnu/libc.a ] ||
	need+=(build-essential)
command -v dpkg-source > /dev/null || need+=(dpkg-dev)
command -v xz > /dev/null || need+=(xz-utils)
command -v zstd > /dev/null || need+=(zstd)
# NBD servers for case 11: qemu-nbd comes with qemu-utils, nbdkit (and its
# file plugin) is bookworm's
command -v nbdkit > /dev/null || need+=(nbdkit)
if [ ${#need[@]} -gt 0 ]; then
	apt_update
	say "installing ${need[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		-t bookworm-backports "${need[@]}" > "$OUT/apt-install.log" 2>&1 ||
		{ cat "$OUT/apt-install.log" >&2; exit 1; }
fi

# libvirt for case 10, bookworm's own 9.0 (it accepts QEMU 10): the daemon
# (libvirtd, virtlogd, the libvirt-qemu user and group), its QEMU driver, virsh
# and virt-xml-validate (which needs xmllint). Optional: if it cannot be
# installed, case 10 is skipped and says why; setup goes on.
lv_need=()
command -v virsh > /dev/null && command -v virt-xml-validate > /dev/null || lv_need+=(libvirt-clients)
command -v libvirtd > /dev/null && getent passwd libvirt-qemu > /dev/null || lv_need+=(libvirt-daemon-system)
compgen -G "/usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so" > /dev/null || lv_need+=(libvirt-daemon-driver-qemu)
command -v xmllint > /dev/null || lv_need+=(libxml2-utils)
if [ ${#lv_need[@]} -gt 0 ]; then
	apt_update
	say "installing ${lv_need[*]} (for case 10)"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		"${lv_need[@]}" > "$OUT/apt-install-libvirt.log" 2>&1 ||
		say "could not install ${lv_need[*]}: case 10 will be skipped (see $OUT/apt-install-libvirt.log)"
fi

# ---- downloads (kept in target/qemu-tests/dl) -----------------------------
download() { # download PATTERN APT-ARGS...: fetch unless a file matches PATTERN
	local pat=$1; shift
	compgen -G "$OUT/dl/$pat" > /dev/null && return
	say "downloading $*"
	(cd "$OUT/dl" && apt-get -qq -o APT::Sandbox::User=root "$@") ||
		{ apt_update && (cd "$OUT/dl" && apt-get -qq -o APT::Sandbox::User=root "$@"); }
}
KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$KPKG" ]; then apt_update; KPKG=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}'); fi
download "${KPKG}_*.deb" download "$KPKG"
download "busybox-static_*.deb" download busybox-static
download "fio_*.dsc" source --download-only fio

# ---- kernel + modules ------------------------------------------------------
KDIR=$OUT/kernel/$KPKG
if [ ! -f "$KDIR/.done" ]; then
	say "extracting $KPKG"
	rm -rf "$KDIR" "$OUT/kpkg.tmp"
	mkdir -p "$KDIR/modules" "$OUT/kpkg.tmp"
	dpkg-deb -x "$OUT"/dl/"${KPKG}"_*.deb "$OUT/kpkg.tmp"
	cp "$OUT"/kpkg.tmp/boot/vmlinuz-* "$KDIR/vmlinuz"
	for m in virtio_pci_modern_dev virtio_pci_legacy_dev virtio_ring virtio virtio_pci virtio_blk; do
		f=$(find "$OUT/kpkg.tmp/lib/modules" -name "$m.ko*" | head -1)
		[ -n "$f" ] || { say "module $m not in $KPKG"; exit 1; }
		case $f in
		*.ko.xz) xz -dc "$f" > "$KDIR/modules/$m.ko" ;;
		*.ko.zst) zstd -qdc "$f" > "$KDIR/modules/$m.ko" ;;
		*.ko.gz) gzip -dc "$f" > "$KDIR/modules/$m.ko" ;;
		*) cp "$f" "$KDIR/modules/$m.ko" ;;
		esac
	done
	rm -rf "$OUT/kpkg.tmp"
	touch "$KDIR/.done"
fi

# ---- busybox (static) ------------------------------------------------------
BB=$OUT/busybox
if [ ! -x "$BB" ]; then
	rm -rf "$OUT/bb.tmp" && mkdir -p "$OUT/bb.tmp"
	dpkg-deb -x "$OUT"/dl/busybox-static_*.deb "$OUT/bb.tmp"
	cp "$OUT/bb.tmp/bin/busybox" "$BB"
	rm -rf "$OUT/bb.tmp"
fi

# ---- fio, static, from Debian's source ------------------------------------
DSC=$(ls "$OUT"/dl/fio_*.dsc | head -1)
FIO=$OUT/fio-$(basename "$DSC" .dsc)
if [ ! -x "$FIO" ]; then
	say "building static fio from $(basename "$DSC") (about 1 minute on 2 cores)"
	rm -rf "$OUT/fio-src"
	dpkg-source --no-check -x "$DSC" "$OUT/fio-src" > /dev/null
	(cd "$OUT/fio-src" && ./configure --build-static --disable-native > ../fio-build.log 2>&1 &&
		make -j"$(nproc)" >> ../fio-build.log 2>&1) || { tail -30 "$OUT/fio-build.log" >&2; exit 1; }
	strip -o "$FIO" "$OUT/fio-src/fio"
	rm -rf "$OUT/fio-src" "$OUT"/fio_*.orig.tar.* "$OUT"/fio_*.debian.tar.*
fi

# ---- blkop (BLKDISCARD/BLKZEROOUT helper; busybox has no blkdiscard -z) -----
BLKOP=$OUT/blkop-$(sha256sum "$HERE/guest/blkop.c" | cut -c1-12)
if [ ! -x "$BLKOP" ]; then
	gcc -O2 -Wall -static -o "$BLKOP" "$HERE/guest/blkop.c"
fi

# ---- initramfs, keyed by everything that goes into it ----------------------
KEY=$(cat "$HERE"/guest/init "$HERE"/guest/vctest.sh "$HERE"/guest/layout.sh \
	"$KDIR"/modules/*.ko "$BB" "$FIO" "$BLKOP" | sha256sum | cut -c1-16)
INITRD=$OUT/initramfs-$KEY.cpio.gz
if [ ! -f "$INITRD" ]; then
	say "building $INITRD"
	T=$OUT/initramfs.tmp
	rm -rf "$T" && mkdir -p "$T"/{bin,lib/modules,proc,sys,dev,tmp,case}
	cp "$BB" "$T/bin/busybox"
	ln -s busybox "$T/bin/sh"
	cp "$FIO" "$T/bin/fio"
	cp "$BLKOP" "$T/bin/blkop"
	cp "$KDIR"/modules/*.ko "$T/lib/modules/"
	cp "$HERE/guest/init" "$T/init" && chmod 755 "$T/init"
	cp "$HERE/guest/vctest.sh" "$HERE/guest/layout.sh" "$T/lib/"
	(cd "$T" && find . | sort | "$BB" cpio -o -H newc 2> /dev/null) | gzip -6 > "$INITRD.tmp"
	# pad to 512 bytes: run.sh appends an uncompressed cpio with the case
	# script, and the kernel finds the next archive only at an aligned offset
	s=$(stat -c %s "$INITRD.tmp")
	head -c $(((512 - s % 512) % 512)) /dev/zero >> "$INITRD.tmp"
	mv "$INITRD.tmp" "$INITRD"
	rm -rf "$T"
	# keep the cache small: drop initramfs images of older keys
	find "$OUT" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -name "$(basename "$INITRD")" -delete
fi

cat > "$OUT/env.sh.tmp" <<EOF
QEMU=$(command -v qemu-system-x86_64)
QSD=$(command -v qemu-storage-daemon)
QEMU_IMG=$(command -v qemu-img)
QEMU_IO=$(command -v qemu-io)
QEMU_NBD=$(command -v qemu-nbd)
NBDKIT=$(command -v nbdkit)
KERNEL=$KDIR/vmlinuz
INITRD=$INITRD
BUSYBOX=$BB
EOF
mv "$OUT/env.sh.tmp" "$OUT/env.sh"
