//! The endpoint table and the mapping from (method, path, body) to an [`ApiRequest`], with the checks that need no
//! VM state: JSON syntax, unknown fields, [`VmConfig::validate`], and the simple value rules of each body.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::{ApiRequest, VmRemoveDeviceData, VmResizeData};
use crate::config::{
    DiskConfig, NetConfig, VmConfig, VsockConfig, MAX_VCPUS, MEMORY_ALIGNMENT, MIN_MEMORY_SIZE,
};

/// The prefix every endpoint path starts with.
pub const PREFIX: &str = "/api/v1/";

/// Every endpoint: (method, path). `docs/openapi.yaml` documents exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/vmm.ping"),
    ("PUT", "/api/v1/vmm.shutdown"),
    ("PUT", "/api/v1/vm.create"),
    ("PUT", "/api/v1/vm.boot"),
    ("GET", "/api/v1/vm.info"),
    ("GET", "/api/v1/vm.counters"),
    ("PUT", "/api/v1/vm.pause"),
    ("PUT", "/api/v1/vm.resume"),
    ("PUT", "/api/v1/vm.reboot"),
    ("PUT", "/api/v1/vm.power-button"),
    ("PUT", "/api/v1/vm.shutdown"),
    ("PUT", "/api/v1/vm.resize"),
    ("PUT", "/api/v1/vm.add-disk"),
    ("PUT", "/api/v1/vm.add-net"),
    ("PUT", "/api/v1/vm.add-vsock"),
    ("PUT", "/api/v1/vm.remove-device"),
];

/// A request the router refuses, with the status to answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No endpoint has this path.
    #[error("no endpoint {path}; see docs/openapi.yaml for the API (e.g. GET {PREFIX}vmm.ping)")]
    NotFound {
        /// The path asked for.
        path: String,
    },
    /// The endpoint exists but not with this method.
    #[error("{path} does not accept {method}; use {allow}")]
    MethodNotAllowed {
        /// The path.
        path: String,
        /// The method used.
        method: String,
        /// The method(s) it accepts, comma-separated.
        allow: String,
    },
    /// The body is not what the endpoint takes.
    #[error("{0}")]
    BadRequest(String),
}

impl RouteError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound { .. } => 404,
            RouteError::MethodNotAllowed { .. } => 405,
            RouteError::BadRequest(_) => 400,
        }
    }

    /// The `Allow` header for a 405.
    pub fn allow(&self) -> Option<&str> {
        match self {
            RouteError::MethodNotAllowed { allow, .. } => Some(allow),
            _ => None,
        }
    }
}

/// Maps one HTTP request to the VMM request it stands for. Bodies are ignored by endpoints that take none.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, RouteError> {
    let allowed: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, p)| *p == path)
        .map(|(m, _)| *m)
        .collect();
    if allowed.is_empty() {
        return Err(RouteError::NotFound {
            path: path.to_string(),
        });
    }
    if !allowed.contains(&method) {
        return Err(RouteError::MethodNotAllowed {
            path: path.to_string(),
            method: method.to_string(),
            allow: allowed.join(", "),
        });
    }
    let endpoint = path.strip_prefix(PREFIX).unwrap_or(path);
    Ok(match endpoint {
        "vmm.ping" => ApiRequest::VmmPing,
        "vmm.shutdown" => ApiRequest::VmmShutdown,
        "vm.create" => {
            let config: VmConfig = parse_body(endpoint, body)?;
            config
                .validate()
                .map_err(|e| RouteError::BadRequest(e.to_string()))?;
            ApiRequest::VmCreate(Box::new(config))
        }
        "vm.boot" => ApiRequest::VmBoot,
        "vm.info" => ApiRequest::VmInfo,
        "vm.counters" => ApiRequest::VmCounters,
        "vm.pause" => ApiRequest::VmPause,
        "vm.resume" => ApiRequest::VmResume,
        "vm.reboot" => ApiRequest::VmReboot,
        "vm.power-button" => ApiRequest::VmPowerButton,
        "vm.shutdown" => ApiRequest::VmShutdown,
        "vm.resize" => {
            let resize: VmResizeData = parse_body(endpoint, body)?;
            check_resize(&resize)?;
            ApiRequest::VmResize(resize)
        }
        "vm.add-disk" => {
            let disk: DiskConfig = parse_body(endpoint, body)?;
            check_id(endpoint, disk.id.as_deref())?;
            disk.validate()
                .map_err(|e| RouteError::BadRequest(e.to_string()))?;
            ApiRequest::VmAddDisk(disk)
        }
        "vm.add-net" => {
            let net: NetConfig = parse_body(endpoint, body)?;
            check_id(endpoint, net.id.as_deref())?;
            ApiRequest::VmAddNet(net)
        }
        "vm.add-vsock" => {
            let vsock: VsockConfig = parse_body(endpoint, body)?;
            check_id(endpoint, vsock.id.as_deref())?;
            ApiRequest::VmAddVsock(vsock)
        }
        "vm.remove-device" => {
            let remove: VmRemoveDeviceData = parse_body(endpoint, body)?;
            check_id(endpoint, Some(&remove.id))?;
            ApiRequest::VmRemoveDevice(remove)
        }
        _ => {
            return Err(RouteError::NotFound {
                path: path.to_string(),
            })
        }
    })
}

/// Parses a JSON body into `T`, rejecting fields `T` does not have (also where `T` itself would ignore them).
fn parse_body<T: DeserializeOwned + Serialize>(
    endpoint: &str,
    body: &[u8],
) -> Result<T, RouteError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RouteError::BadRequest(format!(
            "{endpoint} needs a JSON body (with a Content-Length header); see docs/openapi.yaml"
        )));
    }
    let bad = |e: serde_json::Error| {
        RouteError::BadRequest(one_line(&format!("{endpoint}: invalid JSON body: {e}")))
    };
    let parsed: T = serde_json::from_slice(body).map_err(bad)?;
    let given: Value = serde_json::from_slice(body).map_err(bad)?;
    let understood = serde_json::to_value(&parsed).map_err(bad)?;
    if let Some(field) = unknown_field(&given, &understood, "") {
        return Err(RouteError::BadRequest(one_line(&format!(
            "{endpoint}: unknown field '{field}'; remove it (see docs/openapi.yaml for the fields)"
        ))));
    }
    Ok(parsed)
}

/// The first object key in `given` that `understood` (the parsed value serialized again) lacks, as a dotted path.
/// A key given as `null` that serializes to nothing counts as understood.
fn unknown_field(given: &Value, understood: &Value, at: &str) -> Option<String> {
    match (given, understood) {
        (Value::Object(given), Value::Object(understood)) => {
            given.iter().find_map(|(key, value)| {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                match understood.get(key) {
                    Some(inner) => unknown_field(value, inner, &path),
                    None if value.is_null() => None,
                    None => Some(path),
                }
            })
        }
        (Value::Array(given), Value::Array(understood)) => given
            .iter()
            .zip(understood)
            .enumerate()
            .find_map(|(i, (g, u))| unknown_field(g, u, &format!("{at}[{i}]"))),
        _ => None,
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

/// `vm.resize`: something to change, at least one vCPU, whole pages of at least the minimum memory.
fn check_resize(resize: &VmResizeData) -> Result<(), RouteError> {
    let bad = |m: String| Err(RouteError::BadRequest(m));
    match (resize.desired_vcpus, resize.desired_ram) {
        (None, None) => {
            return bad("vm.resize: give desired_vcpus, desired_ram or both".into());
        }
        (Some(0), _) => {
            return bad("vm.resize: desired_vcpus is 0; the VM needs at least one vCPU".into())
        }
        (Some(n), _) if n > MAX_VCPUS => {
            return bad(format!(
                "vm.resize: desired_vcpus is {n}; at most {MAX_VCPUS} vCPUs are supported"
            ))
        }
        _ => {}
    }
    if let Some(ram) = resize.desired_ram {
        if ram < MIN_MEMORY_SIZE {
            return bad(format!(
                "vm.resize: desired_ram is {ram} bytes; the guest needs at least {MIN_MEMORY_SIZE}"
            ));
        }
        if !ram.is_multiple_of(MEMORY_ALIGNMENT) {
            return bad(format!(
                "vm.resize: desired_ram {ram} is not a multiple of {MEMORY_ALIGNMENT} bytes; use whole pages"
            ));
        }
    }
    Ok(())
}

/// A device id, when given, is non-empty letters, digits, `-` and `_` (as on the command line).
fn check_id(endpoint: &str, id: Option<&str>) -> Result<(), RouteError> {
    match id {
        Some(id)
            if id.is_empty()
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Err(RouteError::BadRequest(one_line(&format!(
                "{endpoint}: id '{id}' is not valid; use letters, digits, '-' and '_'"
            ))))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn bad(method: &str, path: &str, body: &str) -> (u16, String) {
        let e = route(method, path, body.as_bytes()).unwrap_err();
        (e.status(), e.to_string())
    }

    fn kernel_file() -> tempfile_like::TempFile {
        tempfile_like::TempFile::new(b"not really a kernel")
    }

    /// A small self-removing temporary file (the crate has no tempfile dependency).
    mod tempfile_like {
        use std::path::PathBuf;
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct TempFile(pub PathBuf);

        impl TempFile {
            pub fn new(contents: &[u8]) -> Self {
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "atrium-routes-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&path, contents).unwrap();
                TempFile(path)
            }
        }

        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn vm_json(kernel: &std::path::Path) -> Value {
        let mut config = VmConfig::default();
        config.payload.kernel = crate::config::KernelSource::Path(kernel.to_path_buf());
        config.memory.size = 64 << 20;
        serde_json::to_value(&config).unwrap()
    }

    #[test]
    fn every_route_builds_its_request() {
        let kernel = kernel_file();
        let disk = kernel_file();
        for (method, path) in ROUTES {
            let body = match *path {
                "/api/v1/vm.create" => vm_json(&kernel.0).to_string(),
                "/api/v1/vm.resize" => r#"{"desired_vcpus": 2}"#.to_string(),
                "/api/v1/vm.add-disk" => serde_json::to_string(
                    &DiskConfig::parse(&format!("path={},id=disk9", disk.0.display())).unwrap(),
                )
                .unwrap(),
                "/api/v1/vm.add-net" => {
                    serde_json::to_string(&NetConfig::parse("tap=,id=net2").unwrap()).unwrap()
                }
                "/api/v1/vm.add-vsock" => {
                    serde_json::to_string(&VsockConfig::parse("cid=3,socket=/run/v.sock").unwrap())
                        .unwrap()
                }
                "/api/v1/vm.remove-device" => r#"{"id": "disk9"}"#.to_string(),
                _ => String::new(),
            };
            let req = route(method, path, body.as_bytes())
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            let expected = path.strip_prefix(PREFIX).unwrap();
            let name = match req {
                ApiRequest::VmmPing => "vmm.ping",
                ApiRequest::VmmShutdown => "vmm.shutdown",
                ApiRequest::VmCreate(c) => {
                    assert_eq!(c.memory.size, 64 << 20);
                    "vm.create"
                }
                ApiRequest::VmBoot => "vm.boot",
                ApiRequest::VmInfo => "vm.info",
                ApiRequest::VmCounters => "vm.counters",
                ApiRequest::VmPause => "vm.pause",
                ApiRequest::VmResume => "vm.resume",
                ApiRequest::VmReboot => "vm.reboot",
                ApiRequest::VmPowerButton => "vm.power-button",
                ApiRequest::VmShutdown => "vm.shutdown",
                ApiRequest::VmResize(r) => {
                    assert_eq!(r.desired_vcpus, Some(2));
                    assert_eq!(r.desired_ram, None);
                    "vm.resize"
                }
                ApiRequest::VmAddDisk(d) => {
                    assert_eq!(d.id.as_deref(), Some("disk9"));
                    assert_eq!(d.path, disk.0);
                    "vm.add-disk"
                }
                ApiRequest::VmAddNet(n) => {
                    assert_eq!(n.id.as_deref(), Some("net2"));
                    "vm.add-net"
                }
                ApiRequest::VmAddVsock(v) => {
                    assert_eq!(v.cid, 3);
                    "vm.add-vsock"
                }
                ApiRequest::VmRemoveDevice(r) => {
                    assert_eq!(r.id, "disk9");
                    "vm.remove-device"
                }
            };
            assert_eq!(name, expected);
        }
    }

    #[test]
    fn every_route_rejects_other_methods_with_allow() {
        for (method, path) in ROUTES {
            for other in ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD"] {
                if other == *method {
                    continue;
                }
                let e = route(other, path, b"").unwrap_err();
                assert_eq!(e.status(), 405, "{other} {path}");
                assert_eq!(e.allow(), Some(*method));
                assert_eq!(
                    e.to_string(),
                    format!("{path} does not accept {other}; use {method}")
                );
            }
        }
    }

    #[test]
    fn unknown_paths_are_404() {
        for path in [
            "/",
            "/api/v1/",
            "/api/v1/vm.nope",
            "/api/v2/vm.info",
            "/api/v1/vm.info/",
        ] {
            let (status, message) = bad("GET", path, "");
            assert_eq!(status, 404, "{path}");
            assert!(
                message.starts_with(&format!("no endpoint {path};")),
                "{message}"
            );
        }
        // Method names are case-sensitive: "get" is not GET.
        assert_eq!(bad("get", "/api/v1/vm.info", "").0, 405);
    }

    #[test]
    fn bodyless_endpoints_ignore_a_body() {
        assert!(matches!(
            route("PUT", "/api/v1/vm.boot", b"{\"x\":1}"),
            Ok(ApiRequest::VmBoot)
        ));
    }

    #[test]
    fn malformed_json_is_400_on_one_line() {
        let (status, message) = bad("PUT", "/api/v1/vm.resize", "{\"desired_vcpus\":\n 4,");
        assert_eq!(status, 400);
        assert!(
            message.starts_with("vm.resize: invalid JSON body: "),
            "{message}"
        );
        assert!(message.contains("line 2"), "{message}");
        assert!(!message.contains('\n'));
        let (status, message) = bad("PUT", "/api/v1/vm.resize", "");
        assert_eq!(status, 400);
        assert!(message.contains("needs a JSON body"), "{message}");
        let (_, message) = bad("PUT", "/api/v1/vm.resize", r#"{"desired_vcpus": "four"}"#);
        assert!(message.contains("invalid type"), "{message}");
    }

    #[test]
    fn unknown_fields_are_400() {
        let (status, message) = bad("PUT", "/api/v1/vm.resize", r#"{"desired_cpus": 4}"#);
        assert_eq!(status, 400);
        assert!(
            message.contains("unknown field `desired_cpus`"),
            "{message}"
        );
        let (_, message) = bad(
            "PUT",
            "/api/v1/vm.remove-device",
            r#"{"id":"a","force":true}"#,
        );
        assert!(message.contains("unknown field `force`"), "{message}");

        // The config types accept unknown fields themselves; the router still refuses them, nested too.
        let kernel = kernel_file();
        let mut config = vm_json(&kernel.0);
        config["cpus"]["boot"] = 2.into();
        let (status, message) = bad("PUT", "/api/v1/vm.create", &config.to_string());
        assert_eq!(status, 400);
        assert_eq!(
            message,
            "vm.create: unknown field 'cpus.boot'; remove it (see docs/openapi.yaml for the fields)"
        );
        let mut config = vm_json(&kernel.0);
        config["disks"] =
            serde_json::json!([{"path": "/x", "num_queues": 1, "queue_size": 8, "cache": "none"}]);
        let (_, message) = bad("PUT", "/api/v1/vm.create", &config.to_string());
        assert!(message.contains("'disks[0].cache'"), "{message}");
        let net = r#"{"num_queues": 2, "queue_size": 256, "ip": "10.0.0.1"}"#;
        let (_, message) = bad("PUT", "/api/v1/vm.add-net", net);
        assert!(message.contains("unknown field 'ip'"), "{message}");
        // An explicit null for an optional field is fine.
        let net = r#"{"num_queues": 2, "queue_size": 256, "tap": null}"#;
        assert!(route("PUT", "/api/v1/vm.add-net", net.as_bytes()).is_ok());
    }

    #[test]
    fn vm_create_runs_validate() {
        let kernel = kernel_file();
        let mut config = vm_json(&kernel.0);
        config["cpus"]["boot_vcpus"] = 0.into();
        let (status, message) = bad("PUT", "/api/v1/vm.create", &config.to_string());
        assert_eq!(status, 400);
        assert_eq!(message, crate::config::ConfigError::NoVcpus.to_string());
        let mut config = vm_json(&kernel.0);
        config["payload"]["kernel"] = serde_json::json!({"path": "/nonexistent/vmlinux"});
        let (status, message) = bad("PUT", "/api/v1/vm.create", &config.to_string());
        assert_eq!(status, 400);
        assert!(
            message.starts_with("--kernel /nonexistent/vmlinux: cannot read it"),
            "{message}"
        );
        let (status, _) = bad("PUT", "/api/v1/vm.create", "[1, 2]");
        assert_eq!(status, 400);
    }

    #[test]
    fn resize_rules() {
        let msg = |body: &str| bad("PUT", "/api/v1/vm.resize", body);
        assert_eq!(msg("{}").0, 400);
        assert!(msg("{}").1.contains("give desired_vcpus"));
        assert!(msg(r#"{"desired_vcpus": 0}"#)
            .1
            .contains("at least one vCPU"));
        assert!(msg(r#"{"desired_vcpus": 256}"#).1.contains("at most 255"));
        assert!(msg(r#"{"desired_ram": 4096}"#).1.contains("at least"));
        assert!(msg(r#"{"desired_ram": 1073741825}"#)
            .1
            .contains("whole pages"));
        assert!(msg(r#"{"desired_vcpus": -1}"#).1.contains("invalid value"));
        let ok = route(
            "PUT",
            "/api/v1/vm.resize",
            br#"{"desired_ram": 1073741824}"#,
        )
        .unwrap();
        assert!(matches!(
            ok,
            ApiRequest::VmResize(VmResizeData {
                desired_vcpus: None,
                desired_ram: Some(0x4000_0000)
            })
        ));
    }

    #[test]
    fn device_bodies() {
        let (status, message) = bad("PUT", "/api/v1/vm.remove-device", r#"{"id": "a/b"}"#);
        assert_eq!(status, 400);
        assert!(message.contains("id 'a/b' is not valid"), "{message}");
        assert_eq!(
            bad("PUT", "/api/v1/vm.remove-device", r#"{"id": ""}"#).0,
            400
        );
        assert_eq!(bad("PUT", "/api/v1/vm.remove-device", r#"{}"#).0, 400);
        let disk = DiskConfig::parse("path=/nonexistent/disk.img").unwrap();
        let (status, message) = bad(
            "PUT",
            "/api/v1/vm.add-disk",
            &serde_json::to_string(&disk).unwrap(),
        );
        assert_eq!(status, 400);
        assert!(
            message.starts_with("--disk path=/nonexistent/disk.img: "),
            "{message}"
        );
        let mut vsock = serde_json::to_value(VsockConfig {
            cid: 3,
            socket: PathBuf::from("/s"),
            id: Some("v 1".into()),
        })
        .unwrap();
        assert_eq!(
            bad("PUT", "/api/v1/vm.add-vsock", &vsock.to_string()).0,
            400
        );
        vsock["id"] = Value::Null;
        assert!(route("PUT", "/api/v1/vm.add-vsock", vsock.to_string().as_bytes()).is_ok());
    }
}
