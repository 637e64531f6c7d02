//! PCI INTx end to end on /dev/kvm: the in-tree guest leaves MSI-X off, routes each virtio function's INTA# to the
//! GSI the DSDT's `_PRT` gives its slot (`(slot + pin) % 8 + 16`, level triggered) and takes its interrupts there,
//! reading the ISR in the handler. Nine devices fill slots 1-9, so every INTx GSI is used and slots 1 and 9 share
//! GSI 17.

mod common;

use common::*;

/// What one `intx:` line says.
#[derive(Debug)]
struct Intx {
    slot: u8,
    gsi: u32,
    irqs: u32,
    isr: u32,
    unclaimed: u32,
}

/// Parses `slot=<s> gsi=<g> vector=0x60 irqs=<n> isr=0x<bits> unclaimed=<n>`.
fn parse_intx(line: &str) -> Intx {
    let field = |name: &str| -> &str {
        line.split(' ')
            .find_map(|f| f.strip_prefix(name).and_then(|f| f.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {name}= in '{line}'"))
    };
    assert_eq!(field("vector"), "0x60", "{line}");
    Intx {
        slot: field("slot").parse().unwrap(),
        gsi: field("gsi").parse().unwrap(),
        irqs: field("irqs").parse().unwrap(),
        isr: u32::from_str_radix(field("isr").trim_start_matches("0x"), 16).unwrap(),
        unclaimed: field("unclaimed").parse().unwrap(),
    }
}

#[test]
fn virtio_devices_interrupt_through_intx_on_shared_gsis() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("intx");
    // Disks take slots 1-8 in order, the entropy device slot 9.
    let mut specs = Vec::new();
    for i in 0..8 {
        let path = dir.join(format!("d{i}.raw"));
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        specs.push(format!("path={}", path.display()));
    }
    let kernel = guest("report.bzImage");
    let mut args = vec![
        "--kernel",
        kernel.as_str(),
        "--cmdline",
        "action=intx,virtio-blk,virtio-rng",
        "--rng",
    ];
    for spec in &specs {
        args.extend(["--disk", spec.as_str()]);
    }
    let run = run_atrium(&args, GUEST_LIMIT);
    assert_eq!(run.code(), 0, "{run:?}");

    // Every device ran its requests with MSI-X off and interrupts counted on the INTx vector.
    assert_eq!(
        run.lines("virtio: ")
            .iter()
            .filter(|l| l.ends_with(" msix=intx"))
            .count(),
        9,
        "{}",
        run.serial
    );
    for dev in 0..8 {
        let rw = run.line(&format!("blk: {dev} write="));
        assert!(rw.starts_with("0 read=0 verify=ok irq="), "{rw}");
        assert_ne!(rw, "0 read=0 verify=ok irq=0", "no INTx interrupt arrived");
        assert_eq!(run.line(&format!("blk: {dev} flush=")), "0");
    }
    let rng = run.line("rng: bytes=");
    assert!(rng.starts_with("64 ") && !rng.ends_with(" irq=0"), "{rng}");

    let blk: Vec<Intx> = (0..8)
        .map(|dev| parse_intx(&run.line(&format!("intx: blk {dev} "))))
        .collect();
    let rng = parse_intx(&run.line("intx: rng 0 "));
    for (i, intx) in blk.iter().chain([&rng]).enumerate() {
        let slot = i as u8 + 1;
        assert_eq!(intx.slot, slot, "{intx:?}");
        // INTA# of slot s raises GSI (s + 0) % 8 + 16: slots 1-8 cover GSIs 17-23 and 16.
        assert_eq!(intx.gsi, u32::from(slot) % 8 + 16, "{intx:?}");
        assert!(intx.irqs >= 1, "{intx:?}");
        // The handler found the queue bit in the ISR, and the line was released by the ISR read, so the EOI did
        // not deliver it again (that would be a storm of unclaimed interrupts). One unclaimed interrupt is allowed:
        // every INTx GSI uses one vector in this guest, and an interrupt the previous device raised just as the
        // guest moved on (it polls the used ring too) can still be pending in the local APIC when this device's
        // handler takes over.
        assert_eq!(intx.isr, 1, "{intx:?}");
        assert!(intx.unclaimed <= 1, "{intx:?}");
    }
    // The first disk and the entropy device share GSI 17 and both got their interrupts through it.
    assert_eq!(blk[0].gsi, 17);
    assert_eq!(rng.gsi, 17);
}
