//! `atrium-remote`: drives a running atrium through its API socket (`atrium --api-socket path=...`).

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use vmm::api::client::{self, ApiClient, ClientError, Value};
use vmm::api::{
    PciDeviceInfo, VmCounters, VmInfo, VmRemoveDeviceData, VmResizeData, VmmPingResponse,
};
use vmm::config::{DiskConfig, MemoryConfig, NetConfig, Size, VsockConfig};

/// Exit code: the server answered with an error (or an answer that makes no sense).
const EXIT_API: i32 = 1;
/// Exit code: the command line is wrong (syntax, an option string, an unreadable file).
const EXIT_USAGE: i32 = 2;
/// Exit code: nothing answers at the socket.
const EXIT_UNREACHABLE: i32 = 3;

const EXIT_CODES: &str = "\
Exit codes:
  0    done
  1    the VMM refused or failed the request (its message and HTTP status are shown)
  2    usage error: bad command line, option string or file
  3    cannot reach the API socket";

#[derive(Debug, Parser)]
#[command(name = "atrium-remote", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// The API socket atrium was started with (--api-socket path=PATH)
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,

    /// Print the server's JSON answer as it is instead of a summary
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that the VMM answers; show its version and process id
    Ping,
    /// Show the VM's state, vCPUs, memory and devices
    Info,
    /// Show the VM's counters
    Counters,
    /// Boot the VM created with `create`
    Boot,
    /// Pause the VM's vCPUs
    Pause,
    /// Resume a paused VM
    Resume,
    /// Reset the VM
    Reboot,
    /// Press the ACPI power button (the guest shuts down cleanly)
    PowerButton,
    /// Stop the VM (the VMM keeps running)
    Shutdown,
    /// Stop the VM and the VMM
    ShutdownVmm,
    /// Change the number of vCPUs and/or the memory size
    Resize {
        /// vCPUs to have
        #[arg(long, value_name = "N")]
        cpus: Option<u32>,
        /// Memory to have: bytes or K, M, G, T (binary units)
        #[arg(long, value_name = "SIZE")]
        memory: Option<String>,
    },
    /// Hot-plug a disk (the options of atrium --disk)
    AddDisk {
        /// path=PATH[,format=raw|qcow2][,readonly=on][,num_queues=N][,queue_size=N][,serial=ID][,id=NAME]
        #[arg(value_name = "OPTIONS")]
        options: String,
    },
    /// Hot-plug a network device (the options of atrium --net)
    AddNet {
        /// tap=[NAME][,mac=MAC][,num_queues=N][,queue_size=N][,id=NAME]
        #[arg(value_name = "OPTIONS")]
        options: String,
    },
    /// Hot-plug a vsock device (the options of atrium --vsock)
    AddVsock {
        /// cid=N,socket=PATH[,id=NAME]
        #[arg(value_name = "OPTIONS")]
        options: String,
    },
    /// Hot-unplug the device with this id
    RemoveDevice {
        /// The device's id
        id: String,
    },
    /// Create a VM from a JSON configuration file (boot it with `boot`)
    Create {
        /// The VM configuration as JSON (see docs/openapi.yaml, VmConfig)
        #[arg(value_name = "VM_JSON")]
        file: PathBuf,
    },
}

/// How a command failed: the message and the exit code.
struct Failure(String, i32);

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match e {
            ClientError::Connect { .. } => EXIT_UNREACHABLE,
            _ => EXIT_API,
        };
        Failure(e.to_string(), code)
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure(message.into(), EXIT_USAGE)
}

/// One HTTP call: method, endpoint, body.
struct Call {
    method: &'static str,
    endpoint: &'static str,
    body: Option<Vec<u8>>,
}

impl Call {
    fn get(endpoint: &'static str) -> Self {
        Call {
            method: "GET",
            endpoint,
            body: None,
        }
    }

    fn put(endpoint: &'static str) -> Self {
        Call {
            method: "PUT",
            endpoint,
            body: None,
        }
    }

    fn put_body(endpoint: &'static str, body: Vec<u8>) -> Self {
        Call {
            method: "PUT",
            endpoint,
            body: Some(body),
        }
    }
}

/// The call a command makes, with its option strings parsed as atrium parses them.
fn call_for(command: &Command) -> Result<Call, Failure> {
    let bad = |e: vmm::config::ConfigError| usage(e.to_string());
    Ok(match command {
        Command::Ping => Call::get("vmm.ping"),
        Command::Info => Call::get("vm.info"),
        Command::Counters => Call::get("vm.counters"),
        Command::Boot => Call::put("vm.boot"),
        Command::Pause => Call::put("vm.pause"),
        Command::Resume => Call::put("vm.resume"),
        Command::Reboot => Call::put("vm.reboot"),
        Command::PowerButton => Call::put("vm.power-button"),
        Command::Shutdown => Call::put("vm.shutdown"),
        Command::ShutdownVmm => Call::put("vmm.shutdown"),
        Command::Resize { cpus, memory } => {
            if cpus.is_none() && memory.is_none() {
                return Err(usage("resize: give --cpus, --memory or both"));
            }
            let desired_ram = match memory {
                Some(size) if size.contains(',') || size.contains('=') => {
                    return Err(usage(format!(
                        "--memory {size}: not a size; use bytes or a number with K, M, G or T (e.g. 4G)"
                    )))
                }
                Some(size) => Some(MemoryConfig::parse(&format!("size={size}")).map_err(bad)?.size),
                None => None,
            };
            let resize = VmResizeData {
                desired_vcpus: *cpus,
                desired_ram,
            };
            Call::put_body("vm.resize", client::encode(&resize)?)
        }
        Command::AddDisk { options } => {
            let disk = DiskConfig::parse(options).map_err(bad)?;
            Call::put_body("vm.add-disk", client::encode(&disk)?)
        }
        Command::AddNet { options } => {
            let net = NetConfig::parse(options).map_err(bad)?;
            Call::put_body("vm.add-net", client::encode(&net)?)
        }
        Command::AddVsock { options } => {
            let vsock = VsockConfig::parse(options).map_err(bad)?;
            Call::put_body("vm.add-vsock", client::encode(&vsock)?)
        }
        Command::RemoveDevice { id } => {
            let remove = VmRemoveDeviceData { id: id.clone() };
            Call::put_body("vm.remove-device", client::encode(&remove)?)
        }
        Command::Create { file } => {
            // Sent as it is: the server parses and validates it (its paths are the server's).
            let body = std::fs::read(file)
                .map_err(|e| usage(format!("create: cannot read {}: {e}", file.display())))?;
            Call::put_body("vm.create", body)
        }
    })
}

/// The human summary of an answer.
fn summary(command: &Command, answer: Value) -> Result<String, Failure> {
    Ok(match command {
        Command::Ping => {
            let ping: VmmPingResponse = client::decode(answer)?;
            let mut text = format!("atrium {} (pid {})\n", ping.version, ping.pid);
            if !ping.features.is_empty() {
                text.push_str(&format!("features: {}\n", ping.features.join(", ")));
            }
            text
        }
        Command::Info => info_summary(&client::decode(answer)?),
        Command::Counters => counters_table(&client::decode(answer)?),
        Command::AddDisk { .. } | Command::AddNet { .. } | Command::AddVsock { .. } => {
            let device: PciDeviceInfo = client::decode(answer)?;
            format!("added {} at {}\n", device.id, device.bdf)
        }
        _ => format!("{answer:#}\n"),
    })
}

fn info_summary(info: &VmInfo) -> String {
    let mut text = format!("state:    {}\n", info.state);
    if let Some(config) = &info.config {
        let vcpus = info.vcpus.unwrap_or(config.cpus.boot_vcpus);
        text.push_str(&format!(
            "vcpus:    {vcpus} (max {})\n",
            config.cpus.max_vcpus
        ));
        let memory = info.memory_actual_size.unwrap_or(config.memory.size);
        text.push_str(&format!("memory:   {}\n", Size(memory)));
    }
    if info.devices.is_empty() {
        text.push_str("devices:  none\n");
    } else {
        for (i, device) in info.devices.iter().enumerate() {
            let label = if i == 0 { "devices:" } else { "" };
            text.push_str(&format!("{label:<9} {} {}\n", device.bdf, device.id));
        }
    }
    text
}

fn counters_table(counters: &VmCounters) -> String {
    let rows: Vec<(&str, &str, String)> = counters
        .iter()
        .flat_map(|(device, values)| {
            values
                .iter()
                .map(move |(name, value)| (device.as_str(), name.as_str(), value.to_string()))
        })
        .collect();
    if rows.is_empty() {
        return "no counters\n".to_string();
    }
    let width = |header: &str, column: &dyn Fn(&(&str, &str, String)) -> usize| {
        rows.iter()
            .map(column)
            .chain([header.len()])
            .max()
            .unwrap_or(0)
    };
    let w0 = width("DEVICE", &|r| r.0.len());
    let w1 = width("COUNTER", &|r| r.1.len());
    let w2 = width("VALUE", &|r| r.2.len());
    let mut text = format!("{:<w0$}  {:<w1$}  {:>w2$}\n", "DEVICE", "COUNTER", "VALUE");
    for (device, name, value) in &rows {
        text.push_str(&format!("{device:<w0$}  {name:<w1$}  {value:>w2$}\n"));
    }
    text
}

/// Parses the command line; help and version are printed and end the program with 0.
fn parse_cli(args: Vec<OsString>, out: &mut dyn Write) -> Result<Cli, Failure> {
    Cli::try_parse_from(args).map_err(|e| match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = write!(out, "{}", e.render());
            Failure(String::new(), 0)
        }
        _ => {
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or_default();
            let message = first.strip_prefix("error: ").unwrap_or(first);
            usage(format!("{message} (see 'atrium-remote --help')"))
        }
    })
}

fn execute(cli: &Cli, out: &mut dyn Write) -> Result<(), Failure> {
    let call = call_for(&cli.command)?;
    let client = ApiClient::new(&cli.api_socket);
    let answer = client.request(call.method, call.endpoint, call.body.as_deref())?;
    let Some(answer) = answer else {
        return Ok(());
    };
    let text = if cli.json {
        format!("{answer:#}\n")
    } else {
        summary(&cli.command, answer)?
    };
    // A closed stdout leaves nothing to report to.
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

/// Runs atrium-remote with `args`, writing results to `out` and the one-line error to `err`; returns the exit code.
fn run(args: Vec<OsString>, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let result = parse_cli(args, out).and_then(|cli| execute(&cli, out));
    match result {
        Ok(()) => 0,
        Err(Failure(message, code)) => {
            if !message.is_empty() {
                let _ = writeln!(err, "atrium-remote: {message}");
            }
            code
        }
    }
}

fn main() {
    let code = run(
        std::env::args_os().collect(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread::JoinHandle;
    use vmm::api::VmInfo;
    use vmm::config::VmConfig;

    fn temp_path(what: &str) -> PathBuf {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        std::env::temp_dir().join(format!(
            "atrium-remote-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// A stand-in server: answers one connection with `answer` and returns the request it got.
    struct Canned {
        path: PathBuf,
        thread: JoinHandle<String>,
    }

    impl Canned {
        fn new(answer: String) -> Self {
            let path = temp_path("sock");
            let listener = UnixListener::bind(&path).unwrap();
            let thread = std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") {
                    stream.read_exact(&mut byte).unwrap();
                    request.push(byte[0]);
                }
                let head = String::from_utf8(request.clone()).unwrap();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map_or(0, |n| n.parse().unwrap());
                let mut body = vec![0u8; length];
                stream.read_exact(&mut body).unwrap();
                stream.write_all(answer.as_bytes()).unwrap();
                head + &String::from_utf8(body).unwrap()
            });
            Canned { path, thread }
        }

        fn json(status: &str, body: &str) -> Self {
            Self::new(format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ))
        }

        fn done() -> Self {
            Self::new("HTTP/1.1 204 No Content\r\n\r\n".into())
        }

        /// Runs atrium-remote against this server: (exit code, stdout, stderr, the request the server got).
        fn run(self, args: &[&str]) -> (i32, String, String, String) {
            let socket = self.path.to_str().unwrap().to_string();
            let (code, out, err) = run_args(&[&["--api-socket", &socket], args].concat());
            let request = self.thread.join().unwrap();
            let _ = std::fs::remove_file(&self.path);
            (code, out, err, request)
        }
    }

    fn run_args(args: &[&str]) -> (i32, String, String) {
        let mut argv: Vec<OsString> = vec!["atrium-remote".into()];
        argv.extend(args.iter().map(OsString::from));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run(argv, &mut out, &mut err);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn commands_send_the_documented_calls() {
        let vm_json = temp_path("vm.json");
        std::fs::write(&vm_json, "{\"cpus\": {}}").unwrap();
        let vm_json = vm_json.to_str().unwrap();
        let cases: &[(&[&str], &str, &str)] = &[
            (&["boot"], "PUT /api/v1/vm.boot", ""),
            (&["pause"], "PUT /api/v1/vm.pause", ""),
            (&["resume"], "PUT /api/v1/vm.resume", ""),
            (&["reboot"], "PUT /api/v1/vm.reboot", ""),
            (&["power-button"], "PUT /api/v1/vm.power-button", ""),
            (&["shutdown"], "PUT /api/v1/vm.shutdown", ""),
            (&["shutdown-vmm"], "PUT /api/v1/vmm.shutdown", ""),
            (
                &["resize", "--cpus", "6", "--memory", "4G"],
                "PUT /api/v1/vm.resize",
                "{\"desired_vcpus\":6,\"desired_ram\":4294967296}",
            ),
            (
                &["resize", "--memory", "512M"],
                "PUT /api/v1/vm.resize",
                "{\"desired_vcpus\":null,\"desired_ram\":536870912}",
            ),
            (
                &["add-disk", "path=/img/data.qcow2,id=disk9"],
                "PUT /api/v1/vm.add-disk",
                "{\"path\":\"/img/data.qcow2\",\"readonly\":false,\"direct\":false,\"num_queues\":1,\
                 \"queue_size\":256,\"serial\":null,\"id\":\"disk9\",\"bootindex\":null,\"format\":null}",
            ),
            (
                &["add-net", "tap=,id=net2"],
                "PUT /api/v1/vm.add-net",
                "{\"tap\":null,\"fd\":null,\"mac\":null,\"num_queues\":2,\"queue_size\":256,\"id\":\"net2\"}",
            ),
            (
                &["add-vsock", "cid=3,socket=/run/v.sock"],
                "PUT /api/v1/vm.add-vsock",
                "{\"cid\":3,\"socket\":\"/run/v.sock\",\"id\":null}",
            ),
            (
                &["remove-device", "disk9"],
                "PUT /api/v1/vm.remove-device",
                "{\"id\":\"disk9\"}",
            ),
            (&["create", vm_json], "PUT /api/v1/vm.create", "{\"cpus\": {}}"),
        ];
        for (args, line, body) in cases {
            let (code, out, err, request) = Canned::done().run(args);
            assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""), "{args:?}");
            assert!(
                request.starts_with(&format!("{line} HTTP/1.1\r\n")),
                "{request}"
            );
            assert!(
                request.ends_with(&format!("\r\n\r\n{body}")),
                "{args:?}: {request}"
            );
            if !body.is_empty() {
                assert!(request.contains("Content-Type: application/json\r\n"));
            }
        }
        let _ = std::fs::remove_file(vm_json);
    }

    #[test]
    fn human_output() {
        let ping = r#"{"version":"0.1.0","pid":42,"features":["pci"]}"#;
        let (code, out, _, request) = Canned::json("200 OK", ping).run(&["ping"]);
        assert_eq!(code, 0);
        assert!(request.starts_with("GET /api/v1/vmm.ping HTTP/1.1\r\n"));
        assert_eq!(out, "atrium 0.1.0 (pid 42)\nfeatures: pci\n");

        let mut config = VmConfig::default();
        config.cpus.max_vcpus = 8;
        let info = VmInfo {
            state: "Running".into(),
            config: Some(config),
            vcpus: Some(2),
            memory_actual_size: Some(1 << 30),
            devices: vec![
                PciDeviceInfo {
                    id: "disk0".into(),
                    bdf: "0000:00:01.0".into(),
                },
                PciDeviceInfo {
                    id: "rng0".into(),
                    bdf: "0000:00:02.0".into(),
                },
            ],
        };
        let body = String::from_utf8(client::encode(&info).unwrap()).unwrap();
        let (_, out, _, _) = Canned::json("200 OK", &body).run(&["info"]);
        assert_eq!(
            out,
            "state:    Running\nvcpus:    2 (max 8)\nmemory:   1G\ndevices:  0000:00:01.0 disk0\n          0000:00:02.0 rng0\n"
        );
        let (_, out, _, _) =
            Canned::json("200 OK", r#"{"state":"NotCreated","config":null}"#).run(&["info"]);
        assert_eq!(out, "state:    NotCreated\ndevices:  none\n");

        let counters =
            r#"{"disk0":{"read_bytes":4096,"write_ops":7},"vmm":{"unclaimed_mmio_accesses":0}}"#;
        let (_, out, _, _) = Canned::json("200 OK", counters).run(&["counters"]);
        assert_eq!(
            out,
            "DEVICE  COUNTER                  VALUE\n\
             disk0   read_bytes                4096\n\
             disk0   write_ops                    7\n\
             vmm     unclaimed_mmio_accesses      0\n"
        );

        let added = r#"{"id":"disk9","bdf":"0000:00:05.0"}"#;
        let (_, out, _, _) = Canned::json("200 OK", added).run(&["add-disk", "path=/x"]);
        assert_eq!(out, "added disk9 at 0000:00:05.0\n");
    }

    #[test]
    fn json_flag_prints_the_answer() {
        let (code, out, _, _) =
            Canned::json("200 OK", r#"{"vmm":{"a":1}}"#).run(&["counters", "--json"]);
        assert_eq!(code, 0);
        assert_eq!(out, "{\n  \"vmm\": {\n    \"a\": 1\n  }\n}\n");
    }

    #[test]
    fn api_errors_exit_1_with_the_message_and_status() {
        let body = r#"{"error":"cannot pause: the VM is Created"}"#;
        let (code, out, err, _) = Canned::json("409 Conflict", body).run(&["pause"]);
        assert_eq!(code, 1);
        assert_eq!(out, "");
        assert_eq!(
            err,
            "atrium-remote: cannot pause: the VM is Created (HTTP 409)\n"
        );
        // An answer that is not the documented shape is an error too.
        let (code, _, err, _) = Canned::json("200 OK", r#"{"pid":"x"}"#).run(&["ping"]);
        assert_eq!(code, 1);
        assert!(
            err.starts_with("atrium-remote: the server's answer is not understood"),
            "{err}"
        );
    }

    #[test]
    fn unreachable_socket_exits_3() {
        let (code, _, err) = run_args(&["--api-socket", "/nonexistent/vm.sock", "ping"]);
        assert_eq!(code, 3);
        assert!(
            err.starts_with("atrium-remote: cannot connect to /nonexistent/vm.sock: "),
            "{err}"
        );
        assert!(err.ends_with("is atrium running with --api-socket /nonexistent/vm.sock?\n"));
    }

    #[test]
    fn usage_errors_exit_2_on_one_line() {
        let sock = ["--api-socket", "/nonexistent/vm.sock"];
        for (args, expected) in [
            (
                &["ping"][..],
                "atrium-remote: the following required arguments were not provided:",
            ),
            (&sock[..], "atrium-remote: "),
            (
                &[&sock[..], &["fly"]].concat(),
                "atrium-remote: unrecognized subcommand 'fly'",
            ),
            (
                &[&sock[..], &["resize"]].concat(),
                "atrium-remote: resize: give --cpus, --memory or both",
            ),
            (
                &[&sock[..], &["resize", "--memory", "1X"]].concat(),
                "atrium-remote: --memory size=1X: '1X' is not a size",
            ),
            (
                &[&sock[..], &["resize", "--memory", "1G,size=2G"]].concat(),
                "atrium-remote: --memory 1G,size=2G: not a size",
            ),
            (
                &[&sock[..], &["add-disk", "readonly=on"]].concat(),
                "atrium-remote: --disk: 'path=' is required",
            ),
            (
                &[&sock[..], &["add-vsock", "cid=2,socket=/s"]].concat(),
                "atrium-remote: --vsock cid=2: context ids",
            ),
            (
                &[&sock[..], &["create", "/nonexistent/vm.json"]].concat(),
                "atrium-remote: create: cannot read /nonexistent/vm.json: ",
            ),
        ] {
            let (code, out, err) = run_args(args);
            assert_eq!(code, 2, "{args:?}: {err}");
            assert_eq!(out, "");
            assert!(err.starts_with(expected), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let (code, out, _) = run_args(&["--help"]);
        assert_eq!(code, 0);
        assert!(
            out.contains("shutdown-vmm") && out.contains("Exit codes:"),
            "{out}"
        );
    }
}
