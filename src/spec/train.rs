//! Job-file sections for `kind = "train"`: `[model]`, `[data]`, `[training]`, `[lora]`.
//! Option names follow Hugging Face `TrainingArguments`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::job::JobSpec;
use super::toml_source::Issue;

/// `[model]`: the base model or the sizes of a fresh one.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {}

/// `[data]`: training and evaluation data.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {}

/// `[training]`: the loop's options, named as in `TrainingArguments`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingArgs {}

/// `[lora]`: low-rank adapters instead of full fine-tuning.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {}

/// Problems in the train sections of a `kind = "train"` job.
pub fn validate(_spec: &JobSpec) -> Vec<Issue> {
    vec![Issue::new(
        "kind",
        "train jobs are not available in this build yet",
    )]
}

/// Makes the train sections' relative paths absolute.
pub fn resolve_paths(_spec: &mut JobSpec, _base_dir: &Path) {}

/// Checks that the files the train sections name exist.
pub fn check_paths(_spec: &JobSpec) -> Vec<Issue> {
    Vec::new()
}
