//! Control-API benchmark; prints JSON. Run: `cargo run --release --example api_bench` (after `cargo build --release`).
//!
//! Starts the release `atrium` with `--api-socket` on the in-tree guest's `hotplug` action, then measures:
//! - `ping` and `info` round trips (median and p99 over 1000 calls each, one connection per call),
//! - `resize` to one more vCPU until the guest reports the new CPU online,
//! - `add-disk` until the guest has found the new function in PCI config space.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use vmm::api::client::ApiClient;

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let top = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let atrium = top.join("target/release/atrium");
    let dir = std::env::temp_dir().join(format!("atrium-api-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("api.sock");
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let mut child = Command::new(&atrium)
        .arg("--kernel")
        .arg(guests::path("report.bzImage"))
        .args(["--cmdline", "action=hotplug", "--cpus", "boot=1,max=2"])
        .arg("--api-socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start atrium (build it with cargo build --release first)");
    let (tx, rx) = channel::<(Instant, String)>();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    let wait_for = |prefix: &str| -> Instant {
        loop {
            let (at, line) = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("guest output");
            if line.starts_with(prefix) {
                return at;
            }
        }
    };
    wait_for("hotplug: ready");
    let client = ApiClient::new(&socket);

    let mut result = serde_json::Map::new();
    for endpoint in ["vmm.ping", "vm.info"] {
        let mut times = Vec::with_capacity(1000);
        for _ in 0..1000 {
            let start = Instant::now();
            client.request("GET", endpoint, None).expect("API call");
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
        result.insert(
            endpoint.to_string(),
            serde_json::json!({
                "median_us": (percentile(times.clone(), 0.5) * 10.0).round() / 10.0,
                "p99_us": (percentile(times, 0.99) * 10.0).round() / 10.0,
                "calls": 1000,
            }),
        );
    }

    let start = Instant::now();
    client
        .request("PUT", "vm.resize", Some(br#"{"desired_vcpus": 2}"#))
        .expect("resize");
    let online = wait_for("cpuhp: cpu 1 online");
    result.insert(
        "resize_cpus_plus_one_ms".into(),
        serde_json::json!((online - start).as_secs_f64() * 1e3),
    );

    let body =
        serde_json::json!({"path": disk, "num_queues": 1, "queue_size": 256, "id": "bench0"});
    let start = Instant::now();
    client
        .request("PUT", "vm.add-disk", Some(body.to_string().as_bytes()))
        .expect("add-disk");
    let seen = wait_for("pcihp: slot ");
    result.insert(
        "add_disk_until_guest_sees_it_ms".into(),
        serde_json::json!((seen - start).as_secs_f64() * 1e3),
    );
    let _ = client.request("PUT", "vmm.shutdown", None);
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!("{}", serde_json::Value::Object(result));
}
