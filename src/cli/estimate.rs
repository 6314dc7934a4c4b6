//! `jobctl estimate`: the VRAM a train job needs, broken down, where it fits, and how it
//! compares with standard llama sizes.

use std::path::PathBuf;

use clap::Args;

use super::{Output, bytes, table};
use crate::client::Client;
use crate::estimate::{self, Breakdown, REFERENCE_LORA, Tuning};
use crate::spec::api::{GpuView, GpusResponse};
use crate::spec::train::TrainDType;

#[derive(Debug, Args)]
pub struct EstimateArgs {
    /// The job file (TOML).
    pub file: PathBuf,
    #[command(flatten)]
    pub overrides: super::submit::Overrides,
    /// Estimate every job of a sweep, as `submit --sweep` would queue them (e.g. which batch
    /// sizes fit): a table of what each needs and where it fits; repeatable.
    #[arg(long = "sweep", value_name = "KEY=V1,V2,...")]
    pub sweep: Vec<String>,
}

/// The spec to estimate: a schedule's `base = "@previous"` is the last run's model, the shape
/// of `first_base` (where the first run starts).
fn estimable(mut spec: crate::spec::JobSpec) -> anyhow::Result<crate::spec::JobSpec> {
    if let Some(m) = &mut spec.model
        && m.base
            .as_deref()
            .is_some_and(crate::spec::train::is_previous)
    {
        let Some(first) = m.first_base.clone() else {
            anyhow::bail!(
                "model.base = \"@previous\" names no model until a run has succeeded; set \
                 model.first_base to estimate"
            );
        };
        eprintln!(
            "(base = \"@previous\": estimated for first_base {}, where the first run starts)",
            first.display()
        );
        m.base = Some(first);
    }
    Ok(spec)
}

/// `estimate --sweep`: each job's need, and the GPUs it fits on.
async fn estimate_sweep(
    client: &Client,
    args: &EstimateArgs,
    out: &Output,
) -> anyhow::Result<bool> {
    let (_, members) = super::sweep::load(&args.file, &args.overrides, &args.sweep)?;
    let gpus: Option<GpusResponse> = client.get("/gpus").await.ok();
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for (i, (m, spec)) in members.into_iter().enumerate() {
        let b = estimate::estimate_job(&estimable(spec)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", m.origin))?;
        let need = b.needed();
        let fits: Vec<(u32, Fit)> = gpus
            .iter()
            .flat_map(|g| &g.gpus)
            .map(|x| (x.index, Fit::of(x, need)))
            .collect();
        let on = fits
            .iter()
            .filter(|(_, f)| *f != Fit::TooSmall)
            .map(|(i, f)| format!("{i}{}", if *f == Fit::Now { "" } else { " (later)" }))
            .collect::<Vec<_>>();
        rows.push(vec![
            (i + 1).to_string(),
            crate::spec::sweep::label(&m.values),
            bytes(need),
            match &gpus {
                None => "(daemon not reachable)".into(),
                Some(_) if on.is_empty() => "none".into(),
                Some(_) => format!("GPU {}", on.join(", ")),
            },
        ]);
        json.push(serde_json::json!({
            "values": m.values,
            "needed_bytes": need,
            "estimate": b,
            "gpus": fits.iter().map(|(i, f)| serde_json::json!({"index": i, "fit": f.key()})).collect::<Vec<_>>(),
        }));
    }
    if out.json {
        out.print_json(&serde_json::json!({ "jobs": json }))?;
    } else {
        let later = rows.iter().any(|r| r[3].contains("(later)"));
        outln!(
            "{}",
            table(&["#", "VALUES", "NEEDS PER GPU", "FITS ON"], rows)
        );
        if later {
            outln!("(later: the GPU holds it once jobs running there finish)");
        }
    }
    Ok(true)
}

pub async fn estimate(client: &Client, args: &EstimateArgs, out: &Output) -> anyhow::Result<bool> {
    if !args.sweep.is_empty() {
        return estimate_sweep(client, args, out).await;
    }
    let (_, spec) = super::submit::load(&args.file, &args.overrides)?;
    let spec = estimable(spec)?;
    let b = estimate::estimate_job(&spec).map_err(anyhow::Error::msg)?;
    let refs: Vec<(String, Breakdown, Breakdown)> = estimate::reference_shapes()
        .into_iter()
        .map(|(name, shape)| {
            (
                name.to_string(),
                estimate::estimate_shape(&shape, Tuning::Full, TrainDType::Bf16, 1, 512),
                estimate::estimate_shape(&shape, REFERENCE_LORA, TrainDType::Bf16, 1, 512),
            )
        })
        .collect();
    let need = b.needed();
    // Which GPUs could hold it (if the daemon is there to ask).
    let gpus: Option<GpusResponse> = client.get("/gpus").await.ok();
    if out.json {
        out.print_json(&serde_json::json!({
            "estimate": b,
            "reference": refs.iter().map(|(n, f, l)| serde_json::json!({"size": n, "full_bf16": f.total, "lora_bf16": l.total})).collect::<Vec<_>>(),
            "needed_bytes": need,
            "on_cpu": spec.resources.gpus == 0,
            "gpus": gpus.as_ref().map(|g| g.gpus.iter().map(|x| {
                let fit = Fit::of(x, need);
                serde_json::json!({
                    "index": x.index,
                    "name": x.name,
                    "total_bytes": x.total_bytes,
                    "free_bytes": free_for_jobd(x),
                    "fits": fit != Fit::TooSmall,
                    "fit": fit.key(),
                })
            }).collect::<Vec<_>>()),
        }))?;
        return Ok(true);
    }
    let mode = if b.trainable_params == b.params {
        "full fine-tuning".to_string()
    } else {
        format!("LoRA, {} trainable", count(b.trainable_params))
    };
    outln!(
        "{}: {} parameters ({mode}), {}, batch {} × {} tokens",
        args.file.display(),
        count(b.params),
        b.dtype,
        b.batch,
        b.seq
    );
    let rows = vec![
        vec!["weights".into(), bytes(b.weights)],
        vec!["gradients".into(), bytes(b.gradients)],
        vec!["optimizer (AdamW moments)".into(), bytes(b.optimizer)],
        vec![
            "activations".into(),
            format!(
                "{} ({} with activation checkpointing)",
                bytes(b.activations),
                bytes(b.activations_checkpointed)
            ),
        ],
        vec!["CUDA context + workspace".into(), bytes(b.overhead)],
        vec![
            "total per GPU".into(),
            if b.checkpointing {
                format!(
                    "{} with activation checkpointing, as this job runs ({} without)",
                    bytes(b.total_checkpointed),
                    bytes(b.total)
                )
            } else {
                format!(
                    "{} ({} with activation checkpointing)",
                    bytes(b.total),
                    bytes(b.total_checkpointed)
                )
            },
        ],
    ];
    outln!("{}", table(&["PART", "BYTES"], rows));
    if spec.resources.gpus == 0 {
        outln!(
            "\nThis job trains on the CPU (resources.gpus = 0) and reserves no GPU memory; the \
             figures are what it would need on one GPU (gpus = 1)."
        );
    }
    match &gpus {
        Some(g) if g.gpus.is_empty() => outln!("\nGPUs: none on this daemon ({})", g.source),
        Some(g) => {
            outln!("\nGPUs:");
            for x in &g.gpus {
                outln!(
                    "  GPU {} {} ({} total, {} free for jobd): {}",
                    x.index,
                    x.name,
                    bytes(x.total_bytes),
                    bytes(free_for_jobd(x)),
                    Fit::of(x, need).words()
                );
            }
        }
        None => outln!("\nGPUs: the daemon is not reachable; not checked"),
    }
    outln!("\nReference (bf16, batch 1 × 512 tokens, same formula; LoRA = r 16 on q,k,v,o):");
    let rows = refs
        .iter()
        .map(|(n, f, l)| vec![format!("llama {n}"), bytes(l.total), bytes(f.total)])
        .collect();
    outln!("{}", table(&["MODEL", "LORA", "FULL"], rows));
    let mut all: Vec<(u64, String)> = refs
        .iter()
        .flat_map(|(n, f, l)| {
            [
                (l.total, format!("{n} LoRA")),
                (f.total, format!("{n} full")),
            ]
        })
        .collect();
    all.sort();
    let below = all
        .iter()
        .rev()
        .find(|(t, _)| *t <= need)
        .map(|(_, n)| n.clone());
    let above = all.iter().find(|(t, _)| *t > need).map(|(_, n)| n.clone());
    let place = match (below, above) {
        (None, Some(a)) => format!("less than the smallest tier ({a})"),
        (Some(bl), Some(a)) => format!("between {bl} and {a}"),
        (Some(bl), None) => format!("more than the largest tier ({bl})"),
        (None, None) => String::new(),
    };
    outln!("This job needs {}: {place}.", bytes(need));
    Ok(true)
}

/// Whether a job needing some bytes fits on one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    TooSmall,
    WhenJobsThereFinish,
    Now,
}

impl Fit {
    fn of(gpu: &GpuView, need: u64) -> Fit {
        if gpu.total_bytes < need {
            Fit::TooSmall
        } else if free_for_jobd(gpu) < need {
            Fit::WhenJobsThereFinish
        } else {
            Fit::Now
        }
    }

    /// The `--json` value.
    fn key(self) -> &'static str {
        match self {
            Fit::TooSmall => "too_small",
            Fit::WhenJobsThereFinish => "when_jobs_finish",
            Fit::Now => "now",
        }
    }

    fn words(self) -> &'static str {
        match self {
            Fit::TooSmall => "too small",
            Fit::WhenJobsThereFinish => "fits when jobs there finish",
            Fit::Now => "fits now",
        }
    }
}

/// What jobd could still reserve on a GPU: its size less foreign use and reservations.
fn free_for_jobd(gpu: &GpuView) -> u64 {
    gpu.total_bytes
        .saturating_sub(gpu.foreign_bytes + gpu.reserved_bytes)
}

fn count(n: u64) -> String {
    match n {
        0..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}
