//! L1: the GPU inventory — the only user of NVML and cudarc.
//!
//! The daemon must never hold a CUDA context (one costs ~527 MiB of VRAM per GPU for the
//! daemon's whole life), so memory figures come from NVML, which needs none; cudarc (driver API,
//! no context) is the fallback for names and totals when NVML is missing. Both libraries are
//! loaded at run time: without them the daemon runs in CPU-only mode and says so. A fake
//! inventory (`fake:24GiB,80GiB+6GiB`, or a file re-read at every refresh) makes every
//! scheduling behaviour testable on machines without GPUs.

mod cuda;
mod fake;
mod nvml;

use std::collections::HashSet;

use serde::Serialize;

use crate::config::GpuSource;

/// One GPU as seen at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuInfo {
    /// Index in PCI bus order (as `nvidia-smi` and `CUDA_DEVICE_ORDER=PCI_BUS_ID` number them).
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: Option<String>,
    pub total_bytes: u64,
    /// Free memory reported by the driver, when known.
    pub free_bytes: Option<u64>,
    /// Memory used by processes that are not jobd's jobs (includes driver reservations).
    pub foreign_bytes: u64,
    pub compute_capability: Option<String>,
    pub utilization_percent: Option<u32>,
}

/// The inventory at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// "nvml", "cuda", "fake" or "none".
    pub source: &'static str,
    pub driver_version: Option<String>,
    /// Why there are no real GPUs or why figures are partial.
    pub note: Option<String>,
    pub gpus: Vec<GpuInfo>,
}

/// Where GPU facts come from; opened once, asked for a [`Snapshot`] on every refresh.
pub enum Inventory {
    None { note: String },
    Fake(fake::FakeInventory),
    Nvml(Box<nvml::NvmlInventory>),
    Cuda(cuda::CudaInventory),
}

impl Inventory {
    /// Opens the inventory. Never panics: a missing driver gives CPU-only mode with a note.
    pub fn open(source: &GpuSource) -> Inventory {
        match source {
            GpuSource::None => Inventory::None {
                note: "GPUs disabled by configuration (--gpus none)".into(),
            },
            GpuSource::Fake(gpus) => Inventory::Fake(fake::FakeInventory::fixed(gpus.clone())),
            GpuSource::FakeFile(path) => Inventory::Fake(fake::FakeInventory::file(path.clone())),
            GpuSource::Auto => match nvml::NvmlInventory::open() {
                Ok(inv) => Inventory::Nvml(Box::new(inv)),
                Err(nvml_why) => match cuda::CudaInventory::open() {
                    Ok(inv) => Inventory::Cuda(inv.with_note(format!(
                        "NVML unavailable ({nvml_why}); free memory and foreign use are unknown"
                    ))),
                    Err(cuda_why) => Inventory::None {
                        note: format!(
                            "no GPUs: CPU-only mode (NVML: {nvml_why}; CUDA: {cuda_why})"
                        ),
                    },
                },
            },
        }
    }

    /// Current facts. `is_ours(pid)` tells processes of jobd's jobs from foreign ones.
    pub fn snapshot(&self, is_ours: &dyn Fn(u32) -> bool) -> Snapshot {
        match self {
            Inventory::None { note } => Snapshot {
                source: "none",
                driver_version: None,
                note: Some(note.clone()),
                gpus: Vec::new(),
            },
            Inventory::Fake(f) => f.snapshot(),
            Inventory::Nvml(n) => n.snapshot(is_ours),
            Inventory::Cuda(c) => c.snapshot(),
        }
    }

    /// True for simulated GPUs: workers must then run on CPU.
    pub fn is_fake(&self) -> bool {
        matches!(self, Inventory::Fake(_))
    }
}

/// A process-id set helper for `is_ours`: pids whose process group is one of `pgids`.
pub fn pid_in_groups(pid: u32, pgids: &HashSet<i32>) -> bool {
    nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32)))
        .map(|g| pgids.contains(&g.as_raw()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FakeGpu;
    use crate::spec::units::ByteSize;

    #[test]
    fn fake_inventory_reports_totals_and_foreign_use() {
        let inv = Inventory::open(&GpuSource::Fake(vec![
            FakeGpu {
                total: ByteSize::gib(24),
                foreign: ByteSize(0),
            },
            FakeGpu {
                total: ByteSize::gib(80),
                foreign: ByteSize::gib(6),
            },
        ]));
        let snap = inv.snapshot(&|_| false);
        assert_eq!(snap.source, "fake");
        assert_eq!(snap.gpus.len(), 2);
        assert_eq!(snap.gpus[1].index, 1);
        assert_eq!(snap.gpus[1].total_bytes, ByteSize::gib(80).0);
        assert_eq!(snap.gpus[1].foreign_bytes, ByteSize::gib(6).0);
        assert_ne!(snap.gpus[0].uuid, snap.gpus[1].uuid);
        assert!(inv.is_fake());
    }

    #[test]
    fn auto_without_a_driver_is_cpu_only_and_says_why() {
        // This machine has no NVIDIA driver; with one present the result is a real inventory.
        let inv = Inventory::open(&GpuSource::Auto);
        let snap = inv.snapshot(&|_| false);
        if snap.source == "none" {
            assert!(snap.gpus.is_empty());
            assert!(snap.note.unwrap().contains("CPU-only"));
        }
    }
}
