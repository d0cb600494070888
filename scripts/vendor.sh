#!/usr/bin/env bash
# The vendored crates under third_party/ as what they are: a crates.io release plus hearth's
# patches. For each crate below, the release named in Cargo.lock is downloaded from crates.io
# (cached in ~/.cache/hearth/crates, its sha256 checked against the registry index), the files
# hearth leaves out are dropped (tests, benches, examples: see each HEARTH_PATCHES.md), and
# third_party/patches/<crate>/*.patch are applied in order. HEARTH_PATCHES.md is hearth's own.
#
#   scripts/vendor.sh --check   rebuild each crate in a temporary folder and compare it with
#                               third_party/<crate>: exit 1, naming the files, when a vendored
#                               file was changed by hand (the suite runs this)
#   scripts/vendor.sh           rebuild third_party/<crate> from the release and the patches
#   scripts/vendor.sh --diff    write third_party/patches/<crate>/ anew from the tree as it is, one
#                               patch per changed file (after a deliberate change to a vendored
#                               file; describe it in HEARTH_PATCHES.md)
#
# Upgrading a crate: change its version in the workspace Cargo.toml, run `cargo update -p`, then
# `scripts/vendor.sh` and fix the patches that no longer apply.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=write
case "${1:-}" in
  --check) mode=check ;;
  --diff) mode=diff ;;
  "") ;;
  *) echo "usage: scripts/vendor.sh [--check|--diff]" >&2; exit 2 ;;
esac

# crate, then what hearth leaves out of the release
crates=(
  "candle-core|.cargo_vcs_info.json Cargo.lock Cargo.toml.orig benches examples tests"
  "evcxr|Cargo.lock Cargo.toml.orig examples src/bin tests"
  "gemm-common|.cargo_vcs_info.json Cargo.lock"
  "rayon-core|.cargo_vcs_info.json Cargo.lock tests"
)
ours=(HEARTH_PATCHES.md)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/hearth/crates"
mkdir -p "$cache"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The version Cargo.lock holds for a crate with no source (a [patch] path crate).
locked_version() {
  awk -v n="$1" '$0 == "[[package]]" {name=""; ver=""; src=0}
    $1 == "name" {gsub(/"/, "", $3); name=$3}
    $1 == "version" {gsub(/"/, "", $3); ver=$3}
    $1 == "source" {src=1}
    $0 == "" && name == n && !src && ver != "" {print ver; exit}
    END {if (name == n && !src && ver != "") print ver}' Cargo.lock | head -1
}

# The release's .crate file, downloaded once and checked against the index's sha256.
fetch() {
  local name=$1 ver=$2 file="$cache/$1-$2.crate" prefix want
  if [ ! -f "$file" ]; then
    case ${#name} in
      1) prefix=1 ;;
      2) prefix=2 ;;
      3) prefix="3/${name:0:1}" ;;
      *) prefix="${name:0:2}/${name:2:2}" ;;
    esac
    want="$(curl -sSfL --retry 2 "https://index.crates.io/$prefix/$name" | python3 -c "
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    if e['vers'] == sys.argv[1]:
        print(e['cksum'])" "$ver")"
    [ -n "$want" ] || { echo "vendor.sh: $name $ver is not in the crates.io index" >&2; exit 1; }
    curl -sSfL --retry 2 -o "$file.part" "https://static.crates.io/crates/$name/$name-$ver.crate"
    if [ "$(sha256sum "$file.part" | cut -d' ' -f1)" != "$want" ]; then
      rm -f "$file.part"
      echo "vendor.sh: $name-$ver.crate does not match the index's sha256" >&2
      exit 1
    fi
    mv "$file.part" "$file"
  fi
  echo "$file"
}

# The release unpacked into $2, less what hearth leaves out.
pristine() {
  local name=$1 ver=$2 out=$3 drop=$4 d
  mkdir -p "$out"
  tar -xzf "$(fetch "$name" "$ver")" -C "$out" --strip-components=1
  for d in $drop; do rm -rf "${out:?}/$d"; done
}

status=0
for entry in "${crates[@]}"; do
  name="${entry%%|*}"
  drop="${entry#*|}"
  ver="$(locked_version "$name")"
  [ -n "$ver" ] || { echo "vendor.sh: Cargo.lock holds no path crate $name" >&2; exit 1; }
  patches="third_party/patches/$name"
  base="$tmp/$name/a"
  pristine "$name" "$ver" "$base" "$drop"
  if [ "$mode" = diff ]; then
    rm -rf "$patches"
    mkdir -p "$patches"
    mkdir -p "$tmp/$name/b"
    cp -a "third_party/$name/." "$tmp/$name/b/"
    for f in "${ours[@]}"; do rm -f "$tmp/$name/b/$f"; done
    n=0
    while IFS= read -r f; do
      n=$((n + 1))
      (cd "$tmp/$name" && diff -uN --label "a/$f" --label "b/$f" "a/$f" "b/$f" || true) >"$patches/$(printf '%04d' $n)-$(echo "$f" | tr '/.' '--').patch"
    done < <(cd "$tmp/$name" && diff -rq a b | sed -n 's/^Files a\/\(.*\) and b\/.* differ$/\1/p; s/^Only in [ab]\/\{0,1\}\(.*\): \(.*\)$/\1\/\2/p' | sed 's/^\///' | sort)
    echo "$name $ver: $n patch(es) in $patches" >&2
    continue
  fi
  built="$tmp/$name/built"
  cp -a "$base" "$built"
  for p in "$patches"/*.patch; do
    [ -e "$p" ] || continue
    patch -d "$built" -p1 -s -f --no-backup-if-mismatch -r - <"$p" >/dev/null || { echo "vendor.sh: $p does not apply to $name $ver" >&2; exit 1; }
  done
  for f in "${ours[@]}"; do
    [ -e "third_party/$name/$f" ] && cp "third_party/$name/$f" "$built/$f"
  done
  if [ "$mode" = check ]; then
    if differ="$(diff -rq "$built" "third_party/$name" 2>&1)"; then
      echo "vendor.sh: third_party/$name is $name $ver with its patches" >&2
    else
      echo "vendor.sh: third_party/$name differs from $name $ver with third_party/patches/$name applied:" >&2
      sed "s#$built#(release + patches)#g" <<<"$differ" >&2
      echo "  (a deliberate change: scripts/vendor.sh --diff, and say why in HEARTH_PATCHES.md)" >&2
      status=1
    fi
  else
    rm -rf "third_party/$name"
    cp -a "$built" "third_party/$name"
    echo "vendor.sh: third_party/$name rebuilt from $name $ver and its patches" >&2
  fi
done
exit $status
