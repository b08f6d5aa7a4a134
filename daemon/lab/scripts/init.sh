#!/bin/sh
# /init of the invariantd lab initramfs (busybox static, arm64).
# Shipped by invariantd.daemon.lab, packed into $CACHE/build/initrd-<kernel>.cpio.gz.
#
# Mounts (9p/virtio, tags set by the host's QEMU command line):
#   ivdroot -> /mnt                 arm64 Debian rootfs with python3 (read-only, cache=loose)
#   ivdsrc  -> /mnt/opt/ivd/src     the host's project source tree (read-only, cache=loose)
#   ivdjob  -> /mnt/opt/ivd/job     per-run host directory (read-write, no cache): the host
#                                   writes cmd.N (shell fragments) and libivdbatch.so there,
#                                   the guest writes out.N / err.N (stdout / stderr of command N)
# then runs every cmd.N in order and powers off. Console markers ("@@IVD ...") are parsed
# by the host: QEMU exits 0 on any power-off, so the markers carry the verdict.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox --install -s /bin 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
up() { cut -d' ' -f1 /proc/uptime; }
die() { echo "@@IVD FAIL $* @@"; sync; poweroff -f; sleep 10; }
echo "@@IVD INIT uptime=$(up) release=$(uname -r) machine=$(uname -m) @@"
if [ -f /modules.list ]; then
	while read -r m; do
		[ -n "$m" ] || continue
		insmod "/lib/modules/$m" 2>&1 | sed 's/^/@@IVD INSMOD /'
	done < /modules.list
fi
if [ -e /dev/kvm ]; then echo "@@IVD DEVKVM yes @@"; else echo "@@IVD DEVKVM no @@"; fi

# optional NIC (host: run_many_in_guest(net=...)): kernel parameter ivd.ip=ADDR/PREFIX -> eth0, lo up
IVD_IP=
for a in $(cat /proc/cmdline); do
	case "$a" in ivd.ip=*) IVD_IP=${a#ivd.ip=} ;; esac
done
if [ -n "$IVD_IP" ]; then
	i=0
	while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
	ip link set lo up
	if ip addr add "$IVD_IP" dev eth0 && ip link set eth0 up; then
		echo "@@IVD NET ip=$IVD_IP mac=$(cat /sys/class/net/eth0/address) @@"
	else
		echo "@@IVD NETFAIL ip=$IVD_IP @@"
	fi
fi

O=trans=virtio,version=9p2000.L,msize=512000
R=/mnt
mkdir -p $R
mount -t 9p -o $O,cache=loose,ro ivdroot $R || die "mount ivdroot"
mount -t 9p -o $O,cache=loose,ro ivdsrc $R/opt/ivd/src || die "mount ivdsrc"
mount -t 9p -o $O ivdjob $R/opt/ivd/job || die "mount ivdjob"
mount -t proc proc $R/proc
mount -t devtmpfs devtmpfs $R/dev
mount -t sysfs sysfs $R/sys
mount -t tmpfs tmpfs $R/tmp
mount -t tmpfs tmpfs $R/opt/ivd/run || die "mount run tmpfs"

# import name "invariantd": an empty package whose subpackages are symlinks into the source
P=$R/opt/ivd/run/pkg/invariantd
mkdir -p $P $R/opt/ivd/run/lib
: > $P/__init__.py
for d in $R/opt/ivd/src/*/; do
	d=${d%/}
	[ -f "$d/__init__.py" ] && ln -s "/opt/ivd/src/${d##*/}" "$P/${d##*/}"
done
# dlopen from tmpfs rather than from 9p
[ -f $R/opt/ivd/job/libivdbatch.so ] && cp $R/opt/ivd/job/libivdbatch.so $R/opt/ivd/run/lib/

J=$R/opt/ivd/job
echo "@@IVD READY uptime=$(up) @@"
n=0
while [ -f "$J/cmd.$n" ]; do
	echo "@@IVD BEGIN n=$n uptime=$(up) @@"
	s=$(up)
	( . "$J/cmd.$n" ) > "$J/out.$n" 2> "$J/err.$n" < /dev/null
	rc=$?
	e=$(up)
	sync
	echo "@@IVD RC n=$n rc=$rc secs=$(awk -v a="$s" -v b="$e" 'BEGIN{printf "%.2f", b-a}') @@"
	n=$((n+1))
done
echo "@@IVD POWEROFF uptime=$(up) @@"
umount $R/opt/ivd/job 2>/dev/null
sync
poweroff -f
sleep 10
