//! The control API: REST/JSON over a Unix socket, with endpoint names and bodies following Cloud Hypervisor's public
//! API where they overlap. The document is `docs/openapi.yaml`.
//!
//! The server runs on its own thread ([`start_api_server`]). It parses each HTTP request ([`http`]), maps it to an
//! [`ApiRequest`] ([`routes`]), and hands it to the VMM through an [`ApiSender`]: a channel plus an eventfd the VMM's
//! epoll loop watches. The VMM answers each request with an [`ApiResponse`] on the channel that came with it. The
//! server never touches VM state itself.
//!
//! Connections: the server keeps HTTP/1.1 connections open (`Connection: keep-alive` is the default; `Connection:
//! close` or HTTP/1.0 without keep-alive closes after the response) and answers the requests of one connection in
//! order, one at a time (pipelined requests are fine). All connections are served by the one thread; while the VMM
//! works on a request, the other connections wait. Idle connections stay open until their peer closes them; at most
//! 256 are served at once, and more are answered 503 and closed.
//!
//! [`client`] is the matching client, used by `atrium-remote` and the tests.

pub mod client;
pub mod http;
pub mod routes;
mod server;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::VmConfig;

/// What a client asks the VMM to do.
#[derive(Debug)]
pub enum ApiRequest {
    /// `GET /api/v1/vmm.ping`: is the VMM alive? Answer with a [`VmmPingResponse`].
    VmmPing,
    /// `PUT /api/v1/vmm.shutdown`: stop the VM (if any) and exit the VMM.
    VmmShutdown,
    /// `PUT /api/v1/vm.create`: remember this (already validated) configuration; boot it with `VmBoot`.
    VmCreate(Box<crate::config::VmConfig>),
    /// `PUT /api/v1/vm.boot`: boot the created VM.
    VmBoot,
    /// `GET /api/v1/vm.info`: answer with a [`VmInfo`].
    VmInfo,
    /// `GET /api/v1/vm.counters`: answer with [`VmCounters`].
    VmCounters,
    /// `PUT /api/v1/vm.pause`: stop the vCPUs.
    VmPause,
    /// `PUT /api/v1/vm.resume`: restart paused vCPUs.
    VmResume,
    /// `PUT /api/v1/vm.reboot`: reset the VM.
    VmReboot,
    /// `PUT /api/v1/vm.power-button`: press the ACPI power button.
    VmPowerButton,
    /// `PUT /api/v1/vm.shutdown`: stop the VM; the VMM keeps running.
    VmShutdown,
    /// `PUT /api/v1/vm.resize`: change the vCPU count and/or the memory size.
    VmResize(VmResizeData),
    /// `PUT /api/v1/vm.add-disk`: hot-plug a block device (image already checked to open).
    VmAddDisk(crate::config::DiskConfig),
    /// `PUT /api/v1/vm.add-net`: hot-plug a network device.
    VmAddNet(crate::config::NetConfig),
    /// `PUT /api/v1/vm.add-vsock`: hot-plug a vsock device.
    VmAddVsock(crate::config::VsockConfig),
    /// `PUT /api/v1/vm.remove-device`: hot-unplug the device with this id.
    VmRemoveDevice(VmRemoveDeviceData),
}

/// The body of `vm.resize`. At least one field is present; `desired_vcpus` is at least 1 and `desired_ram` is a
/// whole number of pages of at least the minimum guest memory (the server checks this much; the VMM checks the rest).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmResizeData {
    /// The vCPU count to reach.
    pub desired_vcpus: Option<u32>,
    /// The guest memory size to reach, in bytes.
    pub desired_ram: Option<u64>,
}

/// The body of `vm.remove-device`. The server checks the id is non-empty letters, digits, `-` and `_`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmRemoveDeviceData {
    /// The id given when the device was added.
    pub id: String,
}

/// The VMM's answer to one [`ApiRequest`].
#[derive(Clone, Debug, PartialEq)]
pub enum ApiResponse {
    /// 204 No Content
    Done,
    /// 200 with a JSON body
    Json(serde_json::Value),
    /// an error: status (400, 404, 405, 409, 500, 503...) and a one-line message
    Error {
        /// The HTTP status; anything outside 400..=599 is sent as 500.
        status: u16,
        /// What is wrong and what to do, on one line.
        message: String,
    },
}

impl ApiResponse {
    /// A 200 answer with `value` serialized as its body (a 500 if it cannot be serialized).
    pub fn json<T: Serialize>(value: &T) -> ApiResponse {
        match serde_json::to_value(value) {
            Ok(v) => ApiResponse::Json(v),
            Err(e) => ApiResponse::error(500, format!("cannot encode the answer as JSON: {e}")),
        }
    }

    /// An error answer.
    pub fn error(status: u16, message: impl Into<String>) -> ApiResponse {
        ApiResponse::Error {
            status,
            message: message.into(),
        }
    }
}

/// The body of `vmm.ping`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct VmmPingResponse {
    /// The VMM's version (its package version).
    pub version: String,
    /// The VMM's process id.
    pub pid: u32,
    /// Optional features this build has.
    #[serde(default)]
    pub features: Vec<String>,
}

/// A device on the PCI bus: what `vm.add-*` answers and what `vm.info` lists.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct PciDeviceInfo {
    /// The device's id (given, or assigned by the VMM).
    pub id: String,
    /// Segment, bus, device and function: `0000:00:05.0`.
    pub bdf: String,
}

/// The body of `vm.info`. Fields other than `state` are present once there is a VM to describe.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct VmInfo {
    /// The lifecycle state: `NotCreated`, `Created`, `Running` or `Paused`.
    pub state: String,
    /// The configuration in effect (after any resize and hot-plug); `null` before `vm.create`.
    #[serde(default)]
    pub config: Option<VmConfig>,
    /// vCPUs running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Guest memory plugged in now, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_actual_size: Option<u64>,
    /// The PCI devices, in slot order.
    #[serde(default)]
    pub devices: Vec<PciDeviceInfo>,
}

/// The body of `vm.counters`: device id to counter name to value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

/// What the server hands to the VMM: the request and where to send the answer. After sending, the server writes
/// to `notify` so the VMM's epoll loop wakes.
pub struct ApiSender {
    /// Requests, each with the channel for its answer.
    pub requests: std::sync::mpsc::Sender<(ApiRequest, std::sync::mpsc::Sender<ApiResponse>)>,
    /// Written after every request sent.
    pub notify: vmm_sys_util::eventfd::EventFd,
}

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something that is not a socket is at the path.
    #[error("--api-socket {}: {kind} is in the way; remove it or choose another path", path.display())]
    PathInUse {
        /// The socket path.
        path: PathBuf,
        /// What is there, e.g. "a regular file".
        kind: &'static str,
    },
    /// Another process serves the socket.
    #[error("--api-socket {}: another process is serving this socket; stop it or choose another path", path.display())]
    SocketLive {
        /// The socket path.
        path: PathBuf,
    },
    /// The old socket file could not be removed.
    #[error("--api-socket {}: cannot remove the stale socket: {source}", path.display())]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Binding failed.
    #[error("--api-socket {}: cannot listen on it: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Setting up the server's own descriptors or thread failed.
    #[error("API server: cannot {what}: {source}")]
    Setup {
        /// The step, e.g. "create its epoll instance".
        what: &'static str,
        /// What the OS said.
        source: io::Error,
    },
}

/// State the server thread shares with its handle.
#[derive(Default)]
struct Shared {
    /// Set once shutdown starts; the thread checks it after every wake-up and while waiting for the VMM.
    stopping: AtomicBool,
}

impl Shared {
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// The running API server. Dropping it shuts the server down as [`ApiServerHandle::shutdown`] does.
pub struct ApiServerHandle {
    thread: Option<JoinHandle<()>>,
    wake: EventFd,
    shared: Arc<Shared>,
    socket_path: PathBuf,
}

impl ApiServerHandle {
    /// Stops the server thread (closing every connection, answering a request still waiting for the VMM with 503)
    /// and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// The socket the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop();
        if let Err(e) = self.wake.write(1) {
            tracing::error!("API server: cannot signal its thread to stop: {e}");
        }
        if thread.join().is_err() {
            tracing::error!("API server: its thread panicked");
        }
        if let Err(e) = std::fs::remove_file(&self.socket_path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(
                    "API server: cannot remove {}: {e}",
                    self.socket_path.display()
                );
            }
        }
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `socket_path` (removing a stale socket file left by a process that is gone, never any other kind of file)
/// and spawns the server thread.
pub fn start_api_server(
    socket_path: &Path,
    sender: ApiSender,
) -> Result<ApiServerHandle, ApiError> {
    let listener = bind(socket_path)?;
    let setup = |what| move |source| ApiError::Setup { what, source };
    listener
        .set_nonblocking(true)
        .map_err(setup("make the listening socket non-blocking"))?;
    let wake = EventFd::new(EFD_NONBLOCK).map_err(setup("create its wake-up eventfd"))?;
    let thread_wake = wake.try_clone().map_err(setup("clone its eventfd"))?;
    let shared = Arc::new(Shared::default());
    let server = server::Server::new(listener, thread_wake, sender, Arc::clone(&shared))
        .map_err(setup("create its epoll instance"))?;
    let thread = std::thread::Builder::new()
        .name("atrium-api".into())
        .spawn(move || server.run())
        .map_err(|source| {
            // Nothing listens on the socket any more.
            let _ = std::fs::remove_file(socket_path);
            ApiError::Setup {
                what: "start its thread",
                source,
            }
        })?;
    Ok(ApiServerHandle {
        thread: Some(thread),
        wake,
        shared,
        socket_path: socket_path.to_path_buf(),
    })
}

/// Binds a listener at `path`, replacing a socket file nobody serves any more.
fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            let file_type = meta.file_type();
            if !file_type.is_socket() {
                let kind = if file_type.is_dir() {
                    "a directory"
                } else if file_type.is_file() {
                    "a regular file"
                } else if file_type.is_symlink() {
                    "a symbolic link"
                } else {
                    "a special file"
                };
                return Err(ApiError::PathInUse {
                    path: path.to_path_buf(),
                    kind,
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::SocketLive {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(|source| ApiError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ApiError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    tracing::debug!(
        "API server listening on {} (fd {})",
        path.display(),
        listener.as_raw_fd()
    );
    Ok(listener)
}

#[cfg(test)]
mod tests;
