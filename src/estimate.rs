//! L1: VRAM estimates for train jobs (weights, gradients, optimizer state, activations,
//! overhead). Pure arithmetic over the job spec and the base model's config.

use crate::spec::JobSpec;

/// Estimated VRAM per GPU for a train job, in bytes; `None` when the model's size is unknown
/// (the job then gets whole GPUs).
pub fn per_gpu_bytes(_spec: &JobSpec) -> Option<u64> {
    // The model sections of train jobs arrive with the training engine; until then the size
    // of a train job's model is unknown here.
    None
}
