//! Job-file section `[publish]`: where and how a finished model is published to Ollama.

use serde::{Deserialize, Serialize};

use super::toml_source::Issue;

/// `[publish]`: publish the trained model into an Ollama model directory.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {}

/// Problems in `[publish]`.
pub fn validate(_publish: &PublishSpec) -> Vec<Issue> {
    vec![Issue::new(
        "publish",
        "publishing is not available in this build yet",
    )]
}
