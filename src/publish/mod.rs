//! L2: publishing a finished model: GGUF export and the Ollama model store.
//!
//! Input is the training worker's output directory in Hugging Face layout (`config.json`,
//! `model.safetensors`, `tokenizer.json`, optionally `tokenizer_config.json`). [`export_gguf`]
//! writes a llama GGUF that llama.cpp (and so Ollama, which runs llama.cpp) loads;
//! [`publish`] writes it with a config, template, system, params and license layers into an
//! Ollama models directory so `ollama run NAME` works at once; [`list_models`] reads a store as
//! `ollama list` does. This module only reads the model directory and writes below the
//! models directory or the export path; it never talks to an Ollama server, and it uses no
//! store, scheduler or training code.
//!
//! Sub-modules: [`hf`] (reading and mapping tensors), [`tokenizer`] (`tokenizer.ggml.*` and
//! the chat family), [`gguf`] (the streaming writer), [`store`] (blobs, manifests, listing).

pub mod gguf;
pub mod hf;
pub mod store;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use gguf::{GgufSummary, export_gguf};
pub use store::{ModelEntry, list_models, render_list};

pub use crate::spec::publish::{ModelName, ModelNameError, Parameters, PublishSpec, Quantization};

/// Why an export or publish failed. Every variant names the file, tensor, directory or
/// tokenizer feature at fault.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named by the messages
pub enum PublishError {
    /// A file could not be read, written, renamed or synced.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// `config.json`, the weights file or `tokenizer.json` is malformed or describes a model
    /// that cannot be exported exactly.
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    /// A tensor is missing, extra, mis-shaped or cannot be quantized as asked.
    #[error("{}: tensor {name}: {reason}", path.display())]
    Tensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
    /// The tokenizer uses a feature llama.cpp would not reproduce exactly.
    #[error("{}: the tokenizer cannot be represented exactly in GGUF: {feature}", path.display())]
    UnsupportedTokenizer { path: PathBuf, feature: String },
    /// The Ollama model name breaks Ollama's rules.
    #[error(transparent)]
    Name(#[from] ModelNameError),
    /// `[publish]` fails validation (`key` is the dotted job-file key).
    #[error("{key}: {message}")]
    Spec { key: String, message: String },
    /// The models directory cannot be used (missing parent, not a directory, not writable).
    #[error("models directory {}: {reason}", path.display())]
    ModelsDir { path: PathBuf, reason: String },
    /// A manifest or blob in the store is inconsistent or unreadable.
    #[error("{}: {reason}", path.display())]
    Manifest { path: PathBuf, reason: String },
}

impl PublishError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        PublishError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Opens a file of the model directory for reading. It never blocks on a FIFO and refuses
/// anything but a regular file. Links are followed: a root daemon reads with the owner's
/// rights ([`PublishRequest::read_as`]), and Hugging Face caches link files to blobs.
pub(crate) fn open_model_file(path: &Path) -> std::io::Result<std::fs::File> {
    crate::jobfs::open_linked_regular(path)
}

/// Most of a model directory's JSON file read: tokenizer.json files of the largest
/// vocabularies are tens of megabytes, the others kilobytes. A root daemon reads these files
/// of its users at submit; a sparse file of gigabytes costs its owner nothing.
const MAX_MODEL_TEXT: u64 = 64 << 20;

/// Reads a text file of the model directory (see [`open_model_file`]), at most
/// [`MAX_MODEL_TEXT`] bytes.
pub(crate) fn read_model_text(path: &Path) -> std::io::Result<String> {
    let bytes = crate::jobfs::read_linked_regular(path, MAX_MODEL_TEXT)?;
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Problems of a train job's base model that would otherwise show only once the job runs: an
/// architecture the trainer does not implement (`hf_config::unsupported`, for `base` and a
/// schedule's `first_base`), and for `[publish]` a `config.json` or `tokenizer.json` that
/// GGUF cannot represent, or weights whose dimensions do not fit the chosen quantization
/// (the trained model keeps the base's config and tokenizer, so these are known at submit
/// time too). Paths must be resolved and checked (`JobSpec::check_paths`) first.
pub fn base_issues(spec: &crate::spec::JobSpec) -> Vec<crate::spec::toml_source::Issue> {
    use crate::spec::toml_source::Issue;
    let Some(model) = &spec.model else {
        return Vec::new();
    };
    let block_size = spec.data.as_ref().and_then(|d| d.block_size);
    let trainable: Vec<Issue> = [
        ("model.base", model.base.as_deref()),
        ("model.first_base", model.first_base.as_deref()),
    ]
    .into_iter()
    .filter_map(|(key, dir)| {
        let dir = dir.filter(|b| !crate::spec::train::is_previous(b))?;
        untrainable(dir, block_size).map(|(field, why)| Issue::new(field.unwrap_or(key), why))
    })
    .collect();
    if !trainable.is_empty() {
        return trainable;
    }
    let Some(publish) = &spec.publish else {
        return Vec::new();
    };
    let Some(base) = model
        .base
        .as_deref()
        .filter(|b| !crate::spec::train::is_previous(b))
    else {
        return Vec::new();
    };
    // One check at a time (parsing a tokenizer.json takes many times its size in memory,
    // and submits may come at once), and a sweep's jobs, which name the same base, have it
    // read once: the result is kept while its files stay as they were.
    type Stamps = [Option<crate::jobfs::FileStamp>; 3];
    type Checked = (std::path::PathBuf, Stamps, Result<[u32; 3], String>);
    static ONE_AT_A_TIME: std::sync::Mutex<Option<Checked>> = std::sync::Mutex::new(None);
    let mut last = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let stamps: Stamps = ["config.json", "tokenizer.json", "tokenizer_config.json"]
        .map(|f| crate::jobfs::FileStamp::of(&base.join(f)));
    let dims = match last.as_ref() {
        Some((dir, s, dims)) if dir == base && *s == stamps => dims.clone(),
        _ => {
            let dims = hf::LlamaConfig::read(&base.join("config.json"))
                .and_then(|c| {
                    tokenizer::read_tokenizer(base, &c)?;
                    Ok([c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim])
                })
                .map_err(|e| e.to_string());
            *last = Some((base.to_path_buf(), stamps, dims.clone()));
            dims
        }
    };
    let after = "the job would train and then fail to publish: fix the base model or leave \
                 out [publish]";
    let [hidden, intermediate, attention] = match dims {
        Ok(d) => d,
        Err(e) => return vec![Issue::new("model.base", format!("{e}; {after}"))],
    };
    let block = publish.quantization.block_elements() as u32;
    let inputs = [
        ("hidden_size", hidden),
        ("intermediate_size", intermediate),
        ("num_attention_heads × head_dim", attention),
    ];
    inputs
        .into_iter()
        .find(|(_, d)| d % block != 0)
        .map(|(what, d)| {
            Issue::new(
                "publish.quantization",
                format!(
                    "{} needs every weight's input dimension to be a multiple of {block}, but \
                     the base model's {what} is {d}: choose f16 or f32{}",
                    publish.quantization,
                    if d % 32 == 0 { " (or q8_0, q4_0)" } else { "" }
                ),
            )
        })
        .into_iter()
        .collect()
}

/// Why the trainer could not train the model in `dir` on examples of `block_size` tokens,
/// judged from its `config.json` (read as a user's file: capped, no FIFO), if it could not:
/// the reason, and the job file's field at fault when it is not the base itself.
fn untrainable(dir: &Path, block_size: Option<usize>) -> Option<(Option<&'static str>, String)> {
    let path = dir.join("config.json");
    let config: serde_json::Value = match read_model_text(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => return Some((None, format!("{}: {e}", path.display()))),
    };
    if let Some(why) = crate::hf_config::unsupported(&config) {
        return Some((None, format!("{}: {why}", path.display())));
    }
    let context = config
        .get("max_position_embeddings")
        .and_then(serde_json::Value::as_u64)?;
    let block = block_size.filter(|b| *b as u64 > context)?;
    Some((
        Some("data.block_size"),
        format!(
            "{block} exceeds the base model's context of {context} tokens \
             (max_position_embeddings in {})",
            path.display()
        ),
    ))
}

/// What to publish and where.
#[derive(Debug, Clone, Copy)]
pub struct PublishRequest<'a> {
    /// The model in Hugging Face layout (the train job's output directory).
    pub model_dir: &'a Path,
    /// Ollama's models directory: the spec's `models_dir` if set, else the daemon's
    /// `--ollama-models` (see [`PublishRequest::resolve_models_dir`]).
    pub models_dir: &'a Path,
    /// The job's `[publish]` section.
    pub spec: &'a PublishSpec,
    /// Read the model with this account's file rights (a root daemon publishing a user's job:
    /// the model directory is the user's, who may have put links to other files in it).
    pub read_as: Option<&'a crate::jobfs::Credentials>,
    /// Write the store with this account's file rights: a models directory the job's owner
    /// named (not the daemon's own) is written as they could write it, so that a link they
    /// swap in for it after the submit-time check leads only where they may write anyway.
    pub write_as: Option<&'a crate::jobfs::Credentials>,
}

impl<'a> PublishRequest<'a> {
    /// The spec's `models_dir`, else the daemon's default.
    pub fn resolve_models_dir(spec: &'a PublishSpec, daemon_default: &'a Path) -> &'a Path {
        spec.models_dir.as_deref().unwrap_or(daemon_default)
    }
}

/// The result of a publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// As `ollama list` shows it, e.g. `local/tiny:v1` or `tiny:latest`.
    pub name: String,
    /// Fully qualified, e.g. `registry.ollama.ai/local/tiny:v1`.
    pub full_name: String,
    /// `sha256:<hex>` of the manifest; its first 12 hex digits are Ollama's ID.
    pub manifest_digest: String,
    /// `sha256:<hex>` of the GGUF blob.
    pub gguf_digest: String,
    /// Size of the GGUF blob.
    pub gguf_bytes: u64,
    /// The manifest file written.
    pub manifest_path: PathBuf,
    /// The GGUF blob (the file Ollama hands to llama.cpp).
    pub gguf_path: PathBuf,
    /// `ollama run NAME`.
    pub run_command: String,
    /// Tensor type of the 2-D weights.
    pub quantization: Quantization,
    /// Parameters exported (tied embeddings counted once).
    pub parameter_count: u64,
    /// Wall time of the whole publish.
    pub seconds: f64,
    /// What of the model the GGUF does not carry ([`tokenizer::GgufTokenizer::dropped`]).
    pub not_exported: Option<&'static str>,
}

/// The `ollama run` line for a published name.
pub fn run_command(name: &ModelName) -> String {
    format!("ollama run {}", name.display_shortest())
}

/// Parses an Ollama model name (see [`ModelName::parse`]).
pub fn parse_model_name(s: &str) -> Result<ModelName, PublishError> {
    Ok(ModelName::parse(s)?)
}

/// The template, system, params and license layers' contents for a spec and tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompting {
    /// The Go template (always present: Ollama's behaviour without one varies by version).
    pub template: String,
    /// The system prompt layer, if any.
    pub system: Option<String>,
    /// The params layer's JSON (keys sorted, compact, `\n`-terminated), if any option is set.
    pub params: Option<String>,
    /// The license layer, if any.
    pub license: Option<String>,
}

/// Chooses the prompt layers: the spec's template, else the family default from the chat
/// template (ChatML, Llama 3, Gemma, Phi-3, Mistral) with its stop sequences when the spec
/// sets none, else `{{ .Prompt }}`; the spec's system prompt, else with a family template
/// the one the model's own template writes (`defaults`, found by the worker).
pub fn prompting(
    spec: &PublishSpec,
    tok: &tokenizer::GgufTokenizer,
    defaults: &crate::chat::ChatDefaults,
    sampling: &Sampling,
) -> Prompting {
    let family = tokenizer::chat_family(tok);
    let template = match (&spec.template, family) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => f.template().to_string(),
        (None, None) => "{{ .Prompt }}".to_string(),
    };
    let mut params = spec.parameters.clone();
    // The base's recommended sampling (Qwen3's temperature 0.6, top_k 20, ...), as Ollama's
    // own library models carry theirs; `[publish.parameters]` wins.
    params.temperature = params.temperature.or(sampling.temperature);
    params.top_p = params.top_p.or(sampling.top_p);
    params.top_k = params.top_k.or(sampling.top_k);
    params.min_p = params.min_p.or(sampling.min_p);
    params.repeat_penalty = params.repeat_penalty.or(sampling.repeat_penalty);
    if params.stop.is_none()
        && spec.template.is_none()
        && let Some(f) = family
    {
        params.stop = Some(f.stop().iter().map(|s| s.to_string()).collect());
    }
    let params = (!params.is_empty()).then(|| {
        // Sorted keys, compact, trailing newline: what Ollama's json.Encoder writes.
        let map: BTreeMap<String, serde_json::Value> = match serde_json::to_value(&params) {
            Ok(serde_json::Value::Object(m)) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        let mut s = serde_json::to_string(&map).expect("a map of JSON values serializes");
        s.push('\n');
        s
    });
    // The family's Go template writes no system prompt of its own: the one the model's
    // template writes (and trained with) becomes its SYSTEM.
    let system = spec.system.clone().or_else(|| {
        (spec.template.is_none() && family.is_some())
            .then(|| defaults.default_system.clone())
            .flatten()
    });
    Prompting {
        template,
        system,
        params,
        license: spec.license.clone(),
    }
}

/// The sampling a model's `generation_config.json` recommends, in Ollama's parameter names;
/// empty unless it samples (`do_sample: true`): greedy decoding is no setting of Ollama's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    /// `temperature`.
    pub temperature: Option<f64>,
    /// `top_p`.
    pub top_p: Option<f64>,
    /// `top_k`.
    pub top_k: Option<i32>,
    /// `min_p`.
    pub min_p: Option<f64>,
    /// `repetition_penalty` (Ollama's `repeat_penalty`).
    pub repeat_penalty: Option<f64>,
}

impl Sampling {
    /// From `dir/generation_config.json` (read as a user's file: capped, no FIFO); empty when
    /// it is missing, unreadable or not sampling. Values outside their ranges are left out.
    pub fn read(dir: &Path) -> Self {
        let Some(g) =
            crate::jobfs::read_linked_regular(&dir.join("generation_config.json"), 1 << 20)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        else {
            return Sampling::default();
        };
        if g.get("do_sample").and_then(serde_json::Value::as_bool) != Some(true) {
            return Sampling::default();
        }
        let num = |k: &str, ok: fn(f64) -> bool| {
            g.get(k)
                .and_then(serde_json::Value::as_f64)
                .filter(|v| v.is_finite() && ok(*v))
        };
        Sampling {
            temperature: num("temperature", |v| v >= 0.0),
            top_p: num("top_p", |v| v > 0.0 && v <= 1.0),
            top_k: num("top_k", |v| {
                v >= 1.0 && v <= i32::MAX as f64 && v.fract() == 0.0
            })
            .map(|v| v as i32),
            min_p: num("min_p", |v| (0.0..=1.0).contains(&v)),
            repeat_penalty: num("repetition_penalty", |v| v > 0.0),
        }
    }
}

/// Display name of a quantization in the config blob (`ollama show`'s "quantization").
fn file_type_label(q: Quantization) -> &'static str {
    match q {
        Quantization::F32 => "F32",
        Quantization::F16 => "F16",
        Quantization::Q8_0 => "Q8_0",
        Quantization::Q4_0 => "Q4_0",
        Quantization::Q4K => "Q4_K_S",
    }
}

/// Exports `req.model_dir` as GGUF straight into the Ollama store and writes the manifest.
///
/// Order: validate the spec, open (and probe) the models directory, open and check the model
/// and tokenizer, stream the GGUF into a staging file while hashing it, move it to
/// `blobs/sha256-<hex>`, add the config and prompt layers, then write the manifest last,
/// atomically. On any error before the manifest, blobs this call created and all staging
/// files are removed; an existing model of the same name is untouched. Publishing the same
/// model again yields the same blobs and manifest digest.
pub fn publish(
    req: &PublishRequest<'_>,
    mut progress: impl FnMut(&str),
) -> Result<Published, PublishError> {
    let started = Instant::now();
    let spec = req.spec;
    if let Some(issue) = crate::spec::publish::validate(spec).into_iter().next() {
        return Err(PublishError::Spec {
            key: issue.key,
            message: issue.message,
        });
    }
    let name = ModelName::parse(&spec.ollama_name)?;
    let _writing_as = match req.write_as {
        Some(c) => Some(
            c.enter()
                .map_err(|e| PublishError::io("write", req.models_dir, e))?,
        ),
        None => None,
    };
    let mut store = store::Store::open(req.models_dir)?;
    progress(&format!("reading {}", req.model_dir.display()));
    let prepared = {
        let _as_owner = match req.read_as {
            Some(c) => Some(
                c.enter()
                    .map_err(|e| PublishError::io("read", req.model_dir, e))?,
            ),
            None => None,
        };
        (
            gguf::prepare(req.model_dir, spec.quantization)?,
            crate::chat::ChatDefaults::read(req.model_dir),
            Sampling::read(req.model_dir),
        )
    };
    let (prepared, defaults, sampling) = prepared;
    let (model, tok) = (&prepared.model, &prepared.tokenizer);
    let prompting = prompting(spec, tok, &defaults, &sampling);
    if let Some(dropped) = tok.dropped {
        tracing::info!(target: "publish", model = %name.display_shortest(), "not in the GGUF: {dropped}");
        progress(&format!("note: not in the GGUF: {dropped}"));
    }

    progress(&format!(
        "exporting {} parameters as {} GGUF",
        store::human_number(model.parameter_count()),
        spec.quantization
    ));
    let meta = gguf::metadata(model, tok, &name.display_shortest(), spec.quantization);
    let staged = store
        .stage("model.gguf")
        .map_err(|e| PublishError::io("create a staging file in", store.root(), e))?;
    let staged_path = staged.path().to_path_buf();
    let (gguf_bytes, sha) =
        gguf::write_gguf(model, &meta, staged.file(), &staged_path, &mut |m| {
            progress(m)
        })?;
    let gguf_digest = format!("sha256:{sha}");
    store.add_blob(staged, &gguf_digest, gguf_bytes)?;
    let mut layers = vec![store::Layer {
        media_type: store::MODEL_MEDIA_TYPE.into(),
        digest: gguf_digest.clone(),
        size: gguf_bytes,
        from: None,
        name: None,
    }];
    layers.push(store.add_bytes(store::TEMPLATE_MEDIA_TYPE, prompting.template.as_bytes())?);
    if let Some(system) = &prompting.system {
        layers.push(store.add_bytes(store::SYSTEM_MEDIA_TYPE, system.as_bytes())?);
    }
    if let Some(params) = &prompting.params {
        layers.push(store.add_bytes(store::PARAMS_MEDIA_TYPE, params.as_bytes())?);
    }
    if let Some(license) = &prompting.license {
        layers.push(store.add_bytes(store::LICENSE_MEDIA_TYPE, license.as_bytes())?);
    }
    let config = store::ModelConfig {
        model_format: "gguf".into(),
        model_family: model.config.arch.name().into(),
        model_families: vec![model.config.arch.name().into()],
        model_type: store::human_number(model.parameter_count()),
        file_type: file_type_label(spec.quantization).into(),
        architecture: "amd64".into(),
        os: "linux".into(),
    };
    let config_bytes = serde_json::to_vec(&config).expect("the config serializes");
    let config_layer = store.add_bytes(store::CONFIG_MEDIA_TYPE, &config_bytes)?;
    let manifest = store::Manifest {
        schema_version: 2,
        media_type: store::MANIFEST_MEDIA_TYPE.into(),
        config: config_layer,
        layers,
    };
    let manifest_digest = store.commit(&name, &manifest)?;
    let published = Published {
        name: name.display_shortest(),
        full_name: name.to_string(),
        manifest_digest,
        gguf_path: store.blob_path(&gguf_digest)?,
        gguf_digest,
        gguf_bytes,
        manifest_path: store::manifest_path(store.root(), &name)?,
        run_command: run_command(&name),
        quantization: spec.quantization,
        parameter_count: model.parameter_count(),
        seconds: started.elapsed().as_secs_f64(),
        not_exported: tok.dropped,
    };
    tracing::info!(
        target: "publish",
        name = %published.full_name,
        manifest = %published.manifest_digest,
        gguf_bytes,
        seconds = published.seconds,
        "published to Ollama store"
    );
    progress(&format!(
        "published {} ({})",
        published.name, published.run_command
    ));
    Ok(published)
}
