//! `jobctl publish`, `jobctl export`, `jobctl models`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{Output, age, bytes, table};
use crate::client::Client;
use crate::sched::PublishOverrides;
use crate::spec::api::{JobView, ModelsResponse};
use crate::spec::contract::files;
use crate::spec::publish::Quantization;
use crate::spec::{JobId, now_ms};

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// A succeeded train job.
    #[arg(value_parser = super::parse_id)]
    pub id: JobId,
    /// Ollama model name (name[:tag], namespace/name[:tag]); default: the job's [publish].
    #[arg(long)]
    pub name: Option<String>,
    /// f32, f16, q8_0, q4_0 or q4_k; default: the job's [publish] (else f16).
    #[arg(long, value_parser = parse_quantization)]
    pub quantization: Option<Quantization>,
    /// Ollama models directory; default: the job's, else the daemon's.
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A succeeded train job.
    #[arg(value_parser = super::parse_id)]
    pub id: JobId,
    /// The GGUF file to write.
    #[arg(long, value_name = "FILE")]
    pub gguf: PathBuf,
    /// f32, f16, q8_0, q4_0 or q4_k.
    #[arg(long, default_value = "f16", value_parser = parse_quantization)]
    pub quantization: Quantization,
}

fn parse_quantization(s: &str) -> Result<Quantization, String> {
    serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
        .map_err(|_| format!("unknown quantization {s:?} (f32, f16, q8_0, q4_0, q4_k)"))
}

pub async fn publish(client: &Client, args: &PublishArgs, out: &Output) -> anyhow::Result<bool> {
    let body = PublishOverrides {
        name: args.name.clone(),
        quantization: args.quantization,
        models_dir: args.models_dir.clone(),
    };
    eprintln!("publishing job {}...", args.id);
    let v: JobView = client
        .post(&format!("/jobs/{}/publish", args.id), &body)
        .await?;
    if out.json {
        out.print_json(&v)?;
    } else if let Some(m) = &v.record.published {
        outln!(
            "published {} ({}, {}) — run it with:\n  {}",
            m.name,
            m.quantization,
            bytes(m.gguf_bytes),
            m.run_command
        );
        if let Some(note) = &m.not_exported {
            eprintln!("jobctl: note: not in the GGUF: {note}");
        }
    }
    Ok(true)
}

pub async fn export(client: &Client, args: &ExportArgs, out: &Output) -> anyhow::Result<bool> {
    // Checked before minutes of export, not at the final rename.
    let target = &args.gguf;
    if target.is_dir() || target.as_os_str().to_string_lossy().ends_with('/') {
        anyhow::bail!(
            "--gguf {}: a directory; give the file to write, e.g. {}",
            target.display(),
            target.join(format!("job-{}.gguf", args.id)).display()
        );
    }
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        anyhow::bail!(
            "--gguf {}: the directory {} does not exist",
            target.display(),
            parent.display()
        );
    }
    let v: JobView = client.get(&format!("/jobs/{}", args.id)).await?;
    let dir = v
        .job_dir
        .context("the daemon did not say where the job's files are")?
        .join(files::OUTPUT);
    match std::fs::metadata(dir.join("config.json")) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::bail!(
            "cannot read job {}'s model in {}: permission denied (job files are readable by \
             their owner)",
            args.id,
            dir.display()
        ),
        Err(_) => anyhow::bail!(
            "job {} has no model in {} (is it a train job whose training finished?)",
            args.id,
            dir.display()
        ),
    }
    let (gguf, q) = (args.gguf.clone(), args.quantization);
    let summary =
        tokio::task::spawn_blocking(move || crate::publish::export_gguf(&dir, q, &gguf)).await??;
    if out.json {
        out.print_json(
            &serde_json::json!({"file": args.gguf, "bytes": summary.bytes,
            "sha256": summary.sha256, "not_exported": summary.dropped}),
        )?;
    } else {
        if let Some(dropped) = summary.dropped {
            eprintln!("jobctl: note: not in the GGUF: {dropped}");
        }
        outln!(
            "wrote {} ({}, {})",
            args.gguf.display(),
            bytes(summary.bytes),
            summary.sha256
        );
    }
    Ok(true)
}

pub async fn models(
    client: &Client,
    models_dir: Option<PathBuf>,
    out: &Output,
) -> anyhow::Result<bool> {
    let m: ModelsResponse = match models_dir {
        // The user's own directory, read with the user's rights (the daemon may not see it).
        Some(dir) => {
            // A store that is not there is a mistake here, not an empty store.
            match std::fs::metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => anyhow::bail!("--models-dir {}: is not a directory", dir.display()),
                Err(e) => anyhow::bail!("--models-dir {}: {e}", dir.display()),
            }
            let d = dir.clone();
            let entries =
                tokio::task::spawn_blocking(move || crate::publish::list_models(&d)).await??;
            ModelsResponse {
                models_dir: Some(dir),
                models: entries.into_iter().map(Into::into).collect(),
            }
        }
        None => client.get("/models").await?,
    };
    if out.json {
        out.print_json(&m)?;
        return Ok(true);
    }
    let Some(dir) = &m.models_dir else {
        eprintln!("the daemon has no Ollama models directory (jobd --ollama-models DIR)");
        return Ok(true);
    };
    eprintln!("{}", dir.display());
    let now = now_ms();
    let rows = m
        .models
        .iter()
        .map(|x| {
            vec![
                x.name.clone(),
                x.id.clone(),
                bytes(x.size),
                format!("{} ago", age(now, x.modified)),
            ]
        })
        .collect();
    outln!("{}", table(&["NAME", "ID", "SIZE", "MODIFIED"], rows));
    Ok(true)
}
