#!/usr/bin/env bash
# Installs everything the build, demo and tests need, idempotently and without asking:
# Debian packages, nightly rust-src, and bpf-linker built against the nightly's own LLVM.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

# --- Debian packages the tests and demo use -------------------------------------------------
# zsh and fish: tests/observe.rs checks that `lb completions zsh|fish` parses in them.
PKGS=(iproute2 ethtool bpftool nftables curl wrk iperf3 tcpdump procps psmisc python3 zsh fish)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Rust: nightly with rust-src for the eBPF crate, clippy and rustfmt for the checks -------
for component in rust-src clippy; do
  if ! rustup +nightly component list --installed 2>/dev/null | grep -q "^$component"; then
    log "adding $component to the nightly toolchain"
    rustup component add "$component" --toolchain nightly
  fi
done
for component in clippy rustfmt; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    log "adding $component to the default toolchain"
    rustup component add "$component"
  fi
done

# --- bpf-linker 0.13.0 against the nightly's LLVM ---------------------------------------------
# The nightly ships libLLVM as a shared library; bpf-linker links against it through a folder
# whose lib/ holds the two names the build and the loader look for. The folder stays outside
# the repo because the installed linker finds its LLVM through it at run time.
BPF_LINKER_VERSION=0.13.0
nightly_lib="$(rustc +nightly --print sysroot)/lib"
llvm_so="$(find "$nightly_lib" -maxdepth 1 -name 'libLLVM.so.*-nightly' | head -n1)"
[ -n "$llvm_so" ] || { log "no libLLVM.so.* in $nightly_lib"; exit 1; }
llvm_major="$(basename "$llvm_so" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')"
LLVM_DIR="${LB_LLVM_DIR:-$HOME/.local/lib/lb-bpf-llvm}"
mkdir -p "$LLVM_DIR/lib"
ln -sfn "$llvm_so" "$LLVM_DIR/lib/libLLVM.so"
ln -sfn "$llvm_so" "$LLVM_DIR/lib/$(basename "$llvm_so")"

if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM $llvm_major (a few minutes)"
  LLVM_PREFIX="$LLVM_DIR" cargo install --locked bpf-linker --version "$BPF_LINKER_VERSION" \
    --no-default-features --features "llvm-$llvm_major" --force
fi

# --- bpffs: pinned maps live there -----------------------------------------------------------
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mount -t bpf bpf /sys/fs/bpf 2>/dev/null || log "warning: could not mount bpffs on /sys/fs/bpf"
fi

log "ready"
