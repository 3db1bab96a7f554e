# Sourced by dev/demo and dev/test: installs what they need on a fresh Debian 12 machine
# with a Rust toolchain. Safe to run again; installs only what is missing.

set -euo pipefail

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# apt packages the agent and its tests use at run time: git (gix runs git-upload-pack for
# file:// remotes), python3-venv (venvs with pip), procps (tests look for leftover processes).
need_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "dev: installing ${missing[*]}" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# openssh-server: the tests run a real sshd on a loopback port (never started as a service
# by them). passwd: useradd/groupadd for throwaway admin users and groups. systemd:
# systemd-socket-activate, to test the daemon taking its socket the way troops.socket hands it.
# lintian: the package check (packaging/check-deb). debootstrap, systemd-container
# (systemd-nspawn) and iproute2: the booted test's Debian images, nodes and their network.
# faketime: the fault suite runs troops with its clock before 1970 and after 9999.
# nginx, fcgiwrap, tinyproxy, openssl: the hosting tests serve git over HTTPS with
# git-http-backend and a CA of their own, through a real proxy, all on loopback ports.
need_apt git python3 python3-venv openssh-client openssh-server passwd procps ca-certificates gzip systemd gnupg lintian \
    debootstrap systemd-container iproute2 util-linux faketime openssl
# Their packages start system services on install; the tests start their own instances,
# so none is started here (policy-rc.d says "not now" for the duration of the install).
no_services() {
    local policy=/usr/sbin/policy-rc.d
    if [ -e "$policy" ]; then need_apt "$@"; return; fi
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    need_apt "$@" || { as_root rm -f "$policy"; return 1; }
    as_root rm -f "$policy"
}
# prometheus-node-exporter, prometheus (for promtool): the metrics tests serve the textfile and
# check it and the example alerting rules.
no_services nginx fcgiwrap tinyproxy prometheus-node-exporter prometheus

if ! command -v cargo >/dev/null; then
    # shellcheck disable=SC1091
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "dev: cargo not found: install a Rust toolchain with rustup first" >&2; exit 1; }
