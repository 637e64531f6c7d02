//! The `atrium` command line: bad options end with one `atrium: ...` line on stderr and the documented exit code,
//! before KVM is opened, so none of these tests needs /dev/kvm.

mod common;

use common::*;

/// Runs atrium with `args`, expecting a failure before the guest runs.
fn fails(args: &[&str]) -> Run {
    run_atrium(args, GUEST_LIMIT)
}

/// Asserts exit code `code` and that stderr is exactly the line `atrium: {message}`.
fn assert_error(run: &Run, code: i32, message: &str) {
    assert_eq!(run.code(), code, "{run:?}");
    assert_eq!(run.stderr, format!("atrium: {message}\n"), "{run:?}");
    assert!(run.serial.is_empty(), "{run:?}");
}

#[test]
fn unknown_cpus_key() {
    let run = fails(&["--cpus", "bot=2"]);
    assert_error(&run, 1, "--cpus: unknown key 'bot' (valid keys: boot, max)");
}

#[test]
fn zero_boot_vcpus() {
    let run = fails(&["--cpus", "boot=0"]);
    assert_error(
        &run,
        1,
        "--cpus boot=0: the VM needs at least one vCPU; use boot=1 or more",
    );
}

#[test]
fn boot_above_max() {
    let run = fails(&["--cpus", "boot=4,max=2"]);
    assert_error(
        &run,
        1,
        "--cpus: boot=4 is more than max=2; raise max or lower boot",
    );
}

#[test]
fn zero_memory() {
    let run = fails(&["--memory", "size=0"]);
    assert_error(&run, 1, "--memory size=0: the guest needs at least 16 MiB");
}

#[test]
fn memory_not_a_size() {
    let run = fails(&["--memory", "size=abc"]);
    assert_error(
        &run,
        1,
        "--memory size=abc: 'abc' is not a size; use bytes or a number with K, M, G or T (e.g. 512M)",
    );
}

#[test]
fn memory_beyond_host() {
    // 1 TiB is more than any machine these tests run on.
    let run = fails(&["--memory", "size=1T"]);
    assert_eq!(run.code(), 1, "{run:?}");
    let line = run
        .stderr
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{run:?}"));
    assert!(!line.contains('\n'), "{run:?}");
    assert!(
        line.starts_with("atrium: --memory size=1T: this host has only "),
        "{line}"
    );
    assert!(
        line.ends_with(" GiB of physical memory; choose a smaller size"),
        "{line}"
    );
}

#[test]
fn missing_kernel() {
    let dir = scratch_dir("cli-missing-kernel");
    let kernel = dir.join("no-such-bzImage");
    let kernel = kernel.to_str().unwrap();
    let run = fails(&["--kernel", kernel]);
    assert_error(
        &run,
        1,
        &format!("--kernel {kernel}: cannot read it: No such file or directory (os error 2)"),
    );
}

#[test]
fn kernel_is_a_directory() {
    let dir = scratch_dir("cli-kernel-dir");
    let dir = dir.to_str().unwrap();
    let run = fails(&["--kernel", dir]);
    assert_error(
        &run,
        1,
        &format!(
            "--kernel {dir}: is a directory, not a regular file; give the path of the image file"
        ),
    );
}

#[test]
fn missing_initramfs() {
    let dir = scratch_dir("cli-missing-initramfs");
    let kernel = dir.join("bzImage");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let initramfs = dir.join("no-such-initrd");
    let initramfs = initramfs.to_str().unwrap();
    let run = fails(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        initramfs,
    ]);
    assert_error(
        &run,
        1,
        &format!("--initramfs {initramfs}: cannot read it: No such file or directory (os error 2)"),
    );
}

#[test]
fn unknown_serial_mode() {
    let run = fails(&["--serial", "pty"]);
    assert_error(
        &run,
        1,
        "--serial: unknown mode 'pty' (valid: tty, file=PATH, socket=PATH, null, off)",
    );
}

#[test]
fn unknown_option_is_a_syntax_error() {
    let run = fails(&["--no-such-option"]);
    assert_error(
        &run,
        2,
        "unexpected argument '--no-such-option' found (see 'atrium --help')",
    );
}

#[test]
fn bad_triple_fault_action_is_a_syntax_error() {
    let run = fails(&["--triple-fault", "ignore"]);
    assert_error(
        &run,
        2,
        "invalid value 'ignore' for '--triple-fault <ACTION>' (possible values: crash, reboot)",
    );
}

#[test]
fn version() {
    let run = fails(&["--version"]);
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(
        run.serial,
        format!("atrium {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert!(run.stderr.is_empty(), "{run:?}");
}

#[test]
fn help_documents_options_defaults_and_exit_codes() {
    let run = fails(&["--help"]);
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(run.stderr.is_empty(), "{run:?}");
    let help = &run.serial;
    for option in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--debug-exit",
        "--no-reboot",
        "--triple-fault",
        "--verbose",
        "--version",
    ] {
        assert!(
            help.contains(option),
            "--help does not mention {option}:\n{help}"
        );
    }
    assert!(help.contains("console=ttyS0 reboot=k panic=1"), "{help}");
    assert!(help.contains("Exit codes:"), "{help}");
    for code in [
        "0    the guest powered off",
        "1    invalid configuration",
        "2    command-line syntax error",
        "3    the guest triple-faulted",
        "4    the guest crashed",
        "5    the VMM failed",
    ] {
        assert!(
            help.contains(code),
            "--help does not document '{code}':\n{help}"
        );
    }
}
