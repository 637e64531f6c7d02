//! Carries out API requests on the VMM, inside the control loop (never on the API thread, never by locking a vCPU).

use std::sync::mpsc::{Receiver, Sender};

use serde_json::json;

use crate::api::{ApiRequest, ApiResponse, VmCounters};
use crate::control::{Next, VmState, Vmm};
use crate::vm::{BuildError, Vm};
use crate::{Error, Outcome};

/// A request and where its answer goes.
pub type ApiMessage = (ApiRequest, Sender<ApiResponse>);

fn error(status: u16, message: impl Into<String>) -> ApiResponse {
    ApiResponse::Error {
        status,
        message: message.into(),
    }
}

fn wrong_state(vmm: &Vmm, action: &str) -> ApiResponse {
    error(
        409,
        format!("cannot {action}: the VM is {}", vmm.state.name()),
    )
}

/// The HTTP status for a VMM error: the user's fault (4xx) or ours (5xx).
fn status_of(e: &Error) -> u16 {
    match e {
        Error::TooManyVcpus { .. } | Error::Build(_) | Error::Console(_) => 400,
        Error::NotCreated => 409,
        _ => 500,
    }
}

/// Handles every request waiting on `rx`. Returns `Next::Exit` for `vmm.shutdown`.
pub(crate) fn handle_api_requests(vmm: &mut Vmm, rx: &Receiver<ApiMessage>) -> Next {
    let mut next = Next::Continue;
    while let Ok((request, reply)) = rx.try_recv() {
        let (response, then) = handle(vmm, request);
        // The client may have gone away; the VMM carries on either way.
        let _ = reply.send(response);
        if let Some(n) = then {
            next = n;
        }
    }
    next
}

fn handle(vmm: &mut Vmm, request: ApiRequest) -> (ApiResponse, Option<Next>) {
    let response = match request {
        ApiRequest::VmmPing => ApiResponse::Json(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "features": ["pci", "virtio-blk", "virtio-net", "virtio-rng", "virtio-console", "virtio-vsock", "qcow2", "acpi-hotplug", "virtio-mem"],
        })),
        ApiRequest::VmmShutdown => {
            return (
                ApiResponse::Done,
                Some(Next::Exit(Ok(Outcome::Signalled(0)))),
            );
        }
        ApiRequest::VmCreate(config) => {
            if vmm.state != VmState::NotCreated {
                wrong_state(vmm, "create a VM")
            } else {
                match vmm.create(*config) {
                    Ok(()) => ApiResponse::Done,
                    Err(e) => error(status_of(&e), e.to_string()),
                }
            }
        }
        ApiRequest::VmBoot => {
            if vmm.state != VmState::Created {
                wrong_state(vmm, "boot")
            } else {
                match vmm.boot() {
                    Ok(()) => ApiResponse::Done,
                    Err(e) => error(status_of(&e), e.to_string()),
                }
            }
        }
        ApiRequest::VmInfo => info(vmm),
        ApiRequest::VmCounters => counters(vmm),
        ApiRequest::VmPause => {
            if vmm.pause() {
                ApiResponse::Done
            } else {
                wrong_state(vmm, "pause")
            }
        }
        ApiRequest::VmResume => {
            if vmm.resume() {
                ApiResponse::Done
            } else {
                wrong_state(vmm, "resume")
            }
        }
        ApiRequest::VmReboot => match vmm.state {
            VmState::Running | VmState::Paused => match vmm.reboot() {
                Ok(()) => ApiResponse::Done,
                Err(e) => return (error(500, e.to_string()), Some(Next::Exit(Err(e)))),
            },
            _ => wrong_state(vmm, "reboot"),
        },
        ApiRequest::VmShutdown => match vmm.state {
            VmState::Running | VmState::Paused => {
                vmm.stop_vm();
                ApiResponse::Done
            }
            _ => wrong_state(vmm, "shut down"),
        },
        ApiRequest::VmPowerButton => match (&vmm.vm, vmm.state) {
            (Some(vm), VmState::Running) => {
                vm.devices().power_button();
                ApiResponse::Done
            }
            _ => wrong_state(vmm, "press the power button"),
        },
        ApiRequest::VmResize(resize) => {
            if let Some(ram) = resize.desired_ram {
                let response = match (&mut vmm.vm, vmm.state) {
                    (Some(vm), VmState::Running) => match vm.resize_memory(ram) {
                        Ok(()) => ApiResponse::Done,
                        Err(e) => error(400, e),
                    },
                    _ => wrong_state(vmm, "resize"),
                };
                if !matches!(response, ApiResponse::Done) || resize.desired_vcpus.is_none() {
                    return (response, None);
                }
            }
            match resize.desired_vcpus {
                Some(n) => resize_vcpus(vmm, n),
                None => error(400, "give desired_vcpus or desired_ram"),
            }
        }
        ApiRequest::VmAddDisk(disk) => hot_add(vmm, "add a disk", |vm| vm.hotplug_disk(&disk)),
        ApiRequest::VmAddNet(net) => {
            hot_add(vmm, "add a network device", |vm| vm.hotplug_net(&net))
        }
        ApiRequest::VmAddVsock(vsock) => {
            hot_add(vmm, "add a vsock device", |vm| vm.hotplug_vsock(&vsock))
        }
        ApiRequest::VmRemoveDevice(remove) => match (&mut vmm.vm, vmm.state) {
            (Some(vm), VmState::Running) if vm.is_virtio_mem(&remove.id) => error(
                409,
                format!(
                    "'{}' is the virtio-mem device; shrink the memory with vm.resize instead of removing it",
                    remove.id
                ),
            ),
            (Some(vm), VmState::Running) => match vm.devices_mut().request_unplug(&remove.id) {
                Ok(true) => ApiResponse::Done,
                Ok(false) => error(
                    404,
                    format!("no hot-removable device called '{}'", remove.id),
                ),
                Err(e) => error(409, e.to_string()),
            },
            _ => wrong_state(vmm, "remove a device"),
        },
    };
    (response, None)
}

/// Hot-adds a device on a running VM with `add`, answering its id and PCI address.
fn hot_add(
    vmm: &mut Vmm,
    action: &str,
    add: impl FnOnce(&mut Vm) -> Result<(String, u8), BuildError>,
) -> ApiResponse {
    match (&mut vmm.vm, vmm.state) {
        (Some(vm), VmState::Running) => match add(vm) {
            Ok((id, slot)) => {
                ApiResponse::Json(json!({"id": id, "bdf": format!("0000:00:{slot:02x}.0")}))
            }
            Err(e) => error(400, e.to_string()),
        },
        _ => wrong_state(vmm, action),
    }
}

/// Grows or shrinks the running vCPUs to `desired` (between the boot and the maximum count).
fn resize_vcpus(vmm: &mut Vmm, desired: u32) -> ApiResponse {
    let Some(config) = &vmm.config else {
        return wrong_state(vmm, "resize");
    };
    let (boot, max) = (config.cpus.boot_vcpus, config.cpus.max_vcpus);
    if desired < boot || desired > max {
        return error(
            400,
            format!(
                "desired_vcpus={desired} is outside {boot}..={max} (the boot and max vCPU counts)"
            ),
        );
    }
    let state = vmm.state;
    let Some(vm) = vmm.vm.as_mut() else {
        return error(409, "cannot resize: the VM is not running");
    };
    if state != VmState::Running {
        return error(409, format!("cannot resize: the VM is {}", state.name()));
    }
    let current = vm.vcpu_ids();
    for id in 0..max {
        let running = current.contains(&id);
        if id < desired && !running {
            if let Err(e) = vm.hotplug_vcpu(id) {
                return error(500, e.to_string());
            }
            if let Err(e) = vm.devices().cpu_added(id) {
                return error(500, e.to_string());
            }
        } else if id >= desired && running {
            if let Err(e) = vm.devices().cpu_removal_requested(id) {
                return error(409, e.to_string());
            }
        }
    }
    ApiResponse::Done
}

fn info(vmm: &Vmm) -> ApiResponse {
    let mut body = json!({
        "state": vmm.state.name(),
        "config": vmm.config,
    });
    if let Some(vm) = &vmm.vm {
        body["vcpus"] = json!(vm.vcpu_count());
        body["memory_actual_size"] = json!(vm.ram_size());
        let devices: Vec<_> = vm
            .devices()
            .virtio_devices()
            .map(|(name, slot)| json!({"id": name, "bdf": format!("0000:00:{slot:02x}.0")}))
            .collect();
        body["devices"] = json!(devices);
    }
    ApiResponse::Json(body)
}

/// `vm.counters`: each virtio device's counters under its id, and the VMM's own under "vmm".
fn counters(vmm: &Vmm) -> ApiResponse {
    let Some(vm) = &vmm.vm else {
        return wrong_state(vmm, "read counters");
    };
    let mut counters = VmCounters::new();
    for (id, values) in vm.devices().virtio_counters() {
        let values = values
            .into_iter()
            .map(|(name, value)| (name.to_string(), value))
            .collect();
        counters.insert(id.to_string(), values);
    }
    let (pio, mmio) = vm.unclaimed_accesses();
    let own = [
        ("unclaimed_port_accesses".to_string(), pio),
        ("unclaimed_mmio_accesses".to_string(), mmio),
    ];
    if counters.insert("vmm".to_string(), own.into()).is_some() {
        tracing::warn!("vm.counters: a device called 'vmm' is hidden by the VMM's own counters");
    }
    ApiResponse::json(&counters)
}
