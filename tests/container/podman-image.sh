#!/usr/bin/env bash
# The image of deploy/docker/Dockerfile, built here with podman from nothing a registry serves,
# for the tests marked `container` (tests/test_container.py) and for trying the image on one
# machine. Everything lives under one folder (podman's storage included). Needs root
# (debootstrap, rootful podman) and Debian's podman, buildah, runc and debootstrap (installed when
# missing).
#
#   tests/container/podman-image.sh build DIR   # prints the `export`s that point podman at DIR
#   tests/container/podman-image.sh clean DIR   # removes DIR, the images in it included
#
# then e.g.  eval "$(tests/container/podman-image.sh build /tmp/img)"
#            podman run --rm --network none localhost/scatac-dist:test --help
#
# build: (1) a Debian bookworm base image with python3 (debootstrap --variant=minbase, then
# `podman import`; the tarball is cached under ~/.cache/scatac-dist), (2) a wheelhouse on this
# host: `pip download` of deploy/docker/requirements.txt (the host's pip config serves
# torch 2.13.0+cpu from /opt/wheels) plus wheel for the package's own build, (3) a build
# context of the files the image needs (git ls-files: the working tree, not a commit), (4)
# `podman build` with the wheelhouse mounted at /wheelhouse and --network none.
# Facts this follows: ../shared/GUIDE.md §4 "Containers" (cgroupfs, runc, ulimits, --network
# none). Storage: overlay where the kernel mounts it (here it does), else vfs; STORAGE_DRIVER=vfs
# forces vfs.
set -euo pipefail
cmd=${1:?usage: podman-image.sh build|clean DIR}
dir=$(realpath -m "${2:?usage: podman-image.sh build|clean DIR}")
repo=$(cd "$(dirname "$0")/../.." && pwd)
py=${PY:-$repo/.venv/bin/python}
image=${IMAGE:-localhost/scatac-dist:test}
base=localhost/scatac-base:bookworm
cache=${SCATAC_DIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/scatac-dist}
ulimits=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)

say() { echo "podman-image: $*" >&2; }
export CONTAINERS_CONF=$dir/containers.conf CONTAINERS_STORAGE_CONF=$dir/storage.conf

clean() {
    [ -d "$dir" ] || return 0
    if [ -f "$CONTAINERS_CONF" ] && command -v podman >/dev/null; then
        podman rm --all --force --time 0 >/dev/null 2>&1 || true
    fi
    # nothing may stay mounted under DIR (a container's shm) before it goes
    { findmnt -rn -o TARGET | grep -F "$dir/" || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
    # the one thing podman writes outside DIR (its blob-info cache): gone again if we made it
    if [ -f "$dir/made-var-lib-containers" ]; then rm -rf /var/lib/containers/cache; rmdir /var/lib/containers 2>/dev/null || true; fi
    rm -rf "$dir"
}

if [ "$cmd" = clean ]; then clean; exit 0; fi
[ "$cmd" = build ] || { echo "usage: podman-image.sh build|clean DIR" >&2; exit 2; }

if [ "$(id -u)" != 0 ]; then
    say "not root: debootstrap and rootful podman need root; the container tests will skip"; exit 3
fi
mkdir -p "$dir"
[ -e /var/lib/containers ] || touch "$dir/made-var-lib-containers"
missing=()
for tool in podman buildah runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} from Debian's packages"
    t=$SECONDS
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        podman buildah runc debootstrap) >"$dir/apt.log" 2>&1 || { say "apt-get failed, see $dir/apt.log"; exit 3; }
    say "apt-get install: $((SECONDS - t)) s"
fi

# podman's storage driver: overlay where this machine mounts overlayfs (a run starts in 3 s), else
# vfs (every layer committed and every container started is a full copy: 20 s a run here)
driver=${STORAGE_DRIVER:-}
if [ -z "$driver" ]; then
    probe=$dir/overlay-probe
    mkdir -p "$probe"/{lower,upper,work,merged}
    if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
        "$probe/merged" 2>/dev/null; then
        umount "$probe/merged"; driver=overlay
    else
        driver=vfs
    fi
    rm -rf "$probe"
fi
say "storage driver: $driver"

# podman, all under DIR: its storage, cgroupfs (no systemd here), runc (crun refuses this
# machine's hybrid cgroups), events to a file, no CAP_SYS_RESOURCE for the default ulimits
mkdir -p "$dir"/{storage,run,tmp,net}
cat >"$CONTAINERS_STORAGE_CONF" <<CONF
[storage]
driver = "$driver"
graphroot = "$dir/storage"
runroot = "$dir/run"
CONF
cat >"$CONTAINERS_CONF" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
tmp_dir = "$dir/tmp"
[network]
network_config_dir = "$dir/net"
CONF

say "$(podman --version), $(buildah --version | cut -d' ' -f1-3), $(runc --version | head -1)"

# (1) the base image: Debian bookworm, python3 (3.11) and its venv module, no apt lists or caches
tarball=$cache/debian-bookworm-minbase-python3.tar
mkdir -p "$cache" 2>/dev/null || { cache=$dir; tarball=$dir/debian-bookworm-minbase-python3.tar; }
if [ ! -s "$tarball" ]; then
    t=$SECONDS
    rootfs=$dir/rootfs
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" \
        http://deb.debian.org/debian >"$dir/debootstrap.log" 2>&1 \
        || { say "debootstrap failed, see $dir/debootstrap.log"; exit 3; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*
    tar --numeric-owner -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
    say "debootstrap: $((SECONDS - t)) s ($(du -h "$tarball" | cut -f1), cached in $tarball)"
else
    say "debootstrap: cached $tarball"
fi
t=$SECONDS
podman import --quiet --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" --change 'CMD ["python3"]' "$tarball" "$base" >/dev/null
say "podman import: $((SECONDS - t)) s"

# (2) the wheelhouse: the pinned wheels (no sdist: nothing compiles in the image), and wheel for
# the build of the package itself (setuptools is pinned already: torch needs it)
t=$SECONDS
wheelhouse=$dir/wheelhouse
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$wheelhouse" \
    -r "$repo/deploy/docker/requirements.txt" wheel >"$dir/pip-download.log" 2>&1 \
    || { say "pip download failed, see $dir/pip-download.log"; exit 3; }
if ! compgen -G "$wheelhouse/torch-2.13.0+cpu-*.whl" >/dev/null; then
    say "pip download did not find torch 2.13.0+cpu (the host's pip config serves it from /opt/wheels):" \
        "$(ls "$wheelhouse" | grep '^torch-' || true)"; exit 3
fi
say "wheelhouse: $((SECONDS - t)) s ($(ls "$wheelhouse" | wc -l) wheels, $(du -sh "$wheelhouse" | cut -f1))"

# (3) the build context: only what .dockerignore lets through, from the working tree
context=$dir/context
mkdir -p "$context"
paths=(.dockerignore pyproject.toml README.md LICENSE scatac_dist deploy/docker deploy/k8s)
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    # files, and links as links (scatac_dist/cluster/k8s -> deploy/k8s)
    git -C "$repo" ls-files -z --cached --others --exclude-standard -- "${paths[@]}" |
        while IFS= read -r -d '' f; do
            if [ -f "$repo/$f" ] || [ -L "$repo/$f" ]; then
                mkdir -p "$context/$(dirname "$f")" && cp -P -p "$repo/$f" "$context/$f"
            fi
        done
else
    for p in "${paths[@]}"; do (cd "$repo" && cp -rP -p --parents "$p" "$context"); done
fi

# (4) the image: one build, --layers=false (vfs copies the whole tree at every layer it commits)
t=$SECONDS
version=$("$py" -c "import tomllib; print(tomllib.load(open('$repo/pyproject.toml', 'rb'))['project']['version'])")
podman build --pull=never --layers=false --network none "${ulimits[@]}" \
    --volume "$wheelhouse:/wheelhouse:ro" \
    --build-arg BASE_IMAGE=$base --build-arg VERSION="$version" \
    --build-arg PIP_OPTIONS="--no-index --find-links /wheelhouse" \
    -f "$context/deploy/docker/Dockerfile" -t "$image" "$context" >"$dir/build.log" 2>&1 \
    || { tail -40 "$dir/build.log" >&2; say "podman build failed, see $dir/build.log"; exit 3; }
size=$(podman image inspect --format '{{.Size}}' "$image")
say "podman build: $((SECONDS - t)) s; $image: $size bytes ($((size / 1000000)) MB)"
# the base image and the build stage are not needed any more
podman image prune --force >/dev/null 2>&1 || true
echo "export CONTAINERS_CONF=$CONTAINERS_CONF CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF"
