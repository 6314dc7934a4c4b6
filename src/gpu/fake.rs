//! Simulated GPUs for tests and demos: fixed sizes, or a TOML file re-read at every refresh
//! (`[[gpu]] total = "24GiB" foreign = "2GiB"`) so a test can change foreign memory use.

use std::path::PathBuf;

use serde::Deserialize;

use super::{GpuInfo, Snapshot};
use crate::config::FakeGpu;

pub struct FakeInventory {
    fixed: Vec<FakeGpu>,
    file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FakeFile {
    #[serde(default)]
    gpu: Vec<FakeGpu>,
}

impl FakeFile {
    /// The same checks as `fake:` sizes on the command line.
    fn checked(self) -> Result<FakeFile, String> {
        for (i, g) in self.gpu.iter().enumerate() {
            if g.total.0 == 0 || g.foreign > g.total {
                return Err(format!(
                    "gpu {i}: total ({}) must be > 0 and ≥ foreign use ({})",
                    g.total, g.foreign
                ));
            }
        }
        Ok(self)
    }
}

impl FakeInventory {
    pub fn fixed(gpus: Vec<FakeGpu>) -> Self {
        FakeInventory {
            fixed: gpus,
            file: None,
        }
    }

    pub fn file(path: PathBuf) -> Self {
        FakeInventory {
            fixed: Vec::new(),
            file: Some(path),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let (gpus, note) = match &self.file {
            None => (self.fixed.clone(), None),
            Some(path) => match std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|t| toml::from_str::<FakeFile>(&t).map_err(|e| e.to_string()))
                .and_then(FakeFile::checked)
            {
                Ok(f) => (f.gpu, None),
                Err(e) => (
                    Vec::new(),
                    Some(format!("fake GPU file {}: {e}", path.display())),
                ),
            },
        };
        Snapshot {
            source: "fake",
            driver_version: None,
            note: note.or_else(|| Some("simulated GPUs: jobs run on CPU".into())),
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, g)| GpuInfo {
                    index: i as u32,
                    uuid: format!("GPU-fake0000-0000-0000-0000-{i:012}"),
                    name: format!("Fake GPU {}", g.total),
                    pci_bus_id: Some(format!("00000000:{:02X}:00.0", i + 1)),
                    total_bytes: g.total.0,
                    free_bytes: Some(g.total.0.saturating_sub(g.foreign.0)),
                    foreign_bytes: g.foreign.0,
                    compute_capability: None,
                    utilization_percent: None,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_of(text: &str) -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.toml");
        std::fs::write(&path, text).unwrap();
        FakeInventory::file(path).snapshot()
    }

    #[test]
    fn a_fake_file_is_checked_like_the_command_line() {
        let s = snapshot_of("[[gpu]]\ntotal = \"24GiB\"\nforeign = \"2GiB\"\n");
        assert_eq!(s.gpus.len(), 1);
        assert_eq!(s.gpus[0].free_bytes, Some(22 << 30));
        for bad in [
            "[[gpu]]\ntotal = \"0B\"\n",
            "[[gpu]]\ntotal = \"8GiB\"\nforeign = \"9GiB\"\n",
        ] {
            let s = snapshot_of(bad);
            assert!(s.gpus.is_empty(), "{bad}");
            let note = s.note.unwrap();
            assert!(note.contains("gpu 0: total"), "{note}");
        }
    }
}
