# Shared by scripts/verify/image.sh and scripts/verify/compose.sh: PASS/FAIL
# bookkeeping, and podman on a Debian bookworm machine with no Docker engine and no
# access to an image registry (base images made locally with debootstrap).
# Source it; do not run it. Needs root.
# shellcheck shell=bash

PODMAN=(podman --runtime runc)
VERIFY_WORK="${VERIFY_IMAGE_WORKDIR:-/var/tmp/message-dispatcher-verify}"
T_START=$(date +%s)
RESULTS=()
FAILED=0

# pass/fail always return 0, so `cond && pass ... || fail ...` is an if/else.
pass() { RESULTS+=("PASS  $*"); echo "PASS: $*"; }
fail() { RESULTS+=("FAIL  $*"); echo "FAIL: $*" >&2; FAILED=1; }
info() { RESULTS+=("INFO  $*"); echo "INFO: $*"; }
die() { fail "$*"; exit 1; }

# print_summary NAME: the recorded results, the run time and RESULT: PASS|FAIL.
print_summary() {
  echo
  echo "================ $1 summary ================"
  local r
  for r in "${RESULTS[@]}"; do echo "$r"; done
  echo "total time: $(( $(date +%s) - T_START ))s"
  if [[ $FAILED -eq 0 ]]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
}

# podman_setup: podman's default ulimits (nofile/nproc) cannot be set inside this sandbox.
podman_setup() {
  if [[ ! -f /etc/containers/containers.conf ]]; then
    mkdir -p /etc/containers
    printf '[containers]\ndefault_ulimits = []\n' > /etc/containers/containers.conf
  elif ! grep -q default_ulimits /etc/containers/containers.conf; then
    echo "warning: /etc/containers/containers.conf exists without default_ulimits; leaving it alone" >&2
  fi
}

# qualify_image NAME: the name as podman stores it (docker.io/library/ for
# unqualified official images, docker.io/ for other Docker Hub names).
qualify_image() {
  local n=$1
  [[ $n == */* ]] || n="library/$n"
  [[ ${n%%/*} == *.* || ${n%%/*} == localhost ]] || n="docker.io/$n"
  echo "$n"
}

# make_bookworm_rootfs DIR: a debootstrap --variant=minbase bookworm tree in DIR, slimmed
# like the official -slim images (kept: reused while DIR/.verify-image-complete exists).
make_bookworm_rootfs() {
  local rootfs=$1
  [[ -x $rootfs/bin/sh && -f $rootfs/.verify-image-complete ]] && return 0
  rm -rf "$rootfs"
  mkdir -p "$(dirname "$rootfs")"
  echo "debootstrap --variant=minbase bookworm $rootfs"
  if ! debootstrap --variant=minbase bookworm "$rootfs" >"$rootfs.log" 2>&1; then
    tail -20 "$rootfs.log"
    return 1
  fi
  # No docs/man/locales now or later.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
  # The apt settings of the official images: no package caches left in layers.
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF2'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF2
  echo 'Acquire::GzipIndexes "true";' >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  rm -rf "$rootfs"/usr/share/{man,groff,info,locale,lintian}/* \
         "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
  touch "$rootfs/.verify-image-complete"
}

# import_rootfs DIR IMAGE [--change ...]: DIR as a one-layer image named IMAGE.
import_rootfs() {
  local rootfs=$1 image=$2
  shift 2
  tar -C "$rootfs" --exclude=./.verify-image-complete -c . \
    | "${PODMAN[@]}" import "$@" - "$image" >/dev/null
}

# ensure_debian_base IMAGE: IMAGE (debian:bookworm-slim, qualified) from debootstrap,
# unless it exists already (REBUILD_BASE=1 recreates it). Returns 1 on failure; prints
# "created" or "present".
ensure_debian_base() {
  local image=$1
  if [[ ${REBUILD_BASE:-0} != 1 ]] && "${PODMAN[@]}" image exists "$image"; then
    echo present
    return 0
  fi
  make_bookworm_rootfs "$VERIFY_WORK/rootfs-bookworm" >&2 || return 1
  import_rootfs "$VERIFY_WORK/rootfs-bookworm" "$image" --change 'CMD ["bash"]' || return 1
  echo created
}
