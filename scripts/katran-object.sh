#!/usr/bin/env bash
# Builds Katran's XDP balancer (katran/lib/bpf/balancer.bpf.c) into a BPF object, so that
# `cargo xtask bench --katran OBJECT` measures it beside ours in the same run.
#
#   scripts/katran-object.sh KATRAN [OUT]
#
# KATRAN: a Katran checkout (the directory holding katran/lib/bpf), or a bare git repository of
# Katran, whose HEAD is built. OUT: where the object goes (default target/katran/balancer.bpf.o);
# OUT.info beside it records the commit, the compiler and the flags. Nothing of Katran is copied
# into this repository. Prints OUT's path.
set -euo pipefail

log() { printf 'katran-object: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 KATRAN_CHECKOUT [OUT]"
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$1"
out="${2:-$root/target/katran/balancer.bpf.o}"

# Katran's own build compiles with clang for the host and emits BPF with llc
# (katran/lib/Makefile-bpf); both come with Debian's clang and llvm packages.
if ! command -v clang >/dev/null || ! command -v llc >/dev/null; then
  log "installing clang and llvm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends clang llvm >/dev/null
fi

tmp=""
trap '[ -z "$tmp" ] || rm -rf "$tmp"' EXIT
if [ -f "$src/katran/lib/bpf/balancer.bpf.c" ]; then
  commit=unknown
  if [ -e "$src/.git" ]; then
    commit="$(git -C "$src" rev-parse HEAD)"
    if [ -n "$(git -C "$src" status --porcelain -- katran/lib)" ]; then
      commit="$commit with local changes"
    fi
  fi
elif git --git-dir="$src" rev-parse -q --verify HEAD >/dev/null 2>&1; then
  commit="$(git --git-dir="$src" rev-parse HEAD)"
  tmp="$(mktemp -d)"
  git --git-dir="$src" archive HEAD katran/lib | tar -x -C "$tmp"
  src="$tmp"
else
  die "$src is neither a Katran checkout (no katran/lib/bpf/balancer.bpf.c) nor a git repository"
fi

# Katran's flags (Makefile-bpf). -DDEBUG is one of them; nothing in katran/lib reads it (the
# object is the same without it). Its headers are included as "katran/lib/...", hence -I$src.
cflags=(-O2 -g -emit-llvm -D__KERNEL__ -DDEBUG
  -Wno-unused-value -Wno-pointer-sign -Wno-compare-distinct-pointer-types)
includes=(-I"$src" -I"$src/katran/lib/linux_includes")
mkdir -p "$(dirname "$out")"
clang "${includes[@]}" "${cflags[@]}" -c "$src/katran/lib/bpf/balancer.bpf.c" -o - |
  llc -march=bpf -filetype=obj -o "$out.tmp"
mv "$out.tmp" "$out"

cat >"$out.info" <<EOF
Katran commit $commit
$(clang --version | head -n1), llc $(llc --version | sed -n 's/.*LLVM version //p' | head -n1)
clang -I<katran> -I<katran>/katran/lib/linux_includes ${cflags[*]} -c katran/lib/bpf/balancer.bpf.c -o - | llc -march=bpf -filetype=obj
EOF
log "built from Katran $commit"
echo "$out"
