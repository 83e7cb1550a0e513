# scripts/vm/boot.sh - the core of scripts/vm.sh: one guest boot from the host's side.
# Sourced by scripts/vm.sh (defines functions only; the globals are set there):
# helpers, host packages, the guest kernel, the static workspace build, the initramfs
# (whose /init is scripts/vm/init.sh), option parsing, the NVMe controllers and
# vm_boot, which runs QEMU.
# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------

# Host messages go to stderr: stdout carries only the guest's console so that
# callers can capture the command's output.
vm_log() { printf 'vm.sh: %s\n' "$*" >&2; }
vm_die() { printf 'vm.sh: error: %s\n' "$*" >&2; exit "$VM_EXIT_INFRA"; }
vm_usage_error() { printf 'vm.sh: %s\n' "$*" >&2; printf "Run 'scripts/vm.sh help' for usage.\n" >&2; exit 2; }

# True if the ELF file $1 has no program interpreter (PT_INTERP), i.e. needs
# no ld.so/libc, which the guest does not have.
vm_elf_is_static() {
    python3 - "$1" <<'PY'
import struct, sys
with open(sys.argv[1], "rb") as f:
    hdr = f.read(64)
    if hdr[:4] != b"\x7fELF" or hdr[4] != 2:
        sys.exit(0)  # not a 64-bit ELF (a script?): nothing to check
    phoff, = struct.unpack_from("<Q", hdr, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", hdr, 0x36)
    for i in range(phnum):
        f.seek(phoff + i * phentsize)
        if struct.unpack("<I", f.read(4))[0] == 3:  # PT_INTERP
            sys.exit(1)
PY
}

vm_now() { date +%s.%N; }
vm_since() { awk -v a="$1" -v b="$(vm_now)" 'BEGIN { printf "%.1f", b - a }'; }

# Quote one argument for a POSIX shell (busybox sh in the guest): wrap in
# single quotes, write each embedded ' as '\''.
vm_sh_quote() {
    local s=${1//\'/\'\\\'\'}
    printf "'%s'" "$s"
}

vm_usage() {
    cat <<'EOF'
Usage:
  scripts/vm.sh run [OPTIONS] -- CMD [ARGS...]
  scripts/vm.sh shell [OPTIONS]
  scripts/vm.sh demo  [OPTIONS]      copy 1 GiB (DEMO_MB) to two drives with nvcopy, check by checksum
  scripts/vm.sh bench [OPTIONS]      nvcopy vs dd (1->1, 1->3, read, to NVMe/TCP), chunk x QD sweep;
                                     BENCH_ONLY=tcp for the NVMe/TCP part alone; see benches/README.md
  scripts/vm.sh help

Boots a QEMU q35 guest (TCG) with an emulated Intel IOMMU, binds every NVMe
controller to vfio-pci with scripts/setup.sh, runs CMD and exits with its
status (0-127; larger statuses are reported as 127).  Exit 124: the VM timed
out; 125: the VM itself failed (see the messages); 2: bad usage.

Options:
  --nvme KEY=VAL[,KEY=VAL...]  add an emulated NVMe controller (repeatable).
                               Controller i (from 0) sits at guest PCI slot
                               0x10+i (0000:00:10.0, 0000:00:11.0, ...) with
                               serial NVCOPY<i>.  Keys:
                                 size=SIZE   fresh sparse image per namespace
                                             (e.g. 256M, 1G; default 256M)
                                 file=PATH   use this existing host image (ns=1 only)
                                 lbs=512|4096 logical=physical block size (512)
                                 ns=N        N namespaces, nsid 1..N (1)
                                 mdts=N      max transfer 2^N * 4 KiB (QEMU default 7)
                                 blkdebug=SECTOR  reads that touch 512-byte sector
                                             SECTOR of the image fail with EIO, every
                                             time (QEMU blkdebug; ns=1 only)
                                 zoned=SIZE  zoned namespaces (ZNS) with zones of SIZE
                                             (e.g. 4M), capacity = size
  --net KEY=VAL[,KEY=VAL...]   one virtio-net NIC on a QEMU socket network over the
                               host's loopback, joining two guests (instead of no
                               network); loads virtio_pci, virtio_net.  Keys:
                                 socket-listen=PORT   QEMU listens on 127.0.0.1:PORT
                                                      (start this guest first)
                                 socket-connect=PORT  QEMU connects to 127.0.0.1:PORT
                                 mac=MAC     the NIC's address (default
                                             52:54:00:4e:56:01 listening,
                                             52:54:00:4e:56:02 connecting)
                                 ip=ADDR/LEN /init gives the NIC this IPv4 address
  --qemu-arg ARG               pass ARG to QEMU unchanged (repeatable)
  --noiommu                    no emulated IOMMU; vfio in unsafe no-IOMMU mode
                               (uses a vfio.ko rebuilt with CONFIG_VFIO_NOIOMMU)
  --hugemem MIB                hugepage memory reserved in the guest (512)
  --mem SIZE                   guest RAM (2G)
  --smp N                      guest CPUs (2)
  --timeout SECS               kill the VM after SECS (600 for run, none for shell)
  --no-bind                    leave the controllers with the kernel nvme driver
  --env NAME=VALUE             export NAME=VALUE to CMD in the guest (repeatable)
  --add HOSTPATH:GUESTPATH     copy a host file or directory into the guest
  --append ARGS                extra kernel command line arguments
  --kmod NAME                  also put kernel module NAME (with its dependencies)
                               in the guest and load it at boot, e.g. ext4, dm-mod
  --deb PACKAGE                unpack the Debian package PACKAGE (apt-get download,
                               cached in vm-work/debs) into the guest, with the
                               library packages it depends on, the host libraries
                               that ldd finds for its programs and the dynamic
                               loader, e.g. nvme-cli (its docs are left out)
  --no-build                   skip the cargo build (same as NVCOPY_VM_NO_BUILD=1)
  --keep                       keep the per-run directory (images, initramfs)
  --shell                      interactive shell instead of CMD (= `shell`)

Guest: binaries in /bin (nvcopy, setup.sh, busybox applets), test executables
in /tests/<package>-<target>, NVCOPY_DEVS = space-separated sorted NVMe BDFs,
hugetlbfs at /dev/hugepages, CMD runs in /tmp with stdin from /dev/null.
Serial console on stdout; vm.sh's own messages on stderr.
EOF
}

# ----------------------------------------------------------------------------
# Host packages
# ----------------------------------------------------------------------------

vm_pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

# apt-get update costs ~10 s, so run it at most once per process and only when
# something actually has to be fetched.
vm_apt_update_once() {
    [[ -n $VM_APT_UPDATED ]] && return 0
    vm_log "apt-get update"
    apt-get update -qq >&2 || vm_log "warning: apt-get update failed; trying with the existing package lists"
    VM_APT_UPDATED=1
}

# Install the given Debian packages that are not installed yet.
vm_install_packages() {
    local missing=() p
    for p in "$@"; do
        vm_pkg_installed "$p" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    vm_apt_update_once
    vm_log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
        vm_die "apt-get install ${missing[*]} failed"
}

vm_host_packages() {
    local pkgs=("${VM_HOST_PACKAGES[@]}")
    # The cargo JSON is parsed with python3; the build machines have it, but
    # a bare Debian does not.
    command -v python3 >/dev/null || pkgs+=(python3)
    vm_install_packages "${pkgs[@]}"
    command -v "$VM_QEMU" >/dev/null || vm_die "$VM_QEMU not found"
    command -v cargo >/dev/null || [[ -n ${NVCOPY_VM_NO_BUILD:-} ]] ||
        vm_die "cargo not found (install Rust, or use NVCOPY_VM_NO_BUILD=1)"
}

# ----------------------------------------------------------------------------
# Guest kernel: the Debian kernel, unpacked (never installed) into vm-work
# ----------------------------------------------------------------------------

# Sets VM_KV (e.g. 6.1.0-48-amd64) and VM_KDIR (the unpacked package root, with
# boot/vmlinuz-$VM_KV and lib/modules/$VM_KV).  The choice is remembered in
# kernel/current so that later runs neither need the network nor switch
# kernels behind the user's back after a Debian security update.
vm_kernel() {
    [[ -n $VM_KV ]] && return 0
    local kroot=$VM_WORK/kernel kv='' pkg tmp
    mkdir -p "$kroot"
    if [[ -z ${NVCOPY_VM_REFRESH_KERNEL:-} && -s $kroot/current ]]; then
        kv=$(<"$kroot/current")
        [[ -f $kroot/$kv/.complete ]] || kv=
    fi
    if [[ -z $kv ]]; then
        # The lists may be missing (fresh container) or name a version the
        # mirror no longer has, so refresh them before resolving the name.
        vm_apt_update_once
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
        [[ -n $pkg ]] || vm_die "cannot resolve the kernel package: 'apt-cache depends linux-image-amd64' names no linux-image-<version>"
        kv=${pkg#linux-image-}
        if [[ ! -f $kroot/$kv/.complete ]]; then
            vm_log "fetching guest kernel $pkg"
            tmp=$kroot/.tmp-$kv-$$
            rm -rf "$tmp" && mkdir -p "$tmp/root"
            # Sandbox user root: the _apt user may not be allowed to write here.
            (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) ||
                vm_die "apt-get download $pkg failed"
            dpkg -x "$tmp"/*.deb "$tmp/root" || vm_die "dpkg -x $pkg failed"
            # Debian generates modules.dep at install time (which we skip).
            depmod -b "$tmp/root" "$kv" || vm_die "depmod for $kv failed"
            [[ -f $tmp/root/boot/vmlinuz-$kv ]] || vm_die "$pkg has no boot/vmlinuz-$kv"
            rm -rf "${kroot:?}/$kv"
            mv "$tmp/root" "$kroot/$kv"
            rm -rf "$tmp"
            touch "$kroot/$kv/.complete"
        fi
        printf '%s\n' "$kv" >"$kroot/current"
    fi
    VM_KV=$kv
    VM_KDIR=$kroot/$kv
}

# ----------------------------------------------------------------------------
# Workspace build
# ----------------------------------------------------------------------------

# Builds the workspace (static binaries, test executables) and writes
# $VM_WORK/artifacts.tsv: "<guest path>\t<host path>" per executable.  With
# NVCOPY_VM_NO_BUILD the previous artifacts.tsv is reused as is.
vm_build() {
    local list=$VM_WORK/artifacts.tsv
    if [[ -n ${NVCOPY_VM_NO_BUILD:-} ]]; then
        if [[ -f $list ]]; then
            vm_log "NVCOPY_VM_NO_BUILD: reusing the binaries of the last build ($(wc -l <"$list") executables)"
        else
            vm_log "NVCOPY_VM_NO_BUILD: no previous build; the guest gets no nvcopy binaries"
            : >"$list"
        fi
        return 0
    fi
    local t0 json=$VM_WORK/.cargo-$$ rc=0
    t0=$(vm_now)
    # crt-static with an explicit --target: the binaries need no libc in the
    # guest, and RUSTFLAGS then applies only to target code, not to build
    # scripts and proc-macros.  A separate target dir keeps these flags from
    # invalidating the host's normal builds (and vice versa).
    local -a cargo_env=(env "RUSTFLAGS=${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static")
    local -a common=(--release --workspace --target "$VM_RUST_TARGET" --target-dir "$VM_TARGET_DIR"
        --manifest-path "$VM_REPO/Cargo.toml" --message-format=json-render-diagnostics)
    vm_log "cargo build (static, $VM_TARGET_DIR)"
    # JSON on stdout (captured), human-readable diagnostics on stderr.
    "${cargo_env[@]}" cargo build "${common[@]}" --bins >"$json.build" || rc=$?
    if ((rc == 0)); then
        "${cargo_env[@]}" cargo test "${common[@]}" --no-run >"$json.test" || rc=$?
    fi
    if ((rc != 0)); then
        rm -f "$json.build" "$json.test"
        vm_die "cargo build failed (exit $rc); fix the build or rerun with NVCOPY_VM_NO_BUILD=1 to reuse the last binaries"
    fi
    cargo metadata --no-deps --format-version 1 --manifest-path "$VM_REPO/Cargo.toml" >"$json.meta" ||
        vm_die "cargo metadata failed"
    python3 - "$json.meta" "$json.build" "$json.test" >"$list.tmp" <<'PY' || { rm -f "$json".*; vm_die "could not list the build's executables"; }
# Map cargo's JSON messages to guest paths:
#   binaries          -> /bin/<name>
#   test executables  -> /tests/<package>-<target>
# A lib and a bin may share a target name (nvcopy has both); then the bin's
# unit-test executable gets a "-bin" suffix so nothing is silently overwritten.
import json, sys

meta_path, build_path, test_path = sys.argv[1:4]
names = {p["id"]: p["name"] for p in json.load(open(meta_path))["packages"]}

def artifacts(path):
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            yield msg

out, seen = [], set()
def add(guest, host):
    if guest in seen:
        guest += "-bin"
    seen.add(guest)
    out.append((guest, host))

for m in artifacts(build_path):
    if not m["profile"]["test"]:
        add("/bin/" + m["target"]["name"], m["executable"])
tests = [m for m in artifacts(test_path) if m["profile"]["test"]]
# libs and integration tests first, so bins are the ones that get renamed
tests.sort(key=lambda m: "bin" in m["target"]["kind"])
for m in tests:
    add("/tests/%s-%s" % (names.get(m["package_id"], "unknown"), m["target"]["name"]), m["executable"])

for guest, host in out:
    print("%s\t%s" % (guest, host))
PY
    rm -f "$json".*
    local guest host
    while IFS=$'\t' read -r guest host; do
        vm_elf_is_static "$host" || vm_die "$host is not statically linked; it could not run in the guest"
    done <"$list.tmp"
    mv "$list.tmp" "$list"
    vm_log "build done in $(vm_since "$t0") s: $(cut -f1 "$list" | tr '\n' ' ')"
}

# ----------------------------------------------------------------------------
# initramfs
# ----------------------------------------------------------------------------

# The base archive (busybox + modules) depends only on the kernel, busybox and
# whether vfio.ko is the no-IOMMU one, so it is built once and cached; only
# the small per-run payload is rebuilt.  Prints the archive's path.
vm_base_initramfs() {
    local noiommu=$1 bb key cache stage mod f rel
    shift
    local -a modules=("${VM_GUEST_MODULES[@]}" "$@")
    # busybox-static's binary; a dynamic busybox (package "busybox") would
    # need a libc the guest does not have.
    bb=/bin/busybox
    if [[ ! -x $bb ]] || ! vm_elf_is_static "$bb"; then
        vm_die "$bb is missing or not static (install busybox-static)"
    fi
    key=$( {
        printf '%s\n' "$VM_KV" "${modules[*]}" "$noiommu" "format-1"
        sha256sum "$bb"
        [[ $noiommu == 1 ]] && sha256sum "$VM_NOIOMMU_KO"
    } | sha256sum | cut -c1-16)
    cache=$VM_WORK/cache/base-$VM_KV-$key.cpio.gz
    if [[ -f $cache ]]; then
        printf '%s\n' "$cache"
        return 0
    fi
    mkdir -p "$VM_WORK/cache"
    stage=$VM_WORK/cache/.stage-$$
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,lib/modules}
    cp "$bb" "$stage/bin/busybox"
    # /init needs /bin/sh before busybox --install has run.
    ln -s busybox "$stage/bin/sh"
    # The kernel opens /dev/console for /init before anything mounts devtmpfs;
    # without this node /init would start with no stdin/stdout/stderr.
    mknod -m 600 "$stage/dev/console" c 5 1

    # Module closure in load order, from the kernel's modules.dep.
    local -A want=()
    local deps
    for mod in "${modules[@]}"; do
        deps=$(modprobe -d "$VM_KDIR" -S "$VM_KV" --show-depends "$mod") ||
            vm_die "module $mod not found in $VM_KV"
        while read -r kind f _; do
            [[ $kind == insmod ]] && want[$f]=1
        done <<<"$deps"
    done
    for f in "${!want[@]}"; do
        rel=${f#"$VM_KDIR"/}
        mkdir -p "$stage/$(dirname "$rel")"
        if [[ $noiommu == 1 && $rel == */kernel/drivers/vfio/vfio.ko* ]]; then
            cp "$VM_NOIOMMU_KO" "$stage/${rel%.ko*}.ko"
            continue
        fi
        # busybox modprobe only reads plain .ko files reliably.
        case $f in
            *.ko.xz) xz -dc "$f" >"$stage/${rel%.xz}" ;;
            *.ko.zst) vm_install_packages zstd && zstd -qdc "$f" >"$stage/${rel%.zst}" ;;
            *.ko.gz) gzip -dc "$f" >"$stage/${rel%.gz}" ;;
            *) cp "$f" "$stage/$rel" ;;
        esac
    done
    cp "$VM_KDIR/lib/modules/$VM_KV"/modules.{order,builtin,builtin.modinfo} "$stage/lib/modules/$VM_KV/" 2>/dev/null
    depmod -b "$stage" "$VM_KV" || vm_die "depmod for the initramfs failed"
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6) >"$cache.tmp" ||
        vm_die "creating the base initramfs failed"
    rm -rf "$stage"
    mv "$cache.tmp" "$cache"
    printf '%s\n' "$cache"
}

# ----------------------------------------------------------------------------
# --deb: Debian packages with dynamically linked programs
# ----------------------------------------------------------------------------

# Prints the path of PACKAGE's .deb, downloaded once into $VM_WORK/debs (like the kernel,
# a cached package is reused, so that later runs need no network).
vm_deb_fetch() {
    local pkg=$1 dir=$VM_WORK/debs tmp f
    local -a found=()
    mkdir -p "$dir"
    shopt -s nullglob
    found=("$dir/${pkg}"_*.deb)
    shopt -u nullglob
    if ((${#found[@]} == 0)); then
        tmp=$dir/.tmp-$pkg-$$
        rm -rf "$tmp" && mkdir -p "$tmp"
        vm_log "--deb: fetching $pkg"
        if ! (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2); then
            # Missing or stale package lists (a fresh machine): refresh once and retry.
            vm_apt_update_once
            (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) ||
                { rm -rf "$tmp"; vm_die "--deb: apt-get download $pkg failed"; }
        fi
        shopt -s nullglob
        found=("$tmp/${pkg}"_*.deb)
        shopt -u nullglob
        ((${#found[@]} == 1)) || { rm -rf "$tmp"; vm_die "--deb: apt-get download $pkg left no single ${pkg}_*.deb"; }
        mv "${found[0]}" "$dir/" || vm_die "--deb: cannot move ${found[0]} to $dir"
        rm -rf "$tmp"
        found=("$dir/$(basename "${found[0]}")")
    fi
    printf '%s\n' "${found[0]}"
}

# The package names in a .deb's Depends and Pre-Depends: first alternative, no version
# constraint, no architecture qualifier.
vm_deb_depends() {
    local field
    for field in Pre-Depends Depends; do
        dpkg-deb -f "$1" "$field" | tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*)//' -e 's/:.*//' -e 's/[[:space:]]//g'
    done | sed '/^$/d'
}

# vm_deb_payload STAGE PAYLOAD PACKAGE...: unpacks the packages into STAGE with dpkg -x,
# and with them every library package (lib*) they depend on, transitively, that the host
# does not have installed; then copies STAGE, less usr/share, into the guest's PAYLOAD
# tree. Every ELF file is checked with ldd (LD_LIBRARY_PATH = STAGE's library folders);
# the libraries it finds on the host (libc, and installed library packages: the host is
# the same Debian release) and the dynamic loader go into PAYLOAD at the same paths.
# A library that ldd cannot find stops the run. Dependencies that are not libraries
# (uuid-runtime, say) are left out, and said so.
vm_deb_payload() {
    local stage=$1 payload=$2 pkg deb dep f line lib
    shift 2
    local -a queue=("$@")
    local -A seen=()
    local -a unpacked=()
    rm -rf "$stage" && mkdir -p "$stage" || vm_die "--deb: cannot create $stage"
    while ((${#queue[@]})); do
        pkg=${queue[0]}
        queue=("${queue[@]:1}")
        [[ -n ${seen[$pkg]:-} ]] && continue
        seen[$pkg]=1
        deb=$(vm_deb_fetch "$pkg") || exit $?
        dpkg -x "$deb" "$stage" || vm_die "--deb: dpkg -x $deb failed"
        unpacked+=("$(basename "$deb" .deb)")
        while read -r dep; do
            [[ -n ${seen[$dep]:-} ]] && continue
            if vm_pkg_installed "$dep"; then
                continue # its libraries are on the host, where ldd finds them
            elif [[ $dep == lib* ]]; then
                queue+=("$dep")
            else
                seen[$dep]=1
                vm_log "--deb $pkg: not unpacking its dependency $dep (not a library package)"
            fi
        done < <(vm_deb_depends "$deb")
    done
    local libpath=''
    for f in "$stage"/lib/x86_64-linux-gnu "$stage"/usr/lib/x86_64-linux-gnu "$stage"/lib "$stage"/usr/lib; do
        [[ -d $f ]] && libpath+=${libpath:+:}$f
    done
    local -A hostlibs=()
    local out nfiles=0
    while IFS= read -r -d '' f; do
        [[ $(head -c 4 "$f" | od -An -c | tr -d ' ') == 177ELF ]] || continue
        nfiles=$((nfiles + 1))
        # "not a dynamic executable" (static) is fine; anything not found is not.
        out=$(LD_LIBRARY_PATH=$libpath ldd "$f" 2>&1) || continue
        while IFS= read -r line; do
            case $line in
                *"=> not found"*) vm_die "--deb ${*}: ${f#"$stage"} needs ${line%% =>*}, which neither the unpacked packages nor the host have" ;;
                *" => /"*) lib=${line#*=> }; lib=${lib%% (*} ;;
                */*" (0x"*) lib=${line%% (*}; lib=${lib#"${lib%%[![:space:]]*}"} ;; # the loader
                *) continue ;;
            esac
            [[ $lib == "$stage"/* ]] || hostlibs[$lib]=1
        done <<<"$out"
    done < <(find "$stage" -path "$stage/usr/share" -prune -o -type f -print0)
    ((nfiles > 0)) || vm_die "--deb ${*}: no programs or libraries in the packages"
    (cd "$stage" && tar --exclude=./usr/share -cf - .) | (cd "$payload" && tar -xf -) ||
        vm_die "--deb: copying the unpacked packages into the guest failed"
    for lib in "${!hostlibs[@]}"; do
        mkdir -p "$payload$(dirname "$lib")"
        cp -L "$lib" "$payload$lib" || vm_die "--deb: cannot copy the host's $lib"
    done
    vm_log "--deb: unpacked ${unpacked[*]}; $nfiles ELF files; from the host: $(printf '%s\n' "${!hostlibs[@]}" | LC_ALL=C sort | tr '\n' ' ')"
}

# ----------------------------------------------------------------------------
# Option parsing and NVMe controllers
# ----------------------------------------------------------------------------

# Per-run state, reset by vm_boot.
vm_reset_state() {
    VM_OPT_NVME=()
    VM_OPT_QEMU_ARGS=()
    VM_OPT_NET=
    VM_OPT_NOIOMMU=0
    VM_OPT_HUGEMEM=512
    VM_OPT_MEM=2G
    VM_OPT_SMP=2
    VM_OPT_TIMEOUT=
    VM_OPT_BIND=1
    VM_OPT_ENV=()
    VM_OPT_ADD=()
    VM_OPT_APPEND=
    VM_OPT_KMODS=()
    VM_OPT_DEBS=()
    VM_OPT_NO_BUILD=
    VM_OPT_KEEP=0
    VM_OPT_SHELL=0
    VM_CMD=()
}

vm_parse_options() {
    local opt val
    while (($#)); do
        opt=$1
        # --opt=value is accepted as well as --opt value.
        if [[ $opt == --*=* ]]; then
            val=${opt#*=}
            opt=${opt%%=*}
            set -- "$opt" "$val" "${@:2}"
        fi
        case $opt in
            --nvme | --net | --qemu-arg | --hugemem | --mem | --smp | --timeout | --env | --add | --append | --kmod | --deb)
                (($# >= 2)) || vm_usage_error "$opt needs a value"
                val=$2
                shift 2
                ;;
            *) shift ;;
        esac
        case $opt in
            --nvme) VM_OPT_NVME+=("$val") ;;
            --net)
                [[ -z $VM_OPT_NET ]] || vm_usage_error "--net: one NIC per guest"
                VM_OPT_NET=$val ;;
            --qemu-arg) VM_OPT_QEMU_ARGS+=("$val") ;;
            --noiommu) VM_OPT_NOIOMMU=1 ;;
            --hugemem)
                [[ $val =~ ^[0-9]+$ ]] || vm_usage_error "--hugemem wants MiB, got '$val'"
                VM_OPT_HUGEMEM=$val ;;
            --mem)
                [[ $val =~ ^[0-9]+[MG]?$ ]] || vm_usage_error "--mem wants e.g. 2G or 1536M, got '$val'"
                VM_OPT_MEM=$val ;;
            --smp)
                [[ $val =~ ^[1-9][0-9]*$ ]] || vm_usage_error "--smp wants a CPU count, got '$val'"
                VM_OPT_SMP=$val ;;
            --timeout)
                [[ $val =~ ^[0-9]+$ ]] || vm_usage_error "--timeout wants seconds, got '$val'"
                VM_OPT_TIMEOUT=$val ;;
            --no-bind) VM_OPT_BIND=0 ;;
            --env)
                [[ $val =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || vm_usage_error "--env wants NAME=VALUE, got '$val'"
                VM_OPT_ENV+=("$val") ;;
            --add)
                [[ $val == ?*:/* ]] || vm_usage_error "--add wants HOSTPATH:/GUESTPATH, got '$val'"
                [[ -e ${val%:*} ]] || vm_usage_error "--add: ${val%:*} does not exist"
                VM_OPT_ADD+=("$val") ;;
            --append) VM_OPT_APPEND+=" $val" ;;
            --kmod)
                [[ $val =~ ^[A-Za-z0-9_-]+$ ]] || vm_usage_error "--kmod wants a module name, got '$val'"
                VM_OPT_KMODS+=("$val") ;;
            --deb)
                [[ $val =~ ^[a-z0-9][a-z0-9+.-]+$ ]] || vm_usage_error "--deb wants a Debian package name, got '$val'"
                VM_OPT_DEBS+=("$val") ;;
            --no-build) VM_OPT_NO_BUILD=1 ;;
            --keep) VM_OPT_KEEP=1 ;;
            --shell) VM_OPT_SHELL=1 ;;
            -h | --help) vm_usage; exit 0 ;;
            --) VM_CMD=("$@"); return 0 ;;
            -*) vm_usage_error "unknown option $opt" ;;
            *) VM_CMD=("$opt" "$@"); return 0 ;;
        esac
    done
}

# Size string (256M, 1G, 4096) -> bytes, or empty if malformed.
vm_size_bytes() {
    local s=${1^^} n unit
    [[ $s =~ ^([0-9]{1,13})([KMGT]?)$ ]] || return 0
    n=${BASH_REMATCH[1]}
    unit=${BASH_REMATCH[2]}
    case $unit in
        K) n=$((n << 10)) ;; M) n=$((n << 20)) ;; G) n=$((n << 30)) ;; T) n=$((n << 40)) ;;
    esac
    printf '%s\n' "$n"
}

# cache=none/aio=native (O_DIRECT, no double caching in the host page cache)
# is what the notes measured, but O_DIRECT fails on some filesystems (tmpfs
# before 6.6, overlayfs on some kernels).  Probe with a read so that a
# user-provided image is never modified by the probe.
vm_drive_cache_opts() {
    if dd if="$1" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null; then
        printf 'cache=none,aio=native'
    else
        vm_log "note: $(dirname "$1") does not support O_DIRECT; using cache=writeback,aio=threads for $(basename "$1")"
        printf 'cache=writeback,aio=threads'
    fi
}

# The -drive options that name the image $1: the file itself, or with a sector $2, the
# file under a blkdebug node whose rule fails every read touching that 512-byte sector
# with EIO.  The raw format on top matters: blkdebug rules fire on events that format
# drivers raise, and raw raises read_aio before each read it passes down.
vm_drive_backing() {
    local img=${1//,/,,} sector=$2
    if [[ -z $sector ]]; then
        printf 'file=%s' "$img"
        return
    fi
    printf 'file.driver=blkdebug,file.image.driver=file,file.image.filename=%s' "$img"
    printf ',file.inject-error.0.%s' event=read_aio iotype=read errno=5 once=off "sector=$sector"
}

# Turn --nvme spec number $1 ($2) into QEMU arguments appended to VM_QEMU_NVME,
# creating fresh images in $3 (the run directory).  With an empty $3 only
# validate the spec, so that typos fail before minutes of building.
vm_add_nvme() {
    local i=$1 spec=$2 rundir=$3 kv key val
    local size=256M file='' lbs=512 ns=1 mdts='' blkdebug='' zoned='' have_size=0
    local -a kvs=()
    [[ -n $spec ]] && IFS=, read -r -a kvs <<<"$spec"
    for kv in "${kvs[@]}"; do
        [[ $kv == *=* ]] || vm_usage_error "--nvme '$spec': '$kv' is not KEY=VALUE"
        key=${kv%%=*}
        val=${kv#*=}
        case $key in
            size) size=$val; have_size=1 ;;
            file) file=$val ;;
            lbs) lbs=$val ;;
            ns) ns=$val ;;
            mdts) mdts=$val ;;
            blkdebug) blkdebug=$val ;;
            zoned) zoned=$val ;;
            *) vm_usage_error "--nvme '$spec': unknown key '$key' (known: size, file, lbs, ns, mdts, blkdebug, zoned)" ;;
        esac
    done
    [[ $lbs == 512 || $lbs == 4096 ]] || vm_usage_error "--nvme '$spec': lbs must be 512 or 4096"
    if [[ ! $ns =~ ^[1-9][0-9]{0,2}$ ]] || ((ns > 256)); then
        vm_usage_error "--nvme '$spec': ns must be 1..256"
    fi
    if [[ -n $mdts ]] && { [[ ! $mdts =~ ^[0-9]{1,3}$ ]] || ((mdts > 255)); }; then
        vm_usage_error "--nvme '$spec': mdts must be 0..255"
    fi
    local bytes
    bytes=$(vm_size_bytes "$size")
    if [[ -z $bytes ]] || ((bytes <= 0)); then
        vm_usage_error "--nvme '$spec': bad size '$size' (e.g. 256M, 1G)"
    fi
    ((bytes % lbs == 0)) || vm_usage_error "--nvme '$spec': size $size is not a multiple of lbs=$lbs"
    if [[ -n $file ]]; then
        ((ns == 1)) || vm_usage_error "--nvme '$spec': file= works with one namespace only"
        ((have_size == 0)) || vm_usage_error "--nvme '$spec': give size= or file=, not both"
        [[ -f $file ]] || vm_usage_error "--nvme '$spec': $file is not an existing file"
        file=$(realpath "$file")
        bytes=$(stat -c %s "$file")
    fi
    if [[ -n $blkdebug ]]; then
        [[ $blkdebug =~ ^[0-9]{1,15}$ ]] || vm_usage_error "--nvme '$spec': blkdebug wants a sector number, got '$blkdebug'"
        ((ns == 1)) || vm_usage_error "--nvme '$spec': blkdebug= works with one namespace only"
        ((blkdebug < bytes / 512)) ||
            vm_usage_error "--nvme '$spec': blkdebug sector $blkdebug is beyond the image's $((bytes / 512)) sectors"
    fi
    local zone_opts=''
    if [[ -n $zoned ]]; then
        local zbytes
        zbytes=$(vm_size_bytes "$zoned")
        if [[ -z $zbytes ]] || ((zbytes <= 0 || bytes % zbytes != 0)); then
            vm_usage_error "--nvme '$spec': zoned=$zoned must be a size that divides the image's $bytes bytes"
        fi
        zone_opts=",zoned=true,zoned.zone_size=$zoned,zoned.zone_capacity=$zoned"
    fi
    [[ -n $rundir ]] || return 0

    local slot ctrl=c$i img j drive
    slot=$(printf '0x%x' $((VM_NVME_FIRST_SLOT + i)))
    VM_QEMU_NVME+=(-device "nvme,id=$ctrl,serial=NVCOPY$i,addr=$slot${mdts:+,mdts=$mdts}")
    for ((j = 1; j <= ns; j++)); do
        drive=nvme${i}n$j
        if [[ -n $file ]]; then
            img=$file
        else
            img=$rundir/$drive.img
            rm -f "$img"
            truncate -s "$bytes" "$img" || vm_die "cannot create $img"
        fi
        VM_QEMU_NVME+=(-drive "$(vm_drive_backing "$img" "$blkdebug"),if=none,id=$drive,format=raw,$(vm_drive_cache_opts "$img")"
            -device "nvme-ns,drive=$drive,bus=$ctrl,nsid=$j,logical_block_size=$lbs,physical_block_size=$lbs$zone_opts")
    done
}

# Turn the --net spec $1 into QEMU arguments (VM_QEMU_NET) and the guest address
# (VM_NET_IP, empty if none); usage errors exit.  Called before the build, so that a
# typo fails at once.
vm_parse_net() {
    local spec=$1 kv key val mode='' port='' mac='' ip=''
    local -a kvs=()
    VM_QEMU_NET=(-nic none)
    VM_NET_IP=
    [[ -n $spec ]] || return 0
    IFS=, read -r -a kvs <<<"$spec"
    for kv in "${kvs[@]}"; do
        [[ $kv == *=* ]] || vm_usage_error "--net '$spec': '$kv' is not KEY=VALUE"
        key=${kv%%=*}
        val=${kv#*=}
        case $key in
            socket-listen | socket-connect)
                [[ -z $mode ]] || vm_usage_error "--net '$spec': give one of socket-listen= and socket-connect="
                mode=${key#socket-}
                port=$val ;;
            mac) mac=$val ;;
            ip) ip=$val ;;
            *) vm_usage_error "--net '$spec': unknown key '$key' (known: socket-listen, socket-connect, mac, ip)" ;;
        esac
    done
    [[ -n $mode ]] || vm_usage_error "--net '$spec': socket-listen=PORT or socket-connect=PORT is required"
    if [[ ! $port =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then
        vm_usage_error "--net '$spec': '$port' is not a TCP port (1..65535)"
    fi
    if [[ -z $mac ]]; then
        [[ $mode == listen ]] && mac=52:54:00:4e:56:01 || mac=52:54:00:4e:56:02
    fi
    [[ $mac =~ ^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$ ]] || vm_usage_error "--net '$spec': bad mac '$mac'"
    if [[ -n $ip ]] && [[ ! $ip =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$ ]]; then
        vm_usage_error "--net '$spec': ip wants ADDR/PREFIXLEN, e.g. 10.77.0.1/24, got '$ip'"
    fi
    VM_QEMU_NET=(-netdev "socket,id=n0,$mode=127.0.0.1:$port" -device "virtio-net-pci,netdev=n0,mac=$mac")
    VM_NET_IP=$ip
}

# ----------------------------------------------------------------------------
# Boot
# ----------------------------------------------------------------------------

# Host preparation shared by every boot of this process: packages, kernel and
# (once) the workspace build.
vm_prepare() {
    [[ -n $VM_PREPARED ]] && return 0
    ((EUID == 0)) || vm_die "run as root (installs packages, creates device nodes)"
    mkdir -p "$VM_WORK"
    local t0
    t0=$(vm_now)
    # One vm.sh at a time installs packages and fills the caches.
    exec {VM_LOCK_FD}>"$VM_WORK/.lock"
    flock "$VM_LOCK_FD"
    vm_host_packages
    vm_kernel
    flock -u "$VM_LOCK_FD"
    vm_log "host ready in $(vm_since "$t0") s (guest kernel $VM_KV)"
    vm_build
    VM_PREPARED=1
}

vm_cleanup_runs() {
    local d
    for d in "${VM_RUN_DIRS[@]}"; do
        [[ -n $d && -d $d ]] && rm -rf "$d"
    done
    VM_RUN_DIRS=()
}

# vm_boot [OPTIONS] -- CMD [ARGS...]
# One guest run.  Returns (does not exit with) CMD's status, 124 on timeout,
# 125 if the VM failed.  Usage errors exit the process with 2, host-side
# failures (apt, cargo, ...) with 125.
vm_boot() {
    local i
    vm_reset_state
    vm_parse_options "$@"
    if ((VM_OPT_SHELL == 0 && ${#VM_CMD[@]} == 0)); then
        vm_usage_error "run: no command given (scripts/vm.sh run [OPTIONS] -- CMD [ARGS...])"
    fi
    ((${#VM_OPT_NVME[@]} <= VM_NVME_MAX)) || vm_usage_error "at most $VM_NVME_MAX --nvme controllers"
    for i in "${!VM_OPT_NVME[@]}"; do
        vm_add_nvme "$i" "${VM_OPT_NVME[$i]}" ""
    done
    vm_parse_net "$VM_OPT_NET"
    # Debian builds the virtio PCI transport as a module too.
    local m
    for m in virtio_pci virtio_net; do
        if [[ -n $VM_OPT_NET && " ${VM_OPT_KMODS[*]} " != *" $m "* ]]; then
            VM_OPT_KMODS+=("$m")
        fi
    done
    [[ -n $VM_OPT_NO_BUILD ]] && export NVCOPY_VM_NO_BUILD=1
    local timeout=${VM_OPT_TIMEOUT:-$((VM_OPT_SHELL ? 0 : 600))}

    vm_prepare
    local t0 rundir base payload initrd
    t0=$(vm_now)
    rundir=$(mktemp -d "$VM_WORK/run.XXXXXX") || vm_die "cannot create a run directory in $VM_WORK"
    ((VM_OPT_KEEP)) || VM_RUN_DIRS+=("$rundir")

    VM_QEMU_NVME=()
    for i in "${!VM_OPT_NVME[@]}"; do
        vm_add_nvme "$i" "${VM_OPT_NVME[$i]}" "$rundir"
    done

    flock "$VM_LOCK_FD"
    ((VM_OPT_NOIOMMU)) && vm_noiommu_module
    base=$(vm_base_initramfs "$VM_OPT_NOIOMMU" "${VM_OPT_KMODS[@]}") || exit $?
    flock -u "$VM_LOCK_FD"

    # Per-run payload: /init, config, command, setup.sh, binaries, tests.
    local p=$rundir/payload guest host
    mkdir -p "$p/bin" "$p/etc" "$p/tests"
    # /init travels in the payload, not the cached base, so that editing it takes
    # effect without invalidating any cache.  It reads /etc/nvcopy-vm.conf (below).
    install -m 755 "$VM_SCRIPT_DIR/vm/init.sh" "$p/init"
    install -m 755 "$VM_SCRIPT_DIR/setup.sh" "$p/bin/setup.sh"
    while IFS=$'\t' read -r guest host; do
        [[ -n $guest ]] || continue
        [[ -f $host ]] || vm_die "$host (for $guest) is gone; rebuild without NVCOPY_VM_NO_BUILD"
        mkdir -p "$p$(dirname "$guest")"
        # A copy, not a hard link: cpio treats multiply-linked files specially
        # (cargo already hard-links its binaries), which is asking for trouble.
        cp "$host" "$p$guest" || vm_die "cannot copy $host"
    done <"$VM_WORK/artifacts.tsv"
    # Packages before --add, so that an --add file can replace one of theirs.
    if ((${#VM_OPT_DEBS[@]})); then
        vm_deb_payload "$rundir/debs" "$p" "${VM_OPT_DEBS[@]}"
    fi
    local a
    for a in "${VM_OPT_ADD[@]}"; do
        mkdir -p "$p$(dirname "${a##*:}")"
        cp -a "${a%:*}" "$p${a##*:}" || vm_die "--add $a: copy failed"
    done
    {
        echo "VM_NOIOMMU=$VM_OPT_NOIOMMU"
        echo "VM_HUGEMEM=$VM_OPT_HUGEMEM"
        echo "VM_BIND=$VM_OPT_BIND"
        echo "VM_SHELL=$VM_OPT_SHELL"
        echo "VM_KMODS='${VM_OPT_KMODS[*]}'"
        echo "VM_NET_IP='$VM_NET_IP'"
    } >"$p/etc/nvcopy-vm.conf"
    local e
    : >"$p/etc/nvcopy-vm.env"
    for e in "${VM_OPT_ENV[@]}"; do
        printf 'export %s=%s\n' "${e%%=*}" "$(vm_sh_quote "${e#*=}")" >>"$p/etc/nvcopy-vm.env"
    done
    # The command travels as a script with every argument single-quoted, so
    # spaces, quotes and $ reach the guest exactly as given on the host.
    {
        echo '#!/bin/sh'
        printf '%s' 'exec'
        for a in "${VM_CMD[@]}"; do printf ' %s' "$(vm_sh_quote "$a")"; done
        echo
    } >"$p/cmd"
    # Uncompressed and *before* the gzip'd base: the kernel misparses an
    # uncompressed archive that follows a compressed one, and skipping gzip
    # avoids decompressing large test binaries at TCG speed.
    payload=$rundir/payload.cpio
    (cd "$p" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$payload" ||
        vm_die "creating the payload cpio failed"
    initrd=$rundir/initrd.img
    cat "$payload" "$base" >"$initrd"

    local -a qemu=("$VM_QEMU" -M "q35,kernel-irqchip=split" -accel "tcg,thread=multi" -cpu max
        -smp "$VM_OPT_SMP" -m "$VM_OPT_MEM" -no-reboot "${VM_QEMU_NET[@]}" -vga none -display none)
    local append="console=ttyS0 panic=-1 quiet loglevel=3"
    if ((VM_OPT_NOIOMMU == 0)); then
        # Before any other PCI device, so that all of them sit behind it.
        qemu+=(-device "intel-iommu,intremap=on,caching-mode=on")
        append+=" intel_iommu=on"
    fi
    append+=$VM_OPT_APPEND
    qemu+=(-kernel "$VM_KDIR/boot/vmlinuz-$VM_KV" -initrd "$initrd" -append "$append")
    if ((VM_OPT_SHELL)); then
        # Serial and monitor multiplexed on the terminal (Ctrl-A C / Ctrl-A X).
        qemu+=(-serial mon:stdio)
    else
        # Serial only, no monitor: with stdin from /dev/null nothing can be
        # read from or blocked on the caller's stdin (CI has none).
        qemu+=(-monitor none -serial stdio)
    fi
    # ttyS1 -> host file: the guest's status report (see vm_exit in /init).
    qemu+=(-serial "file:$rundir/status" -device "isa-debug-exit,iobase=0xf4,iosize=0x04")
    qemu+=("${VM_QEMU_NVME[@]}" "${VM_OPT_QEMU_ARGS[@]}")

    vm_log "guest prepared in $(vm_since "$t0") s; booting (${#VM_OPT_NVME[@]} NVMe, $( ((VM_OPT_NOIOMMU)) && echo no-IOMMU || echo IOMMU), $( ((timeout)) && echo "timeout ${timeout}s" || echo "no timeout"))"
    printf '%q ' "${qemu[@]}" >"$rundir/qemu.cmdline"

    local rc=0 tboot
    tboot=$(vm_now)
    if ((VM_OPT_SHELL)); then
        timeout --foreground -k 5 "$timeout" "${qemu[@]}" || rc=$?
    else
        timeout --foreground -k 5 "$timeout" "${qemu[@]}" </dev/null || rc=$?
    fi
    local elapsed reported=
    elapsed=$(vm_since "$tboot")
    [[ -f $rundir/status ]] && reported=$(sed -n 's/^NVCOPY-VM-STATUS \([0-9]*\).*/\1/p' "$rundir/status" | tail -n 1)
    ((VM_OPT_KEEP)) && vm_log "run directory kept: $rundir"
    vm_cleanup_runs

    # timeout gives 124, or 137 if QEMU ignored SIGTERM and needed SIGKILL;
    # 137 is odd, so also look at the clock before trusting it as a status.
    if ((rc == 124)) || { ((rc == 137)) && [[ -z $reported ]] && ((timeout > 0)) &&
        awk -v e="$elapsed" -v t="$timeout" 'BEGIN { exit !(e >= t) }'; }; then
        vm_log "VM timed out after ${timeout}s"
        return 124
    fi
    if ((rc % 2 == 1)) && [[ -n $reported ]] && (((rc - 1) / 2 == reported)); then
        vm_log "guest command exited with status $reported (VM ran ${elapsed}s)"
        return "$reported"
    fi
    if ((rc == 0)); then
        vm_log "VM failed: the guest powered off or rebooted without reporting a status (setup failure or kernel panic; see the output above)"
    else
        vm_log "VM failed: QEMU exited with status $rc without a status report from the guest (QEMU error? see the output above; command line in the run directory with --keep)"
    fi
    return "$VM_EXIT_INFRA"
}

