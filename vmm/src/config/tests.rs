use super::*;

fn err<T: fmt::Debug>(r: Result<T, ConfigError>) -> String {
    r.unwrap_err().to_string()
}

/// A scratch directory for this test, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("atrium-config-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn cpus_parse() {
    let c = CpusConfig::parse("boot=2").unwrap();
    assert_eq!((c.boot_vcpus, c.max_vcpus), (2, 2));
    let c = CpusConfig::parse("boot=2,max=4").unwrap();
    assert_eq!((c.boot_vcpus, c.max_vcpus), (2, 4));
    let c = CpusConfig::parse("max=4,boot=3").unwrap();
    assert_eq!((c.boot_vcpus, c.max_vcpus), (3, 4));
    let c = CpusConfig::parse("max=8").unwrap();
    assert_eq!((c.boot_vcpus, c.max_vcpus), (1, 8));
    let c = CpusConfig::parse("boot=255").unwrap();
    assert_eq!((c.boot_vcpus, c.max_vcpus), (255, 255));
}

#[test]
fn cpus_errors() {
    assert_eq!(
        err(CpusConfig::parse("bot=2")),
        "--cpus: unknown key 'bot' (valid keys: boot, max)"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=0")),
        "--cpus boot=0: the VM needs at least one vCPU; use boot=1 or more"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=4,max=2")),
        "--cpus: boot=4 is more than max=2; raise max or lower boot"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=256")),
        "--cpus: 256 vCPUs requested but at most 255 are supported (xAPIC IDs); lower boot/max"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=1,max=300")),
        "--cpus: 300 vCPUs requested but at most 255 are supported (xAPIC IDs); lower boot/max"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=two")),
        "--cpus boot=two: 'two' is not a whole number; use decimal digits"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=-1")),
        "--cpus boot=-1: '-1' is not a whole number; use decimal digits"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=+1")),
        "--cpus boot=+1: '+1' is not a whole number; use decimal digits"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=4294967296")),
        "--cpus boot=4294967296: the number is too large (at most 4294967295)"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=99999999999999999999999")),
        "--cpus boot=99999999999999999999999: the number is too large (at most 4294967295)"
    );
}

#[test]
fn option_string_syntax_errors() {
    assert_eq!(
        err(CpusConfig::parse("2")),
        "--cpus: '2' is not key=value (valid keys: boot, max)"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=1,boot=2")),
        "--cpus: key 'boot' is given more than once; give it once"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=")),
        "--cpus: key 'boot' has an empty value; write boot=VALUE"
    );
    assert_eq!(
        err(CpusConfig::parse("")),
        "--cpus: empty entry in ''; give comma-separated key=value pairs (valid keys: boot, max)"
    );
    assert_eq!(
        err(CpusConfig::parse("boot=1,")),
        "--cpus: empty entry in 'boot=1,'; give comma-separated key=value pairs (valid keys: boot, max)"
    );
    assert_eq!(
        err(CpusConfig::parse("=1")),
        "--cpus: unknown key '' (valid keys: boot, max)"
    );
    assert_eq!(
        err(MemoryConfig::parse("sise=1G")),
        "--memory: unknown key 'sise' (valid keys: size, hotplug_method, hotplug_size)"
    );
}

#[test]
fn memory_sizes() {
    let size = |s: &str| MemoryConfig::parse(&format!("size={s}")).unwrap().size;
    assert_eq!(size("512M"), 512 << 20);
    assert_eq!(size("512m"), 512 << 20);
    assert_eq!(size("512MiB"), 512 << 20);
    assert_eq!(size("16384K"), 16 << 20);
    assert_eq!(size("16384kib"), 16 << 20);
    assert_eq!(size("2G"), 2 << 30);
    assert_eq!(size("1T"), 1 << 40);
    assert_eq!(size("16777216"), 16 << 20);
    assert_eq!(size("3584M"), 3584 << 20);
}

#[test]
fn memory_errors() {
    let parse = |s: &str| err(MemoryConfig::parse(&format!("size={s}")));
    assert_eq!(
        parse("0"),
        "--memory size=0: the guest needs at least 16 MiB"
    );
    assert_eq!(
        parse("8M"),
        "--memory size=8M: the guest needs at least 16 MiB"
    );
    assert_eq!(
        parse("16383K"),
        "--memory size=16383K: the guest needs at least 16 MiB"
    );
    assert_eq!(
        parse("16777217"),
        "--memory size=16777217: not a multiple of 4 KiB; use whole pages (e.g. 512M)"
    );
    assert_eq!(
        parse("abc"),
        "--memory size=abc: 'abc' is not a size; use bytes or a number with K, M, G or T (e.g. 512M)"
    );
    assert_eq!(
        parse("512MB"),
        "--memory size=512MB: '512MB' is not a size; use bytes or a number with K, M, G or T (e.g. 512M)"
    );
    assert_eq!(
        parse("M"),
        "--memory size=M: 'M' is not a size; use bytes or a number with K, M, G or T (e.g. 512M)"
    );
    assert_eq!(
        parse("1.5G"),
        "--memory size=1.5G: '1.5G' is not a size; use bytes or a number with K, M, G or T (e.g. 512M)"
    );
    assert_eq!(
        parse("-1G"),
        "--memory size=-1G: '-1G' is not a size; use bytes or a number with K, M, G or T (e.g. 512M)"
    );
    assert_eq!(
        parse("16777216T"),
        "--memory size=16777216T: the size is too large to represent; use a smaller size"
    );
    assert_eq!(
        parse("99999999999999999999"),
        "--memory size=99999999999999999999: the size is too large to represent; use a smaller size"
    );
    assert_eq!(
        err(MemoryConfig::parse("size=")),
        "--memory: key 'size' has an empty value; write size=VALUE"
    );
}

#[test]
fn memory_against_host() {
    let m = MemoryConfig {
        size: 1 << 40,
        ..MemoryConfig::default()
    };
    assert_eq!(
        m.validate_against_host(Some(24 << 30))
            .unwrap_err()
            .to_string(),
        "--memory size=1T: this host has only 24.0 GiB of physical memory; choose a smaller size"
    );
    assert!(m.validate_against_host(Some(1 << 40)).is_ok());
    assert!(m.validate_against_host(None).is_ok());
}

#[test]
fn meminfo_parsing() {
    let text = "MemTotal:       24593008 kB\nMemFree:        1 kB\n";
    assert_eq!(parse_meminfo_total(text), Some(24593008 * 1024));
    assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
    assert_eq!(parse_meminfo_total("MemTotal: x kB\n"), None);
    assert_eq!(parse_meminfo_total("MemTotal: 5 MB\n"), None);
    assert_eq!(
        parse_meminfo_total("MemTotal: 18446744073709551615 kB\n"),
        None
    );
    // This host's own file parses.
    assert!(host_memory().is_some_and(|m| m > 0));
}

#[test]
fn size_display() {
    assert_eq!(Size(0).to_string(), "0");
    assert_eq!(Size(512 << 20).to_string(), "512M");
    assert_eq!(Size(3 << 30).to_string(), "3G");
    assert_eq!(Size(4097).to_string(), "4097");
    assert_eq!(Size(6 << 10).to_string(), "6K");
    assert_eq!(HumanSize(24593008 * 1024).to_string(), "23.5 GiB");
    assert_eq!(HumanSize(512 << 20).to_string(), "512.0 MiB");
    assert_eq!(HumanSize(100).to_string(), "100 bytes");
}

#[test]
fn serial_modes() {
    assert_eq!(
        ConsoleOutputMode::parse("tty").unwrap(),
        ConsoleOutputMode::Tty
    );
    assert_eq!(
        ConsoleOutputMode::parse("null").unwrap(),
        ConsoleOutputMode::Null
    );
    assert_eq!(
        ConsoleOutputMode::parse("off").unwrap(),
        ConsoleOutputMode::Off
    );
    assert_eq!(
        ConsoleOutputMode::parse("file=/tmp/a,b.log").unwrap(),
        ConsoleOutputMode::File(PathBuf::from("/tmp/a,b.log"))
    );
    assert_eq!(
        ConsoleOutputMode::parse("socket=/run/s.sock").unwrap(),
        ConsoleOutputMode::Socket(PathBuf::from("/run/s.sock"))
    );
    assert_eq!(
        err(ConsoleOutputMode::parse("pty")),
        "--serial: unknown mode 'pty' (valid: tty, file=PATH, socket=PATH, null, off)"
    );
    assert_eq!(
        err(ConsoleOutputMode::parse("")),
        "--serial: unknown mode '' (valid: tty, file=PATH, socket=PATH, null, off)"
    );
    assert_eq!(
        err(ConsoleOutputMode::parse("file=")),
        "--serial file=: the path is empty; write file=PATH"
    );
    assert_eq!(
        err(ConsoleOutputMode::parse("socket=")),
        "--serial socket=: the path is empty; write socket=PATH"
    );
}

#[test]
fn defaults() {
    let c = VmConfig::default();
    assert_eq!(
        c.cpus,
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1
        }
    );
    assert_eq!(c.memory.size, 512 << 20);
    assert_eq!(c.payload.kernel, KernelSource::BuiltinDemo);
    assert_eq!(c.payload.initramfs, None);
    assert_eq!(c.payload.cmdline, "");
    assert_eq!(c.serial, ConsoleOutputMode::Tty);
    assert!(!c.debug_exit && !c.no_reboot);
    assert_eq!(c.triple_fault, TripleFaultAction::Crash);
    assert_eq!(c.verbosity, 0);
    assert!(c.validate_against(Some(1 << 30)).is_ok());
    assert_eq!(
        MemoryConfig::parse("size=512M").unwrap(),
        MemoryConfig::default()
    );
}

#[test]
fn payload_cmdline_defaults() {
    let p = PayloadConfig::new(Some("vmlinux".into()), None, None);
    assert_eq!(p.kernel, KernelSource::Path("vmlinux".into()));
    assert_eq!(p.cmdline, DEFAULT_KERNEL_CMDLINE);
    let p = PayloadConfig::new(
        Some("vmlinux".into()),
        Some("initrd".into()),
        Some(String::new()),
    );
    assert_eq!(p.cmdline, "");
    assert_eq!(p.initramfs, Some(PathBuf::from("initrd")));
    let p = PayloadConfig::new(None, None, Some("quiet".into()));
    assert_eq!(
        (p.kernel, p.cmdline.as_str()),
        (KernelSource::BuiltinDemo, "quiet")
    );
}

#[test]
fn validate_files() {
    let dir = scratch("files");
    let kernel = dir.join("bzImage");
    std::fs::write(&kernel, b"kernel").unwrap();
    let missing = dir.join("missing");
    let with = |k: &Path, i: Option<&Path>| VmConfig {
        payload: PayloadConfig::new(Some(k.to_path_buf()), i.map(Path::to_path_buf), None),
        ..VmConfig::default()
    };

    assert!(with(&kernel, Some(&kernel)).validate_against(None).is_ok());
    assert_eq!(
        err(with(&missing, None).validate_against(None)),
        format!(
            "--kernel {}: cannot read it: No such file or directory (os error 2)",
            missing.display()
        )
    );
    assert_eq!(
        err(with(&dir, None).validate_against(None)),
        format!(
            "--kernel {}: is a directory, not a regular file; give the path of the image file",
            dir.display()
        )
    );
    assert_eq!(
        err(with(Path::new("/dev/null"), None).validate_against(None)),
        "--kernel /dev/null: is a special file, not a regular file; give the path of the image file"
    );
    assert_eq!(
        err(with(&kernel, Some(&missing)).validate_against(None)),
        format!(
            "--initramfs {}: cannot read it: No such file or directory (os error 2)",
            missing.display()
        )
    );
    assert_eq!(
        err(with(&kernel, Some(&dir)).validate_against(None)),
        format!(
            "--initramfs {}: is a directory, not a regular file; give the path of the image file",
            dir.display()
        )
    );
    // The demo kernel needs no file.
    let demo = VmConfig::default();
    assert!(demo.validate_against(None).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn validate_rechecks_every_field() {
    let ok = VmConfig::default();
    let check = |c: VmConfig| err(c.validate_against(Some(1 << 30)));

    let mut c = ok.clone();
    c.cpus = CpusConfig {
        boot_vcpus: 0,
        max_vcpus: 0,
    };
    assert_eq!(
        check(c),
        "--cpus boot=0: the VM needs at least one vCPU; use boot=1 or more"
    );
    let mut c = ok.clone();
    c.cpus = CpusConfig {
        boot_vcpus: 3,
        max_vcpus: 2,
    };
    assert_eq!(
        check(c),
        "--cpus: boot=3 is more than max=2; raise max or lower boot"
    );
    let mut c = ok.clone();
    c.cpus = CpusConfig {
        boot_vcpus: 1,
        max_vcpus: 256,
    };
    assert_eq!(
        check(c),
        "--cpus: 256 vCPUs requested but at most 255 are supported (xAPIC IDs); lower boot/max"
    );
    let mut c = ok.clone();
    c.memory.size = 0;
    assert_eq!(check(c), "--memory size=0: the guest needs at least 16 MiB");
    let mut c = ok.clone();
    c.memory.size = (64 << 20) + 512;
    assert_eq!(
        check(c),
        "--memory size=67109376: not a multiple of 4 KiB; use whole pages (e.g. 512M)"
    );
    let mut c = ok.clone();
    c.memory.size = 2 << 30;
    assert_eq!(
        check(c),
        "--memory size=2G: this host has only 1.0 GiB of physical memory; choose a smaller size"
    );
    let mut c = ok.clone();
    c.payload.cmdline = "console=ttyS0\0quiet".into();
    assert_eq!(
        check(c),
        "--cmdline: contains a NUL byte at offset 13; remove it"
    );
    let mut c = ok.clone();
    c.serial = ConsoleOutputMode::File(PathBuf::new());
    assert_eq!(
        check(c),
        "--serial file=: the path is empty; write file=PATH"
    );
    let mut c = ok.clone();
    c.serial = ConsoleOutputMode::Socket(PathBuf::new());
    assert_eq!(
        check(c),
        "--serial socket=: the path is empty; write socket=PATH"
    );
}

#[test]
fn validate_uses_host_memory() {
    let c = VmConfig {
        memory: MemoryConfig {
            size: 1 << 60,
            ..MemoryConfig::default()
        },
        ..VmConfig::default()
    };
    let msg = err(c.validate());
    assert!(
        msg.starts_with("--memory size=1048576T: this host has only "),
        "{msg}"
    );
    assert!(
        msg.ends_with(" of physical memory; choose a smaller size"),
        "{msg}"
    );
}

#[test]
fn json_round_trip() {
    let c = VmConfig {
        cpus: CpusConfig {
            boot_vcpus: 2,
            max_vcpus: 4,
        },
        memory: MemoryConfig {
            size: 1 << 30,
            ..MemoryConfig::default()
        },
        payload: PayloadConfig::new(
            Some("/boot/vmlinuz".into()),
            Some("/boot/initrd".into()),
            None,
        ),
        serial: ConsoleOutputMode::Socket("/run/atrium.sock".into()),
        debug_exit: true,
        no_reboot: true,
        triple_fault: TripleFaultAction::Reboot,
        verbosity: 2,
        console: Some(ConsoleOutputMode::Null),
        disks: vec![DiskConfig::parse("path=/d.img,readonly=on,id=d0").unwrap()],
        nets: vec![NetConfig::parse("tap=tap0,id=n0").unwrap()],
        vsock: Some(VsockConfig::parse("cid=3,socket=/run/v.sock").unwrap()),
        rng: Some(RngConfig::default()),
        firmware: Some(FirmwareConfig {
            path: "/usr/share/seabios/bios-256k.bin".into(),
            boot_timeout: 3,
        }),
        debug_console: Some(ConsoleOutputMode::File("/tmp/debugcon.log".into())),
    };
    let json = serde_json::to_string(&c).unwrap();
    assert!(
        json.contains(r#""kernel":{"path":"/boot/vmlinuz"}"#),
        "{json}"
    );
    assert!(
        json.contains(r#""serial":{"socket":"/run/atrium.sock"}"#),
        "{json}"
    );
    assert!(json.contains(r#""triple_fault":"reboot""#), "{json}");
    let back: VmConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);

    let demo = serde_json::to_string(&VmConfig::default()).unwrap();
    assert!(demo.contains(r#""kernel":"builtin_demo""#), "{demo}");
    assert!(demo.contains(r#""serial":"tty""#), "{demo}");
}

#[test]
fn duplicate_device_ids_are_rejected() {
    let mut c = VmConfig::default();
    let disk = DiskConfig::parse("path=/dev/null,id=same").unwrap();
    c.disks = vec![disk.clone(), disk];
    assert_eq!(
        err(c.validate_against(None)),
        "device id 'same' is used twice; give each device its own id="
    );
}

#[test]
fn serial_and_console_cannot_both_take_the_tty() {
    let c = VmConfig {
        console: Some(ConsoleOutputMode::Tty),
        ..VmConfig::default()
    };
    assert_eq!(
        err(c.validate_against(None)),
        "--serial tty and --console tty cannot share the terminal; use --serial null (or off) with --console tty"
    );
}

#[test]
fn memory_hotplug_options() {
    let m = MemoryConfig::parse("size=1G,hotplug_method=acpi,hotplug_size=7G").unwrap();
    assert_eq!(
        (m.size, m.hotplug_size, m.hotplug_method),
        (1 << 30, 7 << 30, HotplugMethod::Acpi)
    );
    assert_eq!(
        err(MemoryConfig::parse("size=1G,hotplug_size=100M")),
        "--memory hotplug_size=104857600: use a multiple of 128M (the guest adds memory in 128 MiB blocks)"
    );
    assert_eq!(
        err(MemoryConfig::parse("size=1G,hotplug_method=dimm")),
        "--memory hotplug_method=dimm: use acpi or virtio-mem"
    );
    let m = MemoryConfig::parse("size=1G,hotplug_method=virtio-mem,hotplug_size=1G").unwrap();
    assert_eq!(
        (m.size, m.hotplug_size, m.hotplug_method),
        (1 << 30, 1 << 30, HotplugMethod::VirtioMem)
    );
    assert_eq!(
        err(MemoryConfig::parse(
            "size=1G,hotplug_method=virtio-mem,hotplug_size=130M"
        )),
        "--memory hotplug_size=136314880: use a multiple of 128M (the guest adds memory in 128 MiB blocks)"
    );
    // JSON names the method as the command line does.
    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(json["hotplug_method"], "virtio-mem");
}

#[test]
fn firmware_and_kernel_exclude_each_other_and_the_boot_timeout_is_positive() {
    let dir = scratch("firmware");
    let image = dir.join("bios.bin");
    std::fs::write(&image, vec![0u8; 128 << 10]).unwrap();
    let firmware = |boot_timeout| {
        Some(FirmwareConfig {
            path: image.clone(),
            boot_timeout,
        })
    };
    let c = VmConfig {
        firmware: firmware(DEFAULT_BOOT_TIMEOUT),
        ..VmConfig::default()
    };
    assert!(c.validate_against(None).is_ok());
    let c = VmConfig {
        firmware: firmware(DEFAULT_BOOT_TIMEOUT),
        payload: PayloadConfig::new(Some(image.clone()), None, None),
        ..VmConfig::default()
    };
    assert!(err(c.validate_against(None)).starts_with("--firmware and --kernel both given"));
    let c = VmConfig {
        firmware: firmware(0),
        ..VmConfig::default()
    };
    assert!(err(c.validate_against(None)).starts_with("--boot-timeout=0"));
    let c = VmConfig {
        firmware: Some(FirmwareConfig {
            path: dir.join("missing.bin"),
            boot_timeout: 1,
        }),
        ..VmConfig::default()
    };
    assert!(err(c.validate_against(None)).starts_with("--firmware"));
}

#[test]
fn the_id_vmm_is_reserved_for_the_vmms_counters() {
    for parsed in [
        DiskConfig::parse("path=/d.img,id=vmm").map(|_| ()),
        NetConfig::parse("tap=tap0,id=vmm").map(|_| ()),
    ] {
        let msg = err(parsed);
        assert!(
            msg.contains("'vmm' names the VMM's own entry in vm.counters"),
            "{msg}"
        );
    }
}
