//! cudarc's driver API, loaded at run time, as a fallback inventory when NVML is missing:
//! device names, UUIDs, totals and compute capability — no context is created, so free memory
//! and foreign use stay unknown.

use cudarc::driver::{result, sys};

use super::{GpuInfo, Snapshot};

pub struct CudaInventory {
    gpus: Vec<GpuInfo>,
    driver_version: Option<String>,
    note: Option<String>,
}

impl CudaInventory {
    pub fn open() -> Result<Self, String> {
        // cudarc panics on a missing library instead of returning an error: check first.
        // SAFETY: only tries to dlopen libcuda.
        if !unsafe { sys::is_culib_present() } {
            return Err("libcuda not found".into());
        }
        result::init().map_err(|e| format!("cuInit failed: {e}"))?;
        let count = result::device::get_count().map_err(|e| e.to_string())?;
        let mut gpus = Vec::new();
        for ordinal in 0..count {
            let dev = result::device::get(ordinal).map_err(|e| e.to_string())?;
            // SAFETY: `dev` came from `device::get`.
            let total =
                unsafe { result::device::total_mem(dev) }.map_err(|e| e.to_string())? as u64;
            let attr = |a| unsafe { result::device::get_attribute(dev, a) }.ok();
            let cc = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .zip(attr(
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                ))
                .map(|(a, b)| format!("{a}.{b}"));
            let pci = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)
                .zip(attr(
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID,
                ))
                .zip(attr(
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID,
                ))
                .map(|((d, b), s)| format!("{d:08X}:{b:02X}:{s:02X}.0"));
            let uuid = result::device::get_uuid(dev)
                .map(|u| format_uuid(&u.bytes.map(|b| b as u8)))
                .unwrap_or_else(|_| format!("GPU-ordinal-{ordinal}"));
            gpus.push(GpuInfo {
                index: 0,
                uuid,
                name: result::device::get_name(dev).unwrap_or_else(|_| "NVIDIA GPU".into()),
                pci_bus_id: pci,
                total_bytes: total,
                free_bytes: None,
                foreign_bytes: 0,
                compute_capability: cc,
                utilization_percent: None,
            });
        }
        // Number devices in PCI bus order, as nvidia-smi and CUDA_DEVICE_ORDER=PCI_BUS_ID do.
        gpus.sort_by(|a, b| a.pci_bus_id.cmp(&b.pci_bus_id));
        for (i, g) in gpus.iter_mut().enumerate() {
            g.index = i as u32;
        }
        let mut version = 0;
        // SAFETY: plain out-parameter call.
        let driver_version = unsafe { sys::cuDriverGetVersion(&mut version) }
            .result()
            .ok()
            .map(|_| format!("CUDA {}.{}", version / 1000, (version % 1000) / 10));
        Ok(CudaInventory {
            gpus,
            driver_version,
            note: None,
        })
    }

    pub fn with_note(mut self, note: String) -> Self {
        self.note = Some(note);
        self
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            source: "cuda",
            driver_version: self.driver_version.clone(),
            note: self.note.clone(),
            gpus: self.gpus.clone(),
        }
    }
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML and nvidia-smi print UUIDs.
fn format_uuid(b: &[u8; 16]) -> String {
    let h = hex::encode(b);
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
