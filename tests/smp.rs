//! SMP: the guest starts every AP with INIT/SIPI through the in-kernel LAPIC, and each one reports in.

mod common;

use common::*;

fn smp(cpus: u32) {
    if !kvm_available() {
        return;
    }
    let kernel = guest("report.bzImage");
    let boot = format!("boot={cpus}");
    let run = run_atrium(&["--kernel", &kernel, "--cpus", &boot], GUEST_LIMIT);
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(
        smp_summary(&run).split_whitespace().next(),
        Some(format!("{cpus}/{cpus}").as_str()),
        "{}",
        run.serial
    );
    let mut aps: Vec<u32> = run
        .lines("smp: cpu ")
        .iter()
        .map(|l| l.trim_end_matches(" up").parse().unwrap())
        .collect();
    aps.sort();
    let expected: Vec<u32> = (1..cpus).collect();
    assert_eq!(aps, expected, "{}", run.serial);
    assert!(run.line("acpi: rsdp=").ends_with(&format!("cpus={cpus}")));
    assert_eq!(run.line("mptable: cpus="), cpus.to_string());
}

#[test]
fn one_vcpu() {
    smp(1);
}

#[test]
fn two_vcpus() {
    smp(2);
}

#[test]
fn four_vcpus() {
    smp(4);
}

#[test]
fn eight_vcpus() {
    smp(8);
}

#[test]
fn hotpluggable_cpus_are_listed_but_not_enabled() {
    if !kvm_available() {
        return;
    }
    let kernel = guest("report.elf");
    let run = run_atrium(
        &["--kernel", &kernel, "--cpus", "boot=2,max=4"],
        GUEST_LIMIT,
    );
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(
        run.line("acpi: rsdp=").ends_with("cpus=2"),
        "{}",
        run.serial
    );
    assert_eq!(smp_summary(&run), "2/2 cpus up");
}
