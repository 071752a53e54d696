#!/usr/bin/env bash
# Build a minimal Linux guest (Debian kernel + busybox initramfs) for the
# iovirt end-to-end tests. Idempotent and cached.
#
# Usage: tools/guest/build.sh [--force]
#
# Environment:
#   IOVIRT_GUEST_DIR   cache directory (default: <repo>/.cache/guest)
#   IOVIRT_GUEST_KPKG  versioned kernel package to use instead of the one
#                      linux-image-amd64 depends on (e.g. linux-image-6.1.0-56-amd64)
#
# Output (stdout, last two lines, stable names inside the cache dir):
#   KERNEL=<path to vmlinuz>
#   INITRD=<path to initramfs.cpio.gz>
# Everything else goes to stderr.
#
# Guest contract (kernel command line; parsed by /init from /proc/cmdline):
#   iovirt.script=<name>   run /scripts/<name>.sh (blk-pattern, blk-random, blk-fs, blk-migrate, hostroot); none: just report and power off
#   iovirt.mode=guest-writes|guest-reads   (blk-pattern, default guest-writes)
#   iovirt.mib=<N>         MiB to write/read (blk-pattern, default 4)
#   iovirt.regions=<N>     blk-migrate: most regions to write and read before the host says it migrated (default 40)
#   iovirt.flag=<path>     blk-migrate: the disk where the host says it migrated (default /dev/vdb)
#   iovirt.dev=<path>      block device (blk-pattern, default /dev/vda); blk-random, blk-fs: a comma-separated list
#   iovirt.fs=ext4|ext2    file system blk-fs makes on every device (default ext4)
#   iovirt.verify=pattern  guest-reads only: also compare what was read with the pattern
#   iovirt.timeout=<sec>   guest-side watchdog: force power off after <sec> seconds
#   iovirt.modules=a,b,c   modules /init loads (default virtio_pci,virtio_blk)
#   iovirt.run=<path>      hostroot: run this host shell script (bash) chrooted into the host's
#                          root, shared read-only over 9p (mount_tag hostroot); see scripts/hostroot.sh
#   iovirt.shell=1         start an interactive shell on the console instead of powering off
# Every line meant for the host starts with "IOVIRT-GUEST: ". The guest always ends
# with "poweroff -f" (and panic=-1 + -no-reboot cover a crashing init).
#
# The data pattern (identical to guestPattern() in tools/guest/pattern.ts):
#   N MiB = N*65536 lines of 16 bytes; line i (i = 0, 1, ...) is
#   printf 'IOV%012x\n' i     -- "IOV", i as 12 lower-case hex digits, newline.
#   So the 16 bytes at byte offset 16*i name their own line index i.
set -euo pipefail

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
HERE="$(dirname "$SELF")"
REPO="$(cd "$HERE/../.." && pwd)"
DIR="${IOVIRT_GUEST_DIR:-$REPO/.cache/guest}"
FORCE=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$SELF"; exit 0 ;;
    *) die "unknown argument: $a" ;;
  esac
done

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
KERNEL="$DIR/vmlinuz"
INITRD="$DIR/initramfs.cpio.gz"
STAMP="$DIR/build.stamp"
# The stamp is the sha256 of this script: editing the script (init, test scripts,
# module list) invalidates the cached initramfs. tools/guest/run.ts checks it too.
WANT_STAMP="$(sha256sum "$SELF" | cut -d' ' -f1)"

# Serialise concurrent builds (parallel test processes).
exec 9>"$DIR/.lock"
flock 9

if [[ $FORCE = 0 && -s "$KERNEL" && -s "$INITRD" && -f "$STAMP" && "$(cat "$STAMP")" = "$WANT_STAMP" ]]; then
  log "cached ($(cat "$DIR/kernel-version" 2>/dev/null || echo '?'))"
  echo "KERNEL=$KERNEL"
  echo "INITRD=$INITRD"
  exit 0
fi

# ---------------------------------------------------------------- helpers
apt_updated=0
apt_update_once() {
  if [[ $apt_updated = 0 ]]; then
    apt_updated=1
    log "apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed (needs root and the Debian mirror)"
  fi
}

# apt-get download <pkg> into the current directory; apt-get update and retry on failure.
apt_download() {
  local pkg="$1"
  # As root apt would otherwise warn that _apt cannot write here.
  local opts=()
  if [[ $(id -u) = 0 ]]; then opts=(-o APT::Sandbox::User=root); fi
  if ! apt-get download "${opts[@]}" -qq "$pkg" >&2; then
    apt_update_once
    apt-get download "${opts[@]}" -qq "$pkg" >&2 || die "apt-get download $pkg failed"
  fi
}

resolve_kernel_pkg() {
  if [[ -n "${IOVIRT_GUEST_KPKG:-}" ]]; then echo "$IOVIRT_GUEST_KPKG"; return; fi
  local name
  name="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')"
  if [[ -z "$name" ]]; then
    apt_update_once
    name="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')"
  fi
  [[ -n "$name" ]] || die "cannot resolve the kernel package linux-image-amd64 depends on"
  echo "$name"
}

# ---------------------------------------------------------------- kernel package
KPKG="$(resolve_kernel_pkg)"
log "kernel package: $KPKG"
DEBS="$DIR/debs"
mkdir -p "$DEBS"
shopt -s nullglob
debs=("$DEBS/${KPKG}_"*.deb)
if [[ ${#debs[@]} = 0 ]]; then
  log "downloading $KPKG"
  (cd "$DEBS" && apt_download "$KPKG")
  debs=("$DEBS/${KPKG}_"*.deb)
fi
[[ ${#debs[@]} -ge 1 ]] || die "no .deb for $KPKG in $DEBS"
KDEB="${debs[-1]}"

STAGE="$DIR/stage"
rm -rf "$STAGE"
mkdir -p "$STAGE/kpkg"
log "extracting $(basename "$KDEB")"
dpkg -x "$KDEB" "$STAGE/kpkg"   # extraction only: no maintainer scripts or hooks run

vmlinuz=("$STAGE/kpkg/boot/vmlinuz-"*)
[[ ${#vmlinuz[@]} = 1 ]] || die "expected exactly one boot/vmlinuz-* in $KDEB"
KVER="${vmlinuz[0]##*/vmlinuz-}"
KMOD="$STAGE/kpkg/lib/modules/$KVER"
[[ -d "$KMOD" ]] || die "no lib/modules/$KVER in $KDEB"
log "kernel version: $KVER"

# ---------------------------------------------------------------- busybox
BUSYBOX=""
if dpkg -s busybox-static >/dev/null 2>&1; then
  BUSYBOX="$(dpkg -L busybox-static | grep -E '^(/usr)?/bin/busybox$' | head -n1 || true)"
fi
if [[ -z "$BUSYBOX" || ! -x "$BUSYBOX" ]]; then
  # Not installed: take it from the package without installing it.
  bbdebs=("$DEBS"/busybox-static_*.deb)
  if [[ ${#bbdebs[@]} = 0 ]]; then
    log "busybox-static not installed; downloading it"
    (cd "$DEBS" && apt_download busybox-static)
    bbdebs=("$DEBS"/busybox-static_*.deb)
  fi
  mkdir -p "$STAGE/bbpkg"
  dpkg -x "${bbdebs[-1]}" "$STAGE/bbpkg"
  BUSYBOX="$STAGE/bbpkg/bin/busybox"
  [[ -x "$BUSYBOX" ]] || BUSYBOX="$STAGE/bbpkg/usr/bin/busybox"
fi
[[ -x "$BUSYBOX" ]] || die "no busybox-static binary found"
log "busybox: $BUSYBOX ($("$BUSYBOX" 2>&1 | head -n1 | awk '{print $2}'))"

run_depmod() { # <basedir> <kver>
  if command -v depmod >/dev/null 2>&1; then depmod -b "$1" "$2"
  else "$BUSYBOX" depmod -b "$1" "$2"; fi
}

# ---------------------------------------------------------------- modules
# busybox insmod/modprobe cannot load compressed modules: decompress first.
while IFS= read -r -d '' f; do
  case "$f" in
    *.ko.xz) xz -d -f "$f" ;;
    *.ko.gz) gzip -d -f "$f" ;;
    *.ko.zst) command -v zstd >/dev/null || die "zstd needed to decompress $f"; zstd -q -d --rm -f "$f" ;;
  esac
done < <(find "$KMOD" -type f \( -name '*.ko.xz' -o -name '*.ko.gz' -o -name '*.ko.zst' \) -print0)
run_depmod "$STAGE/kpkg" "$KVER"

# ext4 (which also mounts ext2 here: CONFIG_EXT4_USE_FOR_EXT2) is a module in Debian's kernel.
# Its metadata checksums need the crypto API's crc32c, which modules.dep does not list
# (it is looked up by name); crc32c_generic because crc32c-intel needs SSE4.2, which
# QEMU's default TCG CPU lacks.
WANT_MODULES=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_net
  9p 9pnet_virtio vfio vfio_iommu_type1 vfio_pci uio_pci_generic ext4 crc32c_generic)
# modules.dep: "kernel/x/y.ko: dep1.ko dep2.ko". Collect the transitive closure.
declare -A need=()
queue=()
for m in "${WANT_MODULES[@]}"; do
  p="$(awk -F: -v m="$m" '{ n = $1; sub(/.*\//, "", n); sub(/\.ko$/, "", n); gsub(/-/, "_", n); if (n == m) { print $1; exit } }' "$KMOD/modules.dep")"
  if [[ -z "$p" ]]; then
    if grep -qE "/${m//_/[-_]}\.ko" "$KMOD/modules.builtin" 2>/dev/null; then
      log "module $m is built in"; continue
    fi
    die "module $m not found in $KVER"
  fi
  queue+=("$p")
done
while [[ ${#queue[@]} -gt 0 ]]; do
  p="${queue[0]}"; queue=("${queue[@]:1}")
  [[ -n "${need[$p]:-}" ]] && continue
  need[$p]=1
  deps="$(awk -F': *' -v p="$p" '$1 == p { print $2; exit }' "$KMOD/modules.dep")"
  for d in $deps; do queue+=("$d"); done
done
log "modules: $(printf '%s\n' "${!need[@]}" | sed 's#.*/##' | sort | tr '\n' ' ')"

# ---------------------------------------------------------------- initramfs tree
ROOT="$STAGE/root"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,run,etc,scripts,lib/modules/"$KVER"}
for p in "${!need[@]}"; do
  mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$p")"
  cp "$KMOD/$p" "$ROOT/lib/modules/$KVER/$p"
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
  if [[ -f "$KMOD/$f" ]]; then cp "$KMOD/$f" "$ROOT/lib/modules/$KVER/"; fi
done
run_depmod "$ROOT" "$KVER"

cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"
APPLETS=(sh ash cat echo printf awk dd md5sum sync sleep mount umount mkdir ls rm
  modprobe insmod lsmod poweroff reboot uname dmesg head tail grep sed cut tr seq
  test '[' true false date stat hexdump blockdev wc cmp tee setsid cttyhack kill chroot cp
  ip ifconfig route ping ping6 nc sha256sum timeout arp)
for a in "${APPLETS[@]}"; do ln -sf busybox "$ROOT/bin/$a"; done
for a in modprobe insmod lsmod poweroff reboot; do ln -sf ../bin/busybox "$ROOT/sbin/$a"; done
echo "$KVER" >"$ROOT/etc/iovirt-kernel-version"
# e2fsprogs looks a device's mount status up in /etc/mtab.
ln -sf /proc/self/mounts "$ROOT/etc/mtab"

# ---------------------------------------------------------------- e2fsprogs
# busybox has a mke2fs of its own but no e2fsck: take the host's (Debian's
# e2fsprogs, priority required) with the shared libraries and the loader ldd
# names, each at the path it has on the host, where the loader looks.
command -v ldd >/dev/null || die "ldd not found (Debian package libc-bin)"
copy_elf() { # <host binary> <path in the guest>
  local lib
  mkdir -p "$ROOT$(dirname "$2")"
  cp -L "$1" "$ROOT$2"
  # "libx.so.N => /path (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"; not linux-vdso.
  while IFS= read -r lib; do
    if [[ ! -e "$ROOT$lib" ]]; then
      mkdir -p "$ROOT$(dirname "$lib")"
      cp -L "$lib" "$ROOT$lib"
    fi
  done < <(ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
}
for b in mke2fs e2fsck; do
  host=""
  for d in /sbin /usr/sbin; do
    if [[ -x "$d/$b" ]]; then host="$d/$b"; break; fi
  done
  [[ -n "$host" ]] || die "$b not found in /sbin or /usr/sbin (Debian package e2fsprogs)"
  copy_elf "$host" "/sbin/$b"
done
log "e2fsprogs: $("$host" -V 2>&1 | head -n1)"

cat >"$ROOT/init" <<'INIT_EOF'
#!/bin/sh
# iovirt test guest /init (busybox sh). Prints "IOVIRT-GUEST: ..." markers on the
# console and always powers off at the end.
export PATH=/bin:/sbin
say() { echo "IOVIRT-GUEST: $*"; }
finish() {
  say "poweroff"
  sync
  poweroff -f
  sleep 5
  exit 1 # init exiting panics; panic=-1 reboots and QEMU -no-reboot exits
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o size=90% tmpfs /tmp
exec </dev/console >/dev/console 2>&1
say "init start kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"

# iovirt.* parameters are not passed to init by the kernel (dotted = module
# parameters): read them from /proc/cmdline. Exported as IOVIRT_<NAME>.
for w in $(cat /proc/cmdline); do
  case "$w" in
    iovirt.*=*)
      k="${w%%=*}"; k="${k#iovirt.}"; v="${w#*=}"
      k="$(echo "$k" | tr 'a-z.-' 'A-Z__')"
      export "IOVIRT_$k=$v"
      ;;
  esac
done

if [ -n "$IOVIRT_TIMEOUT" ]; then
  ( sleep "$IOVIRT_TIMEOUT"; echo "IOVIRT-GUEST: guest watchdog expired after ${IOVIRT_TIMEOUT}s"; echo "IOVIRT-GUEST: RESULT FAIL"; sync; poweroff -f ) &
fi

for m in $(echo "${IOVIRT_MODULES:-virtio_pci,virtio_blk}" | tr ',' ' '); do
  if modprobe "$m"; then say "modprobe $m ok"; else say "modprobe $m FAILED"; fi
done

rc=0
if [ -n "$IOVIRT_SCRIPT" ]; then
  s="/scripts/${IOVIRT_SCRIPT%.sh}.sh"
  if [ -f "$s" ]; then
    say "script $IOVIRT_SCRIPT start uptime=$(cut -d' ' -f1 /proc/uptime)"
    sh "$s"; rc=$?
    say "script $IOVIRT_SCRIPT exit $rc uptime=$(cut -d' ' -f1 /proc/uptime)"
  else
    say "no such script: $IOVIRT_SCRIPT (have: $(ls /scripts | tr '\n' ' '))"
    say "RESULT FAIL"
    rc=127
  fi
else
  say "no iovirt.script= given (have: $(ls /scripts | tr '\n' ' '))"
fi

if [ "$IOVIRT_SHELL" = 1 ]; then
  say "shell (exit to power off)"
  setsid cttyhack sh
fi
finish
INIT_EOF
chmod 0755 "$ROOT/init"

cat >"$ROOT/scripts/blk-pattern.sh" <<'BLK_EOF'
#!/bin/sh
# blk-pattern: write/read a deterministic pattern on a virtio-blk device.
#   iovirt.mode=guest-writes (default): write N MiB of pattern, read back, compare md5.
#   iovirt.mode=guest-reads: read the first N MiB (pre-filled by the host), print md5.
# Pattern: line i (16 bytes) = printf 'IOV%012x\n' i, N*65536 lines.
# Exit status 0 = PASS.
say() { echo "IOVIRT-GUEST: $*"; }
fail() { say "error: $*"; say "RESULT FAIL"; exit 1; }
MODE="${IOVIRT_MODE:-guest-writes}"
MIB="${IOVIRT_MIB:-4}"
DEV="${IOVIRT_DEV:-/dev/vda}"
case "$MIB" in ''|*[!0-9]*) fail "bad iovirt.mib=$MIB" ;; esac
[ "$MIB" -ge 1 ] || fail "bad iovirt.mib=$MIB"
say "blk-pattern mode=$MODE mib=$MIB dev=$DEV"

i=0
while [ ! -b "$DEV" ]; do
  [ $i -ge 100 ] && fail "$DEV did not appear within 10 s"
  sleep 0.1; i=$((i + 1))
done
sz="$(blockdev --getsize64 "$DEV" 2>/dev/null)"
say "device $DEV size=$sz"
if [ -n "$sz" ] && [ "$sz" -lt $((MIB * 1048576)) ]; then
  fail "$DEV is smaller ($sz bytes) than ${MIB} MiB"
fi

gen_pattern() { # <mib> -> stdout
  awk -v n="$(($1 * 65536))" 'BEGIN { for (i = 0; i < n; i++) printf "IOV%012x\n", i }'
}
md5() { md5sum "$1" | cut -d' ' -f1; }

read_back() { # -> /tmp/read.bin
  rm -f /tmp/read.bin
  dd if="$DEV" of=/tmp/read.bin bs=1M count="$MIB" iflag=direct 2>/tmp/dd.err
  r=$?
  if [ $r -ne 0 ]; then sed 's/^/IOVIRT-GUEST: dd: /' /tmp/dd.err; fail "read dd exit $r"; fi
  got="$(stat -c %s /tmp/read.bin)"
  [ "$got" = $((MIB * 1048576)) ] || fail "short read: $got bytes"
}

case "$MODE" in
  guest-writes)
    gen_pattern "$MIB" >/tmp/pattern.bin || fail "pattern generation failed"
    wmd5="$(md5 /tmp/pattern.bin)"
    say "write-md5 $wmd5"
    dd if=/tmp/pattern.bin of="$DEV" bs=1M oflag=direct conv=fsync 2>/tmp/dd.err
    r=$?
    if [ $r -ne 0 ]; then sed 's/^/IOVIRT-GUEST: dd: /' /tmp/dd.err; fail "write dd exit $r"; fi
    say "write done uptime=$(cut -d' ' -f1 /proc/uptime)"
    rm -f /tmp/pattern.bin
    sync
    echo 3 >/proc/sys/vm/drop_caches
    read_back
    rmd5="$(md5 /tmp/read.bin)"
    say "read-md5 $rmd5"
    rm -f /tmp/read.bin
    if [ "$wmd5" = "$rmd5" ]; then say "RESULT PASS"; exit 0; fi
    fail "read-back differs from what was written"
    ;;
  guest-reads)
    echo 3 >/proc/sys/vm/drop_caches
    read_back
    rmd5="$(md5 /tmp/read.bin)"
    say "read-md5 $rmd5"
    if [ "$IOVIRT_VERIFY" = pattern ]; then
      rm -f /tmp/read.bin
      # (to a file: awk piped into md5sum is several times slower under TCG)
      gen_pattern "$MIB" >/tmp/pattern.bin || fail "pattern generation failed"
      pmd5="$(md5 /tmp/pattern.bin)"
      rm -f /tmp/pattern.bin
      say "pattern-md5 $pmd5"
      [ "$pmd5" = "$rmd5" ] || fail "device content is not the pattern"
    fi
    rm -f /tmp/read.bin
    say "RESULT PASS"
    exit 0
    ;;
  *) fail "unknown iovirt.mode=$MODE" ;;
esac
BLK_EOF
chmod 0755 "$ROOT/scripts/blk-pattern.sh"

cat >"$ROOT/scripts/blk-random.sh" <<'RANDOM_EOF'
#!/bin/sh
# blk-random: the same N MiB of random data (iovirt.mib) go to every device in
# iovirt.dev (comma-separated) through the page cache, with fsync; then the
# page cache is dropped and each device is read back through it and compared.
# Buffered I/O puts the requests' buffers in page-cache pages all over guest
# RAM (O_DIRECT would reuse dd's one buffer for every request).
# Random data is quick to make under TCG (the blk-pattern awk is not) and no
# block of it repeats, so a misplaced block shows. Exit status 0 = PASS.
say() { echo "IOVIRT-GUEST: $*"; }
fail() { say "error: $*"; say "RESULT FAIL"; exit 1; }
MIB="${IOVIRT_MIB:-4}"
DEVS="$(echo "${IOVIRT_DEV:-/dev/vda}" | tr ',' ' ')"
case "$MIB" in ''|*[!0-9]*) fail "bad iovirt.mib=$MIB" ;; esac
say "blk-random mib=$MIB devs=$DEVS"
md5() { md5sum "$1" | cut -d' ' -f1; }
dd if=/dev/urandom of=/tmp/data.bin bs=1M count="$MIB" 2>/dev/null || fail "no random data"
wmd5="$(md5 /tmp/data.bin)"
say "write-md5 $wmd5"
for dev in $DEVS; do
  i=0
  while [ ! -b "$dev" ]; do
    [ $i -ge 100 ] && fail "$dev did not appear within 10 s"
    sleep 0.1; i=$((i + 1))
  done
  dd if=/tmp/data.bin of="$dev" bs=1M conv=fsync 2>/tmp/dd.err || { sed 's/^/IOVIRT-GUEST: dd: /' /tmp/dd.err; fail "write to $dev"; }
  say "wrote $dev uptime=$(cut -d' ' -f1 /proc/uptime)"
done
rm -f /tmp/data.bin
sync
echo 3 >/proc/sys/vm/drop_caches
for dev in $DEVS; do
  dd if="$dev" of=/tmp/read.bin bs=1M count="$MIB" 2>/tmp/dd.err || { sed 's/^/IOVIRT-GUEST: dd: /' /tmp/dd.err; fail "read from $dev"; }
  rmd5="$(md5 /tmp/read.bin)"
  rm -f /tmp/read.bin
  say "read-md5 $dev $rmd5"
  [ "$rmd5" = "$wmd5" ] || fail "$dev read back differs from what was written"
done
say "RESULT PASS"
RANDOM_EOF
chmod 0755 "$ROOT/scripts/blk-random.sh"

cat >"$ROOT/scripts/blk-fs.sh" <<'FS_EOF'
#!/bin/sh
# blk-fs: a file system on every device in iovirt.dev (comma-separated), made
# by e2fsprogs' mke2fs (iovirt.fs=ext4, the default, or ext2). On each: mount,
# copy in the same files of random data (sizes that are and are not multiples
# of 4 KiB, in nested directories, about 4 MiB), sync, unmount; e2fsck -fn must
# find nothing to fix; drop the caches, mount again and compare every file's
# md5 with the original's; unmount.
# Markers for the host:
#   fs-file <path> <size> <md5>   once per file, before any device is touched
#   fs-manifest <md5>             md5 of the "md5sum" listing of all files
#   fs-dev <dev> size=<bytes> queues=<blk-mq hardware queues the driver set up>
#   fs-step <dev> <step>          progress: mkfs mount write umount fsck remount verify
#   fs-ok <dev> <manifest md5>    the device passed every step
#   fs-error <dev> <step>: ...    a step failed (followed by RESULT FAIL)
# Exit status 0 = PASS.
say() { echo "IOVIRT-GUEST: $*"; }
fail() { say "error: $*"; say "RESULT FAIL"; exit 1; }
# Stops at the first failing step: its output, prefixed, then the marker.
step_fail() { # <dev> <step> <text> <output file>
  [ -s "$4" ] && tail -n 20 "$4" | sed "s#^#IOVIRT-GUEST: $2: #"
  say "fs-error $1 $2: $3"
  say "RESULT FAIL"
  exit 1
}
up() { cut -d' ' -f1 /proc/uptime; }
FS="${IOVIRT_FS:-ext4}"
DEVS="$(echo "${IOVIRT_DEV:-/dev/vda}" | tr ',' ' ')"
case "$FS" in ext4|ext2) ;; *) fail "bad iovirt.fs=$FS (ext4 or ext2)" ;; esac
say "blk-fs fs=$FS devs=$DEVS"
# By path: busybox sh would run its own mke2fs applet for a bare "mke2fs".
for t in mke2fs e2fsck; do
  [ -x /sbin/$t ] || fail "/sbin/$t (e2fsprogs) is not in this initramfs"
done
say "fs-tools $(/sbin/e2fsck -V 2>&1 | head -n1)"

# ext4 is a module; it also mounts ext2. Metadata checksums need crc32c loaded.
# Loaded before mke2fs, which then leaves inode tables to the kernel to zero
# (lazy_itable_init) instead of writing them all.
for m in crc32c_generic ext4; do
  modprobe "$m" 2>/tmp/modprobe.err || step_fail - modprobe "modprobe $m failed" /tmp/modprobe.err
done

SRC=/tmp/fs-src
mkdir -p "$SRC/sub/deep" || fail "mkdir $SRC"
# path:size. 4096 = one block; 1 and 4095 and 12289 straddle block ends.
FILES="a.bin:1 b.bin:4095 c.bin:4096 d.bin:12289 sub/e.bin:65636 sub/f.bin:1000000 sub/deep/g.bin:2097665 h.bin:1048576"
NAMES=""
for f in $FILES; do
  name="${f%%:*}"; size="${f#*:}"
  head -c "$size" /dev/urandom >"$SRC/$name" || fail "cannot make $name"
  got="$(stat -c %s "$SRC/$name")"
  [ "$got" = "$size" ] || fail "$name has $got bytes, not $size"
  say "fs-file $name $size $(md5sum "$SRC/$name" | cut -d' ' -f1)"
  NAMES="$NAMES $name"
done
(cd "$SRC" && md5sum $NAMES) >/tmp/fs-manifest || fail "md5sum of the files failed"
MANIFEST="$(md5sum /tmp/fs-manifest | cut -d' ' -f1)"
say "fs-manifest $MANIFEST"

n=0
for dev in $DEVS; do
  n=$((n + 1))
  mnt="/mnt/fs$n"
  out="/tmp/fs-out$n"
  i=0
  while [ ! -b "$dev" ]; do
    [ $i -ge 100 ] && step_fail "$dev" wait "$dev did not appear within 10 s" /dev/null
    sleep 0.1; i=$((i + 1))
  done
  mkdir -p "$mnt"
  say "fs-dev $dev size=$(blockdev --getsize64 "$dev") queues=$(ls "/sys/block/${dev##*/}/mq" 2>/dev/null | wc -l)"
  say "fs-step $dev mkfs uptime=$(up)"
  /sbin/mke2fs -F -q -t "$FS" "$dev" >"$out" 2>&1 || step_fail "$dev" mkfs "mke2fs -t $FS exit $?" "$out"
  say "fs-step $dev mount uptime=$(up)"
  mount -t "$FS" "$dev" "$mnt" >"$out" 2>&1 || step_fail "$dev" mount "mount exit $?" "$out"
  say "fs-step $dev write uptime=$(up)"
  (cd "$SRC" && for name in $NAMES; do
    case "$name" in */*) mkdir -p "$mnt/${name%/*}" || exit 1 ;; esac
    cp "$name" "$mnt/$name" || exit 1
  done) >"$out" 2>&1 || step_fail "$dev" write "copying the files failed" "$out"
  sync
  say "fs-step $dev umount uptime=$(up)"
  umount "$mnt" >"$out" 2>&1 || step_fail "$dev" umount "umount exit $?" "$out"
  say "fs-step $dev fsck uptime=$(up)"
  # -n: open read-only and answer no; exit 0 only when there was nothing to fix.
  /sbin/e2fsck -f -n "$dev" >"$out" 2>&1 || step_fail "$dev" fsck "e2fsck -fn exit $?" "$out"
  # Whatever the block device's page cache still holds must not answer the reads.
  sync
  echo 3 >/proc/sys/vm/drop_caches
  say "fs-step $dev remount uptime=$(up)"
  mount -t "$FS" "$dev" "$mnt" >"$out" 2>&1 || step_fail "$dev" remount "mount exit $?" "$out"
  say "fs-step $dev verify uptime=$(up)"
  (cd "$mnt" && md5sum $NAMES) >/tmp/fs-check 2>"$out" || step_fail "$dev" verify "md5sum in $mnt failed" "$out"
  if ! cmp -s /tmp/fs-manifest /tmp/fs-check; then
    # Name the files that differ.
    awk 'NR == FNR { want[$2] = $1; next } want[$2] != $1 { print "differs: " $2 " " $1 " (want " want[$2] ")" }' \
      /tmp/fs-manifest /tmp/fs-check >"$out"
    step_fail "$dev" verify "file contents differ after remount" "$out"
  fi
  umount "$mnt" >"$out" 2>&1 || step_fail "$dev" umount "final umount exit $?" "$out"
  say "fs-ok $dev $MANIFEST"
done
say "RESULT PASS"
FS_EOF
chmod 0755 "$ROOT/scripts/blk-fs.sh"

cat >"$ROOT/scripts/net.sh" <<'NET_EOF'
#!/bin/sh
# net: bring up eth0 and talk to a peer across the virtio-net device.
#   iovirt.ip=ADDR/LEN   this guest's address (required)
#   iovirt.mtu=N         link MTU (default 1500)
#   iovirt.peer=ADDR     the other end
#   iovirt.role=S+S...   steps, in order:
#                        send: ping the peer, then send iovirt.mib MiB of random data over TCP;
#                        recv: ping the peer, receive iovirt.mib MiB over TCP, ping again;
#                        ping: ping the peer for iovirt.seconds and report how many answered;
#                        extra: ping each address of iovirt.extra=A,B once (20 s each at most);
#                        linger: stay up iovirt.linger seconds (default 5);
#                        serve: answer pings for iovirt.seconds
#   iovirt.port=N        TCP port (default 5000)
#   iovirt.wait=S        how long to wait for the peer's first answer (default 60)
say() { echo "IOVIRT-GUEST: $*"; }
fail() { say "error: $*"; stats; say "RESULT FAIL"; exit 1; }
stats() {
  s=/sys/class/net/$DEV/statistics
  [ -d "$s" ] && say "stats rx_packets=$(cat $s/rx_packets) rx_bytes=$(cat $s/rx_bytes) rx_dropped=$(cat $s/rx_dropped) rx_errors=$(cat $s/rx_errors) tx_packets=$(cat $s/tx_packets) tx_bytes=$(cat $s/tx_bytes) tx_dropped=$(cat $s/tx_dropped) tx_errors=$(cat $s/tx_errors)"
}
DEV="${IOVIRT_DEV:-eth0}"
MTU="${IOVIRT_MTU:-1500}"
PORT="${IOVIRT_PORT:-5000}"
MIB="${IOVIRT_MIB:-16}"
WAIT="${IOVIRT_WAIT:-60}"
SECONDS_="${IOVIRT_SECONDS:-10}"
[ -n "$IOVIRT_IP" ] || fail "iovirt.ip= is not set"
i=0
while [ ! -d "/sys/class/net/$DEV" ]; do
  [ $i -ge 100 ] && fail "$DEV did not appear within 10 s"
  sleep 0.1; i=$((i + 1))
done
ip link set lo up
ip link set "$DEV" mtu "$MTU" || fail "cannot set mtu $MTU"
ip addr add "$IOVIRT_IP" dev "$DEV" || fail "cannot add address $IOVIRT_IP"
ip link set "$DEV" up || fail "cannot bring $DEV up"
vdev="$(basename "$(readlink -f /sys/class/net/$DEV/device)")"
say "net up dev=$DEV mac=$(cat /sys/class/net/$DEV/address) mtu=$(cat /sys/class/net/$DEV/mtu) virtio=$vdev"
say "features $(cat /sys/class/net/$DEV/device/features)"
say "queues rx=$(ls -d /sys/class/net/$DEV/queues/rx-* | wc -l) tx=$(ls -d /sys/class/net/$DEV/queues/tx-* | wc -l)"

wait_peer() {
  t=0
  while ! ping -c 1 -W 1 "$IOVIRT_PEER" >/dev/null 2>&1; do
    t=$((t + 1))
    [ $t -ge "$WAIT" ] && fail "no answer from $IOVIRT_PEER within $WAIT s"
  done
  say "ping-ok $IOVIRT_PEER after $t s uptime=$(cut -d' ' -f1 /proc/uptime)"
}
md5() { md5sum "$1" | cut -d' ' -f1; }

# Steps run in order: iovirt.role=send+ping runs "send", then "ping".
for step in $(echo "${IOVIRT_ROLE:-ping}" | tr '+' ' '); do
case "$step" in
  send)
    wait_peer
    dd if=/dev/urandom of=/tmp/data.bin bs=1M count="$MIB" 2>/dev/null || fail "no random data"
    say "send-md5 $(md5 /tmp/data.bin)"
    t=0
    until nc "$IOVIRT_PEER" "$PORT" </tmp/data.bin; do
      t=$((t + 1))
      [ $t -ge 30 ] && fail "could not send to $IOVIRT_PEER:$PORT"
      sleep 1
    done
    say "sent $((MIB * 1048576)) bytes uptime=$(cut -d' ' -f1 /proc/uptime)"
    rm -f /tmp/data.bin
    ;;
  recv)
    wait_peer
    nc -l -p "$PORT" | head -c $((MIB * 1048576)) >/tmp/data.bin
    say "recv-bytes $(stat -c %s /tmp/data.bin) uptime=$(cut -d' ' -f1 /proc/uptime)"
    say "recv-md5 $(md5 /tmp/data.bin)"
    rm -f /tmp/data.bin
    ping -c 3 -W 2 "$IOVIRT_PEER" >/dev/null 2>&1 && say "ping-again-ok" || fail "no answer from $IOVIRT_PEER after the transfer"
    ;;
  ping)
    wait_peer
    n=$((SECONDS_ * 5))
    say "ping-start $n"
    ping -i 0.2 -W 1 -c "$n" "$IOVIRT_PEER" >/tmp/ping.out 2>&1
    say "ping-summary $(grep -E 'packets transmitted' /tmp/ping.out)"
    say "ping-last-seq $(grep -o 'seq=[0-9]*' /tmp/ping.out | tail -n 1 | cut -d= -f2) of $n"
    ;;
  extra)
    # iovirt.extra=ADDR,ADDR: one line per address, answered or not.
    for a in $(echo "$IOVIRT_EXTRA" | tr ',' ' '); do
      t=0
      until ping -c 1 -W 1 "$a" >/dev/null 2>&1; do
        t=$((t + 1))
        [ $t -ge 20 ] && break
      done
      if [ $t -ge 20 ]; then say "extra-ping $a fail"; else say "extra-ping $a ok"; fi
    done
    ;;
  linger)
    # Stay up a while: a peer may still ping this guest.
    sleep "${IOVIRT_LINGER:-5}"
    ;;
  serve)
    say "serving for $SECONDS_ s"
    sleep "$SECONDS_"
    ;;
  *) fail "unknown step $step in iovirt.role=$IOVIRT_ROLE" ;;
esac
done
stats
say "RESULT PASS"
NET_EOF
chmod 0755 "$ROOT/scripts/net.sh"

cat >"$ROOT/scripts/hostroot.sh" <<'HOSTROOT_EOF'
#!/bin/sh
# hostroot: mount the host's root file system (read-only 9p, mount_tag hostroot),
# give it this guest's /proc /sys /dev and a scratch tmpfs on /run (TMPDIR), and run the host script
# named by iovirt.run= inside it with the host's bash. Its exit status is ours.
say() { echo "IOVIRT-GUEST: $*"; }
fail() { say "error: $*"; say "RESULT FAIL"; exit 1; }
[ -n "$IOVIRT_RUN" ] || fail "iovirt.run= is not set"
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host || fail "cannot mount the 9p share hostroot"
for d in proc sys dev; do mount -o bind "/$d" "/host/$d" || fail "bind /$d"; done
# Scratch space is a tmpfs on /run, not on /tmp: the host's /tmp stays visible
# (a checkout under /tmp, as CI clones often are, must be reachable) but read-only.
mount -t tmpfs -o size=50% tmpfs /host/run || fail "tmpfs /host/run"
say "hostroot mounted uptime=$(cut -d' ' -f1 /proc/uptime)"
[ -f "/host$IOVIRT_RUN" ] || fail "iovirt.run=$IOVIRT_RUN is not a file in the host's root as this guest sees it"
chroot /host /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root TMPDIR=/run /bin/bash "$IOVIRT_RUN"
HOSTROOT_EOF
chmod 0755 "$ROOT/scripts/hostroot.sh"

cat >"$ROOT/scripts/blk-migrate.sh" <<'MIGRATE_EOF'
#!/bin/sh
# blk-migrate: reads and writes a virtio-blk disk while the host migrates the VM, then checks
# that every region it read is still, in the page cache, what it read. Region k (iovirt.mib MiB,
# default 2, at k * that offset) gets fresh random data written with O_DIRECT, then is read
# back through the page cache, so the device writes it into guest pages by DMA; those pages
# stay cached. Pages a device writes while a migration runs reach the destination only if the
# back end marks them in its dirty log: one it did not mark is the page's older content there.
# The loop ends when the host writes "IOVIRT-MIGRATED" at the start of a second disk
# (iovirt.flag, default /dev/vdb; opened afresh each time, so never read from a cache), or after
# iovirt.regions regions (default 40). Exit status 0 = PASS.
say() { echo "IOVIRT-GUEST: $*"; }
fail() { say "error: $*"; say "RESULT FAIL"; exit 1; }
DEV="${IOVIRT_DEV:-/dev/vda}"
MIB="${IOVIRT_MIB:-2}"
MAX="${IOVIRT_REGIONS:-40}"
i=0
while [ ! -b "$DEV" ]; do
  [ $i -ge 100 ] && fail "$DEV did not appear within 10 s"
  sleep 0.1; i=$((i + 1))
done
FLAG="${IOVIRT_FLAG:-/dev/vdb}"
[ -b "$FLAG" ] || fail "no flag disk $FLAG"
[ $((MAX * MIB * 1048576)) -le "$(blockdev --getsize64 "$DEV")" ] || fail "$DEV is too small for $MAX regions of $MIB MiB"
migrated() { dd if="$FLAG" bs=512 count=1 2>/dev/null | grep -q IOVIRT-MIGRATED; }
md5() { md5sum | cut -d' ' -f1; }
# Held open for the whole script: Linux drops a block device's page cache when its last opener
# closes it, and every region must stay cached from its read to the final check.
exec 3<"$DEV"
say "migrate-loop start"
k=0
while [ $k -lt "$MAX" ]; do
  dd if=/dev/urandom of=/tmp/gen.bin bs=1M count="$MIB" 2>/dev/null || fail "urandom"
  want="$(md5 </tmp/gen.bin)"
  dd if=/tmp/gen.bin of="$DEV" bs=1M seek=$((k * MIB)) oflag=direct conv=fsync 2>/dev/null || fail "write of region $k"
  got="$(dd if="$DEV" bs=1M skip=$((k * MIB)) count="$MIB" 2>/dev/null | md5)"
  [ "$got" = "$want" ] || fail "region $k read back wrong at once"
  eval "md5_$k=$want"
  say "region $k $want"
  k=$((k + 1))
  if migrated; then break; fi
done
migrated || fail "the host did not say the migration completed within $MAX regions"
say "migrated after $k regions uptime=$(cut -d' ' -f1 /proc/uptime)"
bad=0
i=0
while [ $i -lt $k ]; do
  got="$(dd if="$DEV" bs=1M skip=$((i * MIB)) count="$MIB" 2>/dev/null | md5)"
  eval "want=\$md5_$i"
  if [ "$got" != "$want" ]; then say "corrupt region $i"; bad=$((bad + 1)); fi
  i=$((i + 1))
done
say "corrupt-regions $bad"
[ $bad = 0 ] || fail "$bad region(s) changed in guest memory across the migration"
say "RESULT PASS"
MIGRATE_EOF
chmod 0755 "$ROOT/scripts/blk-migrate.sh"

# ---------------------------------------------------------------- pack
log "packing initramfs"
pack_cpio() {
  if command -v cpio >/dev/null 2>&1; then
    cpio --quiet -o -H newc -R 0:0
  else
    "$BUSYBOX" cpio -o -H newc -R 0:0
  fi
}
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | pack_cpio) | gzip -9 -n >"$INITRD.tmp"
cp "${vmlinuz[0]}" "$KERNEL.tmp"
mv -f "$KERNEL.tmp" "$KERNEL"
mv -f "$INITRD.tmp" "$INITRD"
echo "$KVER" >"$DIR/kernel-version"
echo "$WANT_STAMP" >"$STAMP"
rm -rf "$STAGE"
log "built kernel $KVER, initramfs $(stat -c %s "$INITRD") bytes"
echo "KERNEL=$KERNEL"
echo "INITRD=$INITRD"
