//! The API document (docs/openapi.yaml) against the server: the same endpoints and methods, request bodies exactly
//! where the router wants one, and the schemas' fields equal to what the Rust types serialize.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_yaml::{to_value, Mapping, Value};
use vmm::api::routes::{route, RouteError, ROUTES};
use vmm::api::{PciDeviceInfo, VmInfo, VmRemoveDeviceData, VmResizeData, VmmPingResponse};
use vmm::config::{DiskConfig, NetConfig, RngConfig, VmConfig, VsockConfig};

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn document() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn map<'a>(value: &'a Value, key: &str) -> &'a Mapping {
    value
        .get(key)
        .and_then(Value::as_mapping)
        .unwrap_or_else(|| panic!("'{key}' is missing or not a mapping"))
}

/// The path part of the first server URL, e.g. "/api/v1".
fn base_path(doc: &Value) -> String {
    let url = doc["servers"][0]["url"].as_str().unwrap();
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
    path.trim_end_matches('/').to_string()
}

/// (METHOD, full path, operation) for every operation in the document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let base = base_path(doc);
    let mut out = Vec::new();
    for (path, item) in map(doc, "paths") {
        let path = path.as_str().unwrap();
        for (method, op) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            assert!(
                METHODS.contains(&method),
                "{path}: '{method}' is not an HTTP method"
            );
            out.push((method.to_uppercase(), format!("{base}{path}"), op.clone()));
        }
    }
    out
}

#[test]
fn document_and_router_have_the_same_endpoints() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0."));
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(ROUTES.len(), served.len(), "ROUTES has a duplicate");
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(missing.is_empty(), "served but not documented: {missing:?}");
    assert!(extra.is_empty(), "documented but not served: {extra:?}");
}

#[test]
fn request_bodies_are_documented_exactly_where_the_router_needs_one() {
    let doc = document();
    for (method, path, op) in operations(&doc) {
        let documented = op.get("requestBody").is_some();
        let needs_body = matches!(
            route(&method, &path, b""),
            Err(RouteError::BadRequest(ref m)) if m.contains("needs a JSON body")
        );
        assert_eq!(documented, needs_body, "{method} {path}");
        let responses = op["responses"].as_mapping().unwrap();
        assert!(
            responses
                .keys()
                .any(|k| k.as_str().is_some_and(|s| s.starts_with('2'))),
            "{method} {path} documents no success status"
        );
        for status in responses.keys() {
            let status: u16 = status.as_str().unwrap().parse().unwrap();
            assert!((200..600).contains(&status), "{method} {path}: {status}");
        }
    }
}

/// Every `$ref` in `value`.
fn refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Mapping(m) => {
            for (k, v) in m {
                if k.as_str() == Some("$ref") {
                    out.push(v.as_str().unwrap().to_string());
                } else {
                    refs(v, out);
                }
            }
        }
        Value::Sequence(s) => s.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_reference_resolves() {
    let doc = document();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let mut at = &doc;
        let pointer = r
            .strip_prefix("#/")
            .unwrap_or_else(|| panic!("{r}: not local"));
        for part in pointer.split('/') {
            at = at
                .get(part)
                .unwrap_or_else(|| panic!("{r} does not resolve"));
        }
    }
}

/// The property names of schema `name` equal the keys of `serialized` (a Rust value serialized).
fn check_schema(doc: &Value, name: &str, serialized: Value) {
    let schema = &doc["components"]["schemas"][name];
    let documented: BTreeSet<String> = map(schema, "properties")
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let actual: BTreeSet<String> = serialized
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        documented, actual,
        "schema {name} differs from the Rust type"
    );
    if let Some(required) = schema.get("required").and_then(Value::as_sequence) {
        for field in required {
            assert!(
                actual.contains(field.as_str().unwrap()),
                "{name}: {field:?}"
            );
        }
    }
}

#[test]
fn schemas_match_the_rust_types() {
    let doc = document();
    let config = VmConfig::default();
    check_schema(&doc, "VmConfig", to_value(&config).unwrap());
    check_schema(&doc, "CpusConfig", to_value(&config.cpus).unwrap());
    check_schema(&doc, "MemoryConfig", to_value(&config.memory).unwrap());
    check_schema(&doc, "PayloadConfig", to_value(&config.payload).unwrap());
    check_schema(&doc, "RngConfig", to_value(RngConfig::default()).unwrap());
    check_schema(
        &doc,
        "DiskConfig",
        to_value(DiskConfig::parse("path=/d.img").unwrap()).unwrap(),
    );
    check_schema(
        &doc,
        "NetConfig",
        to_value(NetConfig::parse("tap=").unwrap()).unwrap(),
    );
    check_schema(
        &doc,
        "VsockConfig",
        to_value(VsockConfig::parse("cid=3,socket=/v").unwrap()).unwrap(),
    );
    let resize = VmResizeData {
        desired_vcpus: Some(2),
        desired_ram: None,
    };
    check_schema(&doc, "VmResizeData", to_value(&resize).unwrap());
    check_schema(
        &doc,
        "VmRemoveDeviceData",
        to_value(&VmRemoveDeviceData { id: "d".into() }).unwrap(),
    );
    let device = PciDeviceInfo {
        id: "d".into(),
        bdf: "0000:00:01.0".into(),
    };
    check_schema(&doc, "PciDeviceInfo", to_value(&device).unwrap());
    let ping = VmmPingResponse {
        version: "0".into(),
        pid: 1,
        features: vec![],
    };
    check_schema(&doc, "VmmPingResponse", to_value(&ping).unwrap());
    let info = VmInfo {
        state: "Running".into(),
        config: Some(config),
        vcpus: Some(1),
        memory_actual_size: Some(1),
        devices: vec![device],
    };
    check_schema(&doc, "VmInfo", to_value(&info).unwrap());
}
