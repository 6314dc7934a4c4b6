//! NVML (libnvidia-ml, loaded at run time): memory, UUIDs, PCI ids and per-process use, all
//! without a CUDA context.

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;

use super::{GpuInfo, Snapshot};

pub struct NvmlInventory {
    nvml: Nvml,
}

impl NvmlInventory {
    pub fn open() -> Result<Self, String> {
        let nvml = Nvml::init().map_err(|e| e.to_string())?;
        Ok(NvmlInventory { nvml })
    }

    pub fn snapshot(&self, is_ours: &dyn Fn(u32) -> bool) -> Snapshot {
        let mut notes = Vec::new();
        let count = self.nvml.device_count().unwrap_or_else(|e| {
            notes.push(format!("cannot count GPUs: {e}"));
            0
        });
        let mut gpus = Vec::new();
        for i in 0..count {
            let dev = match self.nvml.device_by_index(i) {
                Ok(d) => d,
                Err(e) => {
                    notes.push(format!("GPU {i}: {e}"));
                    continue;
                }
            };
            let Ok(mem) = dev.memory_info() else {
                notes.push(format!("GPU {i}: memory information unavailable"));
                continue;
            };
            // Memory of processes that are not ours; if the driver will not list processes,
            // count everything in use as foreign (safe: never over-commits).
            let foreign = match (
                dev.running_compute_processes(),
                dev.running_graphics_processes(),
            ) {
                (Ok(compute), Ok(graphics)) => {
                    let ours: u64 = compute
                        .iter()
                        .chain(graphics.iter())
                        .filter(|p| is_ours(p.pid))
                        .map(|p| match p.used_gpu_memory {
                            UsedGpuMemory::Used(b) => b,
                            UsedGpuMemory::Unavailable => 0,
                        })
                        .sum();
                    mem.used.saturating_sub(ours)
                }
                _ => mem.used,
            };
            gpus.push(GpuInfo {
                index: dev.index().unwrap_or(i),
                uuid: dev.uuid().unwrap_or_else(|_| format!("GPU-index-{i}")),
                name: dev.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                pci_bus_id: dev.pci_info().ok().map(|p| p.bus_id),
                total_bytes: mem.total,
                free_bytes: Some(mem.free),
                foreign_bytes: foreign,
                compute_capability: dev
                    .cuda_compute_capability()
                    .ok()
                    .map(|c| format!("{}.{}", c.major, c.minor)),
                utilization_percent: dev.utilization_rates().ok().map(|u| u.gpu),
            });
        }
        Snapshot {
            source: "nvml",
            driver_version: self.nvml.sys_driver_version().ok(),
            note: (!notes.is_empty()).then(|| notes.join("; ")),
            gpus,
        }
    }
}
