#!/bin/sh
# Installs the Debian packages the project needs, once. Idempotent: packages
# already present are not fetched again and apt's lists are only refreshed
# when something is missing.
set -eu

PACKAGES="
  build-essential pkg-config libsystemd-dev
  iproute2 util-linux procps
  openssh-server openssh-client socat
  fuse3 libfuse3-dev sshfs
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils python3-libvirt
  debootstrap busybox-static cpio
  fdisk
  debhelper dh-python python3-all-dev python3-pip
  python3-outcome python3-sortedcontainers python3-idna
  dpkg-dev systemd-container
"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
    echo "setup-system: all Debian packages present"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "setup-system: missing packages:$missing (run as root to install them)" >&2
    exit 1
fi
echo "setup-system: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# apt starts no services on these machines (no systemd as PID 1); policy-rc.d
# makes sure of it elsewhere too, so installing sshd never opens a port.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -q --no-install-recommends $missing
