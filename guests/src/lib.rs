//! In-tree test and demo guests for Atrium, assembled from `guests/asm` by `build.rs`.
//!
//! Every guest is linked at 1 MiB and built from one shared 64-bit core with a small per-format entry:
//!
//! - [`DEMO`] (bzImage) prints `Hello from the Atrium demo guest: <N> vCPU(s), <M> MiB of RAM. Powering off.`
//!   and powers off through ACPI.
//! - [`REPORT_BZIMAGE`], [`REPORT_ELF`] and [`REPORT_PVH`] print the boot facts they were given, one per line
//!   (`atrium-guest: format=...`, `cmdline: ...`, `initrd: ...`, `e820: ...`, `bootparams: ...` or `pvh: ...`,
//!   `acpi: ...`, `mptable: ...`, `rtc: ...`, `smp: ...`), then perform the command line's `action=`
//!   (`poweroff`, `reset-acpi`, `reset-i8042`, `triple-fault`, `emulation-failure`, `debug-exit=<n>`, `halt`,
//!   `echo`). `guests/asm/report.inc` and `guests/asm/actions.inc` define the exact grammar.
//! - The report guests also drive PCI devices: the device actions `pci-scan`, `virtio-blk`, `virtio-rng`,
//!   `virtio-console`, `virtio-net` and `virtio-bad=<kind>` (malformed virtio-blk requests) enumerate bus 0 and
//!   run modern virtio-pci devices with split virtqueues and MSI-X. They compose: `action=pci-scan,virtio-blk,
//!   debug-exit=0` runs them in order and ends with the last item (power off after a device action). Their lines
//!   (`pci: ...`, `virtio: ...`, `blk: ...`, `bad: ...`, `rng: ...`, `console: ...`, `net: ...`) are defined at
//!   the top of `guests/asm/pci.inc`, `virtio.inc` and `virtio_*.inc`; `tests/qemu_virtio.rs` runs them against
//!   QEMU's devices. `vsock-connect=<port>` and `vsock-listen=<port>` drive a virtio-vsock device (connect to the
//!   host's port and print its reply line, or accept a connection and echo a line back); their `vsock: ...` lines
//!   are defined at the top of `guests/asm/virtio_vsock.inc`. An `intx` item makes the virtio actions after it
//!   leave MSI-X off and take INTx through the IOAPIC pin Atrium's `_PRT` gives the slot (an `intx: ...` line
//!   per device, defined in `guests/asm/virtio.inc`). An `event-idx` item makes them negotiate
//!   VIRTIO_RING_F_EVENT_IDX: `used_event` asks for an interrupt once the last buffer submitted is used, a notify
//!   is written only when `avail_event` asks for it, an `event-idx: ...` line per device counts notifies written
//!   and left out and interrupts, and `virtio-blk` adds a burst of reads under one notify (`blk: <dev> burst=...`).
//! - `hotplug` routes the GED's IOAPIC pin, prints `hotplug: ready` and then handles GED interrupts by speaking
//!   the CPU, PCI and memory hotplug controllers' registers directly (the guests run no AML): `ged: ...`,
//!   `cpuhp: ...`, `pcihp: ...` (with the usual `virtio:` / `blk:` lines for a hot-added virtio-blk device),
//!   `memhp: ...`, and ACPI power-off for the power button; `hotplug-max=<n>` ends it after n interrupts. `tick`
//!   (or `tick=<ms>`) prints `tick: <n>` every 50 ms (or <ms>) until the VM stops, to show whether guest time
//!   runs. The grammars are at the top of `guests/asm/hotplug*.inc` and `tick.inc`.
//! - `virtio-mem` (or `virtio-mem=<changes>`) drives a virtio-mem device: it plugs or unplugs blocks whenever the
//!   requested size changes, checks that fresh blocks read zero and keep a pattern, and prints `virtio-mem: plugged=<N>
//!   MiB requested=<N> MiB ok` after each change (grammar at the top of `guests/asm/virtio_mem.inc`).
//!
//! [`BootDisk`] is different: raw disk images for firmware boot, whose 16-bit boot sector prints
//! `atrium-boot: ...` lines through the BIOS, reads its second sector through INT 13h and powers off through
//! ACPI ([`BootDisk::path`], [`BootDisk::boot_lines`]).

mod bootdisk;

pub use bootdisk::{BootDisk, BOOT_DONE_LINE};

use std::path::PathBuf;

/// File name of the demo guest in the build directory (see [`path`]).
pub const DEMO_FILE: &str = "demo.bzImage";
/// File name of the report guest as a bzImage.
pub const REPORT_BZIMAGE_FILE: &str = "report.bzImage";
/// File name of the report guest as a 64-bit ELF vmlinux.
pub const REPORT_ELF_FILE: &str = "report.elf";
/// File name of the report guest as a PVH ELF.
pub const REPORT_PVH_FILE: &str = "report.pvh";

/// The built-in demo guest, bzImage format.
pub const DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.bzImage"));
/// The report guest, bzImage format (Linux boot protocol, 64-bit entry at load address + 0x200).
pub const REPORT_BZIMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/report.bzImage"));
/// The report guest, 64-bit ELF vmlinux format (entered at `e_entry` in long mode).
pub const REPORT_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/report.elf"));
/// The report guest, PVH format (ELF with a Xen `PHYS32_ENTRY` note; entered in 32-bit protected mode).
pub const REPORT_PVH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/report.pvh"));

/// Absolute path of a built guest file, for passing `--kernel <path>` to the VMM in integration tests.
///
/// `name` is one of [`DEMO_FILE`], [`REPORT_BZIMAGE_FILE`], [`REPORT_ELF_FILE`] or [`REPORT_PVH_FILE`]; any
/// other name yields a path that does not exist.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join(name)
}

#[cfg(test)]
mod tests;
