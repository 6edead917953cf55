#!/usr/bin/env bash
# Build a minimal Debian bookworm image locally, for hosts that cannot pull
# from a container registry:
#
#     debootstrap --variant=minbase bookworm ROOTFS  ->  docker import
#
# The result (backendai-jupyter/bootstrap:bookworm) is what
# kernels/base/Dockerfile builds on when no BASE_IMAGE is given.
#
# Usage: bootstrap.sh [--force]
#   --force   rebuild even if the image already exists
#
# Environment:
#   BOOTSTRAP_IMAGE   tag to create (default backendai-jupyter/bootstrap:bookworm)
#   DEBIAN_MIRROR     mirror to bootstrap from (default: the host's apt
#                     configuration for bookworm, else http://deb.debian.org/debian)
set -euo pipefail

IMAGE="${BOOTSTRAP_IMAGE:-backendai-jupyter/bootstrap:bookworm}"
SUITE=bookworm
FALLBACK_MIRROR=http://deb.debian.org/debian
FALLBACK_SECURITY_MIRROR=http://deb.debian.org/debian-security
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

log() { echo "bootstrap: $*" >&2; }
die() { log "error: $*"; exit 1; }

force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--force])" ;;
    esac
done

command -v docker >/dev/null 2>&1 || die "docker CLI not found (see scripts/ensure-docker.sh)"
docker info >/dev/null 2>&1 || die "Docker engine not reachable (run scripts/ensure-docker.sh as root)"

if [[ "$force" -eq 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already exists (use --force to rebuild)"
    exit 0
fi

[[ "$(id -u)" -eq 0 ]] || die "debootstrap needs root; run: sudo $0 $*"
if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 \
        || die "debootstrap not found and no apt-get to install it with: install debootstrap, or pass --base-image"
    log "debootstrap not found: installing it with apt-get"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } >&2 \
        || die "could not install debootstrap (apt-get install debootstrap)"
fi
[[ -r "$CA_BUNDLE" ]] \
    || die "$CA_BUNDLE missing on the host; install ca-certificates (apt inside the image needs it for https mirrors)"

# Print the first URI the host's apt configuration uses for SUITE, reading
# both one-line (*.list) and deb822 (*.sources) files. Reusing the host's
# mirror matters on networks where only a local mirror or proxy is reachable.
host_mirror_for() {
    local suite="$1" f
    shopt -s nullglob
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        awk -v suite="$suite" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r "$f" ]] || continue
        # One stanza per paragraph; RS="" makes awk read paragraphs.
        awk -v suite="$suite" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; enabled = "yes"
                for (n = 1; n <= NF; n++) {
                    line = $n
                    if (line ~ /^#/) continue
                    key = tolower(line); sub(/:.*/, "", key)
                    val = line; sub(/^[^:]*:[ \t]*/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                if (enabled == "no" || (" " types " ") !~ / deb /) next
                if ((" " suites " ") ~ (" " suite " ")) { split(uris, u, /[ \t]+/); print u[1]; exit }
            }' "$f"
    done
    shopt -u nullglob
}

mirror="${DEBIAN_MIRROR:-$(host_mirror_for "$SUITE" | head -n 1)}"
mirror="${mirror:-$FALLBACK_MIRROR}"
security_mirror="$(host_mirror_for "$SUITE-security" | head -n 1)"
security_mirror="${security_mirror:-$FALLBACK_SECURITY_MIRROR}"

# /var/tmp rather than /tmp: /tmp is often a small tmpfs or mounted nodev,
# and the rootfs needs a couple of hundred MB plus device nodes.
workdir="$(mktemp -d /var/tmp/backendai-bootstrap.XXXXXX)"
rootfs="$workdir/rootfs"

cleanup() {
    # debootstrap mounts proc/sys inside the target; if it failed half-way
    # those mounts may still be there and must not be recursed into.
    local m
    awk -v root="$rootfs" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r \
        | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$workdir"
}
trap cleanup EXIT

log "debootstrap --variant=minbase $SUITE from $mirror (takes a few minutes)"
debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$workdir/debootstrap.log" 2>&1 || {
    tail -n 30 "$workdir/debootstrap.log" >&2
    die "debootstrap failed"
}

# apt inside `docker build` fetches over https only if the image trusts the
# usual CAs; the minbase variant ships none, so borrow the host's bundle.
install -D -m 0644 "$CA_BUNDLE" "$rootfs$CA_BUNDLE"
# Installing the ca-certificates package later regenerates that bundle from
# Mozilla's list plus /usr/local/share/ca-certificates, so locally added CAs
# (e.g. of a TLS-inspecting proxy, a common reason for having no registry)
# must be there too, or pip in the kernel images cannot reach PyPI.
if [[ -d /usr/local/share/ca-certificates ]]; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
fi

cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb $security_mirror $SUITE-security main
EOF

# Keep the image small and free of host details: Docker provides
# resolv.conf/hostname/hosts at run time anyway.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/var/log/bootstrap.log "$rootfs"/debootstrap
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

log "importing rootfs as $IMAGE"
tar --numeric-owner --xattrs -C "$rootfs" -c . \
    | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --change "LABEL io.backendai-jupyter.bootstrap-mirror=$mirror" \
        - "$IMAGE" >/dev/null

log "created $IMAGE ($(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
