#!/usr/bin/env bash
# Fetches Debian's cloud kernel (not committed) for the real-kernel boot test and extracts its bzImage to
# target/test-assets/vmlinuz. Idempotent: does nothing when the file exists.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
dest="$top/target/test-assets"
[ -s "$dest/vmlinuz" ] && exit 0
mkdir -p "$dest"
work=$(mktemp -d)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  echo "fetch-kernel: cannot resolve linux-image-cloud-amd64 (run apt-get update first)" >&2
  exit 1
fi
(cd "$work" && apt-get download -q "$pkg" >/dev/null)
dpkg-deb -x "$work"/*.deb "$work/root"
cp "$work"/root/boot/vmlinuz-* "$dest/vmlinuz"
echo "fetch-kernel: $pkg -> $dest/vmlinuz"
