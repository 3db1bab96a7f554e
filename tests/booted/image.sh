#!/bin/bash
# The base image booted test nodes start from: Debian SUITE, debootstrap minbase plus
# systemd, sshd, git, python3-venv and cloud-init, tweaked so that a node copied from it
# boots fast and unique under systemd-nspawn. Built once into DEST; the harness keys DEST
# on this file's hash, so editing the recipe rebuilds the image.
#   image.sh SUITE DEST
set -euo pipefail
suite=$1 dest=$2
mirror=${TROOPS_E2E_MIRROR:-http://deb.debian.org/debian}
tmp="$dest.partial"
rm -rf "$tmp"
mkdir -p "$(dirname "$dest")"
# debconf and adduser are what the package depends on beyond the list.
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,openssh-server,git,python3,python3-venv,iproute2,ca-certificates,adduser,debconf,sudo \
    "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1 || { tail -30 "$tmp.log" >&2; exit 1; }
# cloud-init through apt: debootstrap does not resolve the virtual packages its Python
# dependencies need. No service may start inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
chmod +x "$tmp/usr/sbin/policy-rc.d"
chroot "$tmp" env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get update -q && apt-get install -y -q --no-install-recommends cloud-init' >>"$tmp.log" 2>&1 ||
    { tail -30 "$tmp.log" >&2; exit 1; }
rm -f "$tmp/usr/sbin/policy-rc.d"
rm -rf "$tmp/var/lib/apt/lists/"*_Packages "$tmp/var/lib/apt/lists/"*_InRelease

# Every node must get its own machine-id (rollout buckets hash it) and journal.
: >"$tmp/etc/machine-id"
rm -rf "$tmp/var/log/journal/"* "$tmp/var/cache/apt/archives/"*.deb
# Nodes have no DNS: a resolver that answers at once beats one that times out (ssh, getent).
echo 'nameserver 127.0.0.1' >"$tmp/etc/resolv.conf"
printf 'Host *\n    GSSAPIAuthentication no\n' >"$tmp/etc/ssh/ssh_config.d/lab.conf"
printf 'UseDNS no\n' >"$tmp/etc/ssh/sshd_config.d/lab.conf"
# cloud-init: only NoCloud (or nothing), no network configuration (the harness sets the
# network up from outside), and a locale that exists in minbase.
printf 'datasource_list: [ NoCloud, None ]\nlocale: C.UTF-8\nnetwork: {config: disabled}\n' \
    >"$tmp/etc/cloud/cloud.cfg.d/99-lab.cfg"
chroot "$tmp" cloud-init clean --logs >/dev/null 2>&1 || true
# Nothing else on a timer: the journal should hold troops and little more.
chroot "$tmp" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    fstrim.timer dpkg-db-backup.timer systemd-networkd-wait-online.service >/dev/null 2>&1 || true
rm -f "$tmp.log"
mv "$tmp" "$dest"
