//! The server end to end over real Unix sockets, against a fake VMM that answers through the channel the way the
//! VMM's control loop does (woken by the notify eventfd).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

use super::client::{decode, encode, ApiClient, ClientError};
use super::*;
use crate::config::{DiskConfig, KernelSource, NetConfig, VsockConfig};

type Channel = (ApiRequest, Sender<ApiResponse>);

/// A socket path in the temp directory, removed (with anything left there) when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn new(what: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "atrium-api-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        TempPath(path)
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum FakeState {
    Created,
    Running,
    Paused,
    Shutdown,
}

/// The fake VM the fake VMM keeps.
struct FakeVm {
    config: VmConfig,
    state: Option<FakeState>,
    devices: Vec<PciDeviceInfo>,
    requests: u64,
}

impl FakeVm {
    fn answer(&mut self, request: ApiRequest) -> ApiResponse {
        self.requests += 1;
        let wrong_state = |what: &str| ApiResponse::error(409, format!("cannot {what} now"));
        match request {
            ApiRequest::VmmPing => ApiResponse::json(&VmmPingResponse {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                features: vec!["fake".into()],
            }),
            ApiRequest::VmmShutdown => ApiResponse::Done,
            ApiRequest::VmCreate(config) => {
                if self.state.is_some() {
                    return ApiResponse::error(409, "a VM already exists");
                }
                self.config = *config;
                self.state = Some(FakeState::Created);
                ApiResponse::Done
            }
            ApiRequest::VmBoot => match self.state {
                Some(FakeState::Created) => {
                    self.state = Some(FakeState::Running);
                    ApiResponse::Done
                }
                _ => wrong_state("boot"),
            },
            ApiRequest::VmInfo => match self.state {
                Some(state) => ApiResponse::json(&VmInfo {
                    state: format!("{state:?}"),
                    config: Some(self.config.clone()),
                    vcpus: Some(self.config.cpus.boot_vcpus),
                    memory_actual_size: Some(self.config.memory.size),
                    devices: self.devices.clone(),
                }),
                None => wrong_state("report on a VM that does not exist"),
            },
            ApiRequest::VmCounters => {
                let mut counters = VmCounters::new();
                counters.insert(
                    "api".into(),
                    BTreeMap::from([("requests".to_string(), self.requests)]),
                );
                ApiResponse::json(&counters)
            }
            ApiRequest::VmPause => self.transition(FakeState::Running, FakeState::Paused, "pause"),
            ApiRequest::VmResume => {
                self.transition(FakeState::Paused, FakeState::Running, "resume")
            }
            ApiRequest::VmReboot | ApiRequest::VmPowerButton => match self.state {
                Some(FakeState::Running) => ApiResponse::Done,
                _ => wrong_state("do that"),
            },
            ApiRequest::VmShutdown => {
                self.transition(FakeState::Running, FakeState::Shutdown, "shut down")
            }
            ApiRequest::VmResize(resize) => {
                if let Some(n) = resize.desired_vcpus {
                    if n > self.config.cpus.max_vcpus {
                        return ApiResponse::error(400, format!("{n} vCPUs is above max"));
                    }
                    self.config.cpus.boot_vcpus = n;
                }
                if let Some(ram) = resize.desired_ram {
                    self.config.memory.size = ram;
                }
                ApiResponse::Done
            }
            ApiRequest::VmAddDisk(disk) => self.add(disk.id),
            ApiRequest::VmAddNet(net) => self.add(net.id),
            ApiRequest::VmAddVsock(vsock) => self.add(vsock.id),
            ApiRequest::VmRemoveDevice(remove) => {
                match self.devices.iter().position(|d| d.id == remove.id) {
                    Some(i) => {
                        self.devices.remove(i);
                        ApiResponse::Done
                    }
                    None => ApiResponse::error(404, format!("no device '{}'", remove.id)),
                }
            }
        }
    }

    fn transition(&mut self, from: FakeState, to: FakeState, what: &str) -> ApiResponse {
        if self.state == Some(from) {
            self.state = Some(to);
            ApiResponse::Done
        } else {
            ApiResponse::error(409, format!("cannot {what} now"))
        }
    }

    fn add(&mut self, id: Option<String>) -> ApiResponse {
        let slot = self.devices.len() + 1;
        let info = PciDeviceInfo {
            id: id.unwrap_or_else(|| format!("dev{slot}")),
            bdf: format!("0000:00:{slot:02x}.0"),
        };
        self.devices.push(info.clone());
        ApiResponse::json(&info)
    }
}

/// Runs the fake VMM: waits on the eventfd like an epoll loop, drains the channel, stops after `vmm.shutdown`
/// (dropping the receiver). Returns how many requests it answered.
fn fake_vmm(requests: Receiver<Channel>, notify: EventFd) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut vm = FakeVm {
            config: VmConfig::default(),
            state: None,
            devices: Vec::new(),
            requests: 0,
        };
        loop {
            notify.read().unwrap();
            while let Ok((request, answer)) = requests.try_recv() {
                let stop = matches!(request, ApiRequest::VmmShutdown);
                answer.send(vm.answer(request)).unwrap();
                if stop {
                    return vm.requests;
                }
            }
        }
    })
}

struct Setup {
    server: ApiServerHandle,
    vmm: JoinHandle<u64>,
    client: ApiClient,
    path: TempPath,
}

fn setup(what: &str) -> Setup {
    let path = TempPath::new(what);
    let (tx, rx) = mpsc::channel();
    let notify = EventFd::new(0).unwrap();
    let vmm = fake_vmm(rx, notify.try_clone().unwrap());
    let server = start_api_server(
        &path.0,
        ApiSender {
            requests: tx,
            notify,
        },
    )
    .unwrap();
    let client = ApiClient::new(&path.0);
    Setup {
        server,
        vmm,
        client,
        path,
    }
}

fn api_error(result: Result<Option<Value>, ClientError>) -> (u16, String) {
    match result {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn temp_file(what: &str) -> TempPath {
    let file = TempPath::new(what);
    std::fs::write(&file.0, [0u8; 4096]).unwrap();
    file
}

#[test]
fn every_endpoint_round_trips() {
    let s = setup("all");
    let c = &s.client;
    let kernel = temp_file("kernel");
    let disk = temp_file("disk");

    let ping: VmmPingResponse =
        decode(c.request("GET", "vmm.ping", None).unwrap().unwrap()).unwrap();
    assert_eq!(ping.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(ping.pid, std::process::id());
    assert_eq!(ping.features, ["fake"]);

    assert_eq!(api_error(c.request("GET", "vm.info", None)).0, 409);
    let mut config = VmConfig::default();
    config.payload.kernel = KernelSource::Path(kernel.0.clone());
    config.cpus.max_vcpus = 4;
    config.memory.size = 64 << 20;
    assert_eq!(
        c.request("PUT", "vm.create", Some(&encode(&config).unwrap()))
            .unwrap(),
        None
    );
    assert_eq!(
        c.request("PUT", "vm.pause", None)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err("cannot pause now (HTTP 409)".to_string())
    );
    assert_eq!(c.request("PUT", "vm.boot", None).unwrap(), None);
    assert_eq!(c.request("PUT", "vm.pause", None).unwrap(), None);
    assert_eq!(c.request("PUT", "vm.resume", None).unwrap(), None);
    assert_eq!(c.request("PUT", "vm.reboot", None).unwrap(), None);
    assert_eq!(c.request("PUT", "vm.power-button", None).unwrap(), None);

    let resize = VmResizeData {
        desired_vcpus: Some(3),
        desired_ram: Some(128 << 20),
    };
    assert_eq!(
        c.request("PUT", "vm.resize", Some(&encode(&resize).unwrap()))
            .unwrap(),
        None
    );
    let too_many = VmResizeData {
        desired_vcpus: Some(5),
        desired_ram: None,
    };
    assert_eq!(
        api_error(c.request("PUT", "vm.resize", Some(&encode(&too_many).unwrap()))),
        (400, "5 vCPUs is above max".to_string())
    );

    let disk_config = DiskConfig::parse(&format!("path={},id=disk9", disk.0.display())).unwrap();
    let added: PciDeviceInfo = decode(
        c.request("PUT", "vm.add-disk", Some(&encode(&disk_config).unwrap()))
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        added,
        PciDeviceInfo {
            id: "disk9".into(),
            bdf: "0000:00:01.0".into()
        }
    );
    let net = NetConfig::parse("tap=,id=net2").unwrap();
    let added: PciDeviceInfo = decode(
        c.request("PUT", "vm.add-net", Some(&encode(&net).unwrap()))
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(added.id, "net2");
    let vsock = VsockConfig::parse("cid=3,socket=/run/v.sock").unwrap();
    let added: PciDeviceInfo = decode(
        c.request("PUT", "vm.add-vsock", Some(&encode(&vsock).unwrap()))
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(added.id, "dev3");

    let info: VmInfo = decode(c.request("GET", "vm.info", None).unwrap().unwrap()).unwrap();
    assert_eq!(info.state, "Running");
    assert_eq!(info.vcpus, Some(3));
    assert_eq!(info.config.unwrap().cpus.max_vcpus, 4);
    assert_eq!(info.memory_actual_size, Some(128 << 20));
    let ids: Vec<&str> = info.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["disk9", "net2", "dev3"]);

    let remove = VmRemoveDeviceData { id: "net2".into() };
    assert_eq!(
        c.request("PUT", "vm.remove-device", Some(&encode(&remove).unwrap()))
            .unwrap(),
        None
    );
    assert_eq!(
        api_error(c.request("PUT", "vm.remove-device", Some(&encode(&remove).unwrap()))),
        (404, "no device 'net2'".to_string())
    );

    let counters: VmCounters =
        decode(c.request("GET", "vm.counters", None).unwrap().unwrap()).unwrap();
    // Every request that reached the fake VMM so far, this one included (router rejections never reach it).
    assert_eq!(counters["api"]["requests"], 18);

    assert_eq!(c.request("PUT", "vm.shutdown", None).unwrap(), None);
    assert_eq!(c.request("PUT", "vmm.shutdown", None).unwrap(), None);
    assert_eq!(s.vmm.join().unwrap(), 20);

    // The fake VMM is gone: its receiver is dropped.
    let (status, message) = api_error(c.request("GET", "vmm.ping", None));
    assert_eq!(status, 503);
    assert!(message.contains("not taking API requests"), "{message}");
    s.server.shutdown();
}

#[test]
fn router_errors_reach_the_client_as_json() {
    let s = setup("errors");
    let c = &s.client;
    assert_eq!(
        api_error(c.request("GET", "vm.nothing", None)),
        (404, "no endpoint /api/v1/vm.nothing; see docs/openapi.yaml for the API (e.g. GET /api/v1/vmm.ping)".into())
    );
    assert_eq!(
        api_error(c.request("PUT", "vm.info", None)),
        (405, "/api/v1/vm.info does not accept PUT; use GET".into())
    );
    let (status, message) =
        api_error(c.request("PUT", "vm.resize", Some(b"{\"desired_vcpus\": 2")));
    assert_eq!(status, 400);
    assert!(message.contains("EOF while parsing"), "{message}");
    let (status, message) = api_error(c.request(
        "PUT",
        "vm.create",
        Some(b"{\"cpus\": {\"boot_vcpus\": 1, \"max_vcpus\": 1}, \"gpu\": true}"),
    ));
    assert_eq!(status, 400, "{message}");
    drop(s.server);
    drop(s.path);
}

/// Sends raw bytes on one connection, ends the sending side, and reads until the server closes the connection.
fn raw_exchange(path: &std::path::Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.write_all(bytes).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn keep_alive_serves_pipelined_requests_in_order() {
    let s = setup("pipeline");
    let body = r#"{"desired_vcpus": 1}"#;
    let requests = format!(
        "GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n\
         PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}\
         DELETE /api/v1/vm.info HTTP/1.1\r\n\r\n\
         GET /api/v1/vm.counters HTTP/1.1\r\nConnection: close\r\n\r\n\
         GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n",
        body.len()
    );
    let out = raw_exchange(&s.path.0, requests.as_bytes());
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out[i + 9..i + 12])
        .collect();
    // The request after `Connection: close` is not answered.
    assert_eq!(statuses, ["200", "204", "405", "200"], "{out}");
    assert!(out.contains("\r\nAllow: GET\r\n"), "{out}");
    assert!(out.contains("Content-Type: application/json"));
    assert!(out.ends_with("{\"api\":{\"requests\":3}}"), "{out}");
    assert_eq!(out.matches("Connection: keep-alive").count(), 3);
    s.server.shutdown();
}

#[test]
fn malformed_http_is_answered_and_closed() {
    let s = setup("malformed");
    let out = raw_exchange(
        &s.path.0,
        b"HELLO\r\n\r\nGET /api/v1/vmm.ping HTTP/1.1\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert!(out.contains("Connection: close"));
    assert!(
        out.ends_with(
            "{\"error\":\"malformed request line 'HELLO'; expected 'METHOD /path HTTP/1.1'\"}"
        ),
        "{out}"
    );
    assert_eq!(out.matches("Server: atrium").count(), 1);

    // A body announced too large is refused from the head, without reading it.
    let out = raw_exchange(
        &s.path.0,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n",
    );
    assert!(
        out.starts_with("HTTP/1.1 413 Content Too Large\r\n"),
        "{out}"
    );

    let mut big = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Big: ".to_vec();
    big.resize(10_000, b'a');
    let out = raw_exchange(&s.path.0, &big);
    assert!(out.starts_with("HTTP/1.1 431 "), "{out}");

    // The body that was meant for a request without Content-Length arrives as the next request: a 400.
    let out = raw_exchange(
        &s.path.0,
        b"PUT /api/v1/vm.resize HTTP/1.1\r\n\r\n{\"desired_vcpus\": 2}\r\n\r\n",
    );
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["400", "400"], "{out}");
    assert!(out.contains("vm.resize needs a JSON body"), "{out}");

    // A peer that leaves mid-request gets nothing, and the server carries on.
    drop(raw_exchange(&s.path.0, b"GET /api/v1/vm"));
    assert!(s.client.request("GET", "vmm.ping", None).unwrap().is_some());
    s.server.shutdown();
}

#[test]
fn expect_continue_gets_an_interim_answer() {
    let s = setup("continue");
    let body = br#"{"desired_vcpus": 1}"#;
    let mut stream = UnixStream::connect(&s.path.0).unwrap();
    write!(
        stream,
        "PUT /api/v1/vm.resize HTTP/1.1\r\nExpect: 100-continue\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body).unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 204 No Content\r\n"), "{out}");
    s.server.shutdown();
}

#[test]
fn fifty_concurrent_clients() {
    let s = setup("concurrent");
    let clients: Vec<_> = (0..50)
        .map(|i| {
            let client = s.client.clone();
            std::thread::spawn(move || {
                for _ in 0..4 {
                    let ping: VmmPingResponse =
                        decode(client.request("GET", "vmm.ping", None).unwrap().unwrap()).unwrap();
                    assert_eq!(ping.pid, std::process::id());
                    let resize = VmResizeData {
                        desired_vcpus: Some(1 + i % 2),
                        desired_ram: None,
                    };
                    let _ = client.request("PUT", "vm.resize", Some(&encode(&resize).unwrap()));
                }
                // A keep-alive connection held open alongside the others.
                let mut stream = UnixStream::connect(client.socket()).unwrap();
                stream
                    .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
                    .unwrap();
                let mut buf = [0u8; 12];
                stream.read_exact(&mut buf).unwrap();
                assert_eq!(&buf, b"HTTP/1.1 200");
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let counters: VmCounters = decode(
        s.client
            .request("GET", "vm.counters", None)
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(counters["api"]["requests"], 50 * 9 + 1);
    s.client.request("PUT", "vmm.shutdown", None).unwrap();
    assert_eq!(s.vmm.join().unwrap(), 50 * 9 + 2);
    s.server.shutdown();
}

#[test]
fn dropped_receiver_is_503() {
    let path = TempPath::new("dropped");
    let (tx, rx) = mpsc::channel();
    drop(rx);
    let server = start_api_server(
        &path.0,
        ApiSender {
            requests: tx,
            notify: EventFd::new(0).unwrap(),
        },
    )
    .unwrap();
    let (status, _) = api_error(ApiClient::new(&path.0).request("PUT", "vm.boot", None));
    assert_eq!(status, 503);
    server.shutdown();
}

#[test]
fn shutdown_removes_the_socket_and_answers_a_waiting_request() {
    let path = TempPath::new("shutdown");
    let (tx, rx) = mpsc::channel::<Channel>();
    let notify = EventFd::new(0).unwrap();
    let vmm_notify = notify.try_clone().unwrap();
    let server = start_api_server(
        &path.0,
        ApiSender {
            requests: tx,
            notify,
        },
    )
    .unwrap();
    assert_eq!(server.socket_path(), path.0);
    // A client whose request the VMM never answers (the VMM is busy shutting the server down).
    let client = ApiClient::new(&path.0);
    let waiting = std::thread::spawn(move || client.request("PUT", "vm.pause", None));
    vmm_notify.read().unwrap();
    let (request, _answer) = rx.recv().unwrap();
    assert!(matches!(request, ApiRequest::VmPause));
    server.shutdown();
    assert_eq!(api_error(waiting.join().unwrap()).0, 503);
    assert!(!path.0.exists());
    assert!(UnixStream::connect(&path.0).is_err());
}

#[test]
fn binding_replaces_only_stale_sockets() {
    let path = TempPath::new("bind");
    let sender = || ApiSender {
        requests: mpsc::channel().0,
        notify: EventFd::new(0).unwrap(),
    };

    // A regular file is never removed.
    std::fs::write(&path.0, b"precious").unwrap();
    let e = start_api_server(&path.0, sender()).err().unwrap();
    assert!(
        matches!(
            e,
            ApiError::PathInUse {
                kind: "a regular file",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(std::fs::read(&path.0).unwrap(), b"precious");
    std::fs::remove_file(&path.0).unwrap();

    // A socket nobody listens on any more is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path.0).unwrap());
    assert!(path.0.exists());
    let server = start_api_server(&path.0, sender()).unwrap();

    // A live one is not.
    let e = start_api_server(&path.0, sender()).err().unwrap();
    assert!(matches!(e, ApiError::SocketLive { .. }), "{e}");
    assert!(e
        .to_string()
        .contains("another process is serving this socket"));
    server.shutdown();
    assert!(!path.0.exists());

    let e = start_api_server(std::path::Path::new("/nonexistent/dir/api.sock"), sender())
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .starts_with("--api-socket /nonexistent/dir/api.sock: cannot listen on it"),
        "{e}"
    );
}

#[test]
fn many_idle_connections_do_not_block_others() {
    let s = setup("idle");
    let idle: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&s.path.0).unwrap())
        .collect();
    // A half-sent request on one of them, too.
    (&idle[0])
        .write_all(b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    assert!(s.client.request("GET", "vmm.ping", None).unwrap().is_some());
    drop(idle);
    s.server.shutdown();
}
