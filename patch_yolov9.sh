#!/usr/bin/env bash
# Copy this project's QAT layer into an upstream WongKinYiu/yolov9 checkout.
#
# The copied scripts run on upstream's own models and utils, so the files listed in
# patch_manifest.txt are only ones upstream does not have; an upstream module is never replaced.
# A target file that differs from ours (a local edit, or an older patch) is left alone unless
# --force is given, and nothing is written at all while any such file blocks the run.
set -euo pipefail

usage="usage: patch_yolov9.sh <upstream_yolov9_dir> [--force] [--dry-run]"
src="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
manifest="$src/patch_manifest.txt"
# Packages the QAT layer imports that upstream's requirements.txt does not name; their pins are
# read from our requirements.txt so the hint cannot drift from it.
qat_packages=(nvidia-modelopt huggingface_hub onnx onnxruntime onnxslim onnxsim)

die() {
  echo "error: $*" >&2
  exit 2
}

force=0
dry_run=0
target=""
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help)
      echo "$usage"
      exit 0
      ;;
    -*) die "unknown option $arg ($usage)" ;;
    *)
      [ -z "$target" ] || die "more than one target directory given ($usage)"
      target="$arg"
      ;;
  esac
done
[ -n "$target" ] || die "no target directory given ($usage)"
[ -d "$target" ] || die "$target: no such directory"
target="$(cd "$target" && pwd)"
[ "$target" != "$src" ] || die "$target: this is the yolov9-qat project itself; give an upstream WongKinYiu/yolov9 checkout"
for marker in models/yolo.py models/detect/yolov9-c.yaml train_dual.py; do
  [ -f "$target/$marker" ] || die "$target: not an upstream WongKinYiu/yolov9 checkout (no $marker)"
done
grep -q '^class DualDDetect' "$target/models/yolo.py" ||
  die "$target: not an upstream WongKinYiu/yolov9 checkout (models/yolo.py defines no DualDDetect)"

files=()
while IFS= read -r line || [ -n "$line" ]; do
  line="${line%%#*}"
  line="${line//[[:space:]]/}"
  [ -n "$line" ] || continue
  files+=("$line")
done <"$manifest"

# Decide every action before writing anything, so a refusal leaves the target untouched.
actions=()
blocked=0
for f in "${files[@]}"; do
  [ -f "$src/$f" ] || { echo "error: patch_manifest.txt lists $f but $src/$f is missing" >&2; exit 1; }
  if [ ! -e "$target/$f" ]; then
    actions+=(copy)
  elif cmp -s "$src/$f" "$target/$f"; then
    actions+=(unchanged)
  elif [ "$force" -eq 1 ]; then
    actions+=(overwrite)
  else
    echo "error: $target/$f exists and differs from the QAT layer's copy; rerun with --force to overwrite it" >&2
    blocked=1
  fi
done
[ "$blocked" -eq 0 ] || exit 2

declare -A counts=([copy]=0 [overwrite]=0 [unchanged]=0)
for i in "${!files[@]}"; do
  f="${files[$i]}"
  action="${actions[$i]}"
  counts[$action]=$((counts[$action] + 1))
  if [ "$dry_run" -eq 1 ]; then
    [ "$action" = unchanged ] && echo "unchanged     $f" || echo "would $action $f"
    continue
  fi
  echo "$(printf '%-13s' "$action") $f"
  [ "$action" != unchanged ] || continue
  mkdir -p "$(dirname "$target/$f")"
  # Copy beside the destination and rename, so an interrupted run never leaves half a file.
  cp -p "$src/$f" "$target/$f.patch-tmp"
  mv -f "$target/$f.patch-tmp" "$target/$f"
done

if [ "$dry_run" -eq 1 ]; then
  echo "dry run: would copy ${counts[copy]}, overwrite ${counts[overwrite]}; ${counts[unchanged]} unchanged; nothing written to $target"
else
  echo "patched $target: ${counts[copy]} copied, ${counts[overwrite]} overwritten, ${counts[unchanged]} unchanged"
fi

pins=()
for pkg in "${qat_packages[@]}"; do
  pin="$(grep -iE "^${pkg}([<>=!~ ]|$)" "$src/requirements.txt" | head -n1 | tr -d ' ')" || true
  pins+=("\"${pin:-$pkg}\"")
done
echo "hint: the QAT layer also needs packages upstream's requirements.txt lacks: pip install ${pins[*]}"
