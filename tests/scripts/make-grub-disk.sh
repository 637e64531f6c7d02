#!/usr/bin/env bash
# Builds a small BIOS-bootable raw disk image with Debian's GRUB for firmware boot tests:
#   tests/scripts/make-grub-disk.sh OUT.img
#
# GRUB talks on COM1 at 115200 and shows a menu with the entries "Atrium GRUB test" and "Atrium GRUB test:
# reboot" for 30 seconds (then it runs the first). The first entry prints "atrium-grub: entry selected" and asks
# GRUB to halt the machine; the second resets it.
#
# Layout (no loop devices, mounts or root needed):
#   sector 0        GRUB's MBR boot code (boot.img) with a partition table of one entry
#   sectors 1..     GRUB's core image (grub-mkimage): kernel, BIOS disk, MBR partitions and tar support
#   from 1 MiB on   partition 1: a plain tar archive with boot/grub/grub.cfg and the modules normal mode needs
# boot.img loads sector 1 and the core image's first sector loads the rest from sector 2 on by default, so
# neither needs patching. The modules sit uncompressed in the tar rather than compressed in the core image: in a
# KVM that emulates guest code, decompressing them took about three times as long as reading them.
#
# Needs: grub-mkimage (apt-get install grub-common) and the i386-pc files (apt-get install grub-pc-bin).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUT.img" >&2
  exit 2
fi
out=$1
lib=/usr/lib/grub/i386-pc
if ! command -v grub-mkimage >/dev/null || [ ! -f "$lib/boot.img" ] || [ ! -f "$lib/moddep.lst" ]; then
  echo "make-grub-disk: needs grub-mkimage and GRUB's i386-pc files: apt-get install grub-common grub-pc-bin" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
grub="$work/tree/boot/grub"
mkdir -p "$grub/i386-pc"
cat >"$grub/grub.cfg" <<'EOF'
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=30
set default=0
menuentry "Atrium GRUB test" {
  echo "atrium-grub: entry selected"
  halt
}
menuentry "Atrium GRUB test: reboot" {
  reboot
}
EOF

# The modules grub.cfg uses and normal mode, with everything they depend on (moddep.lst: "module: deps...").
# GRUB loads them from the tar on demand (command.lst says which module has which command).
modules=""
add_module() {
  local m
  for m in "$@"; do
    case " $modules " in *" $m "*) continue ;; esac
    modules="$modules $m"
    # shellcheck disable=SC2046 # the dependency list is split into words on purpose
    add_module $(awk -F': *' -v m="$m" '$1 == m { print $2 }' "$lib/moddep.lst")
  done
}
add_module normal serial terminal echo halt reboot
for m in $modules; do
  cp "$lib/$m.mod" "$grub/i386-pc/"
done
cp "$lib"/*.lst "$grub/i386-pc/"
tar -C "$work/tree" --format=ustar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
  -cf "$work/part.tar" boot

grub-mkimage -O i386-pc -d "$lib" -o "$work/core.img" -p '(hd0,msdos1)/boot/grub' biosdisk part_msdos tar

start=2048 # partition 1 starts at 1 MiB
core=$(stat -c %s "$work/core.img")
if [ $((512 + core)) -gt $((start * 512)) ]; then
  echo "make-grub-disk: the core image ($core bytes) does not fit before the partition" >&2
  exit 1
fi
sectors=$(($(stat -c %s "$work/part.tar") / 512)) # tar archives are whole 512-byte blocks

# Little-endian 32-bit value as printf escapes.
le32() {
  printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255))
}

rm -f "$out"
# boot.img's first 440 bytes are code (its tail holds code for floppies, which the partition table replaces).
dd if="$lib/boot.img" of="$out" bs=440 count=1 status=none
# Disk signature and reserved word, then entry 1: active, CHS fields "beyond 8 GiB" (LBA only), type 0xda
# (non-filesystem data), first sector, sector count; entries 2-4 empty; boot signature.
{
  printf '\0\0\0\0\0\0'
  printf "\\x80\\xfe\\xff\\xff\\xda\\xfe\\xff\\xff$(le32 $start)$(le32 "$sectors")"
  head -c 48 /dev/zero
  printf '\x55\xaa'
} >>"$out"
dd if="$work/core.img" of="$out" bs=512 seek=1 conv=notrunc status=none
dd if="$work/part.tar" of="$out" bs=512 seek=$start conv=notrunc status=none
size=$(stat -c %s "$out")
echo "make-grub-disk: $out ($size bytes: core image $core bytes, partition $((sectors * 512)) bytes)"
