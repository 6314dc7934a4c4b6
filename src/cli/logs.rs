//! `jobctl logs`.

use std::io::Write;

use clap::Args;

use crate::client::Client;
use crate::spec::JobId;

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Job id.
    #[arg(value_parser = super::parse_id)]
    pub id: JobId,
    /// Keep printing new output until the job ends.
    #[arg(short, long)]
    pub follow: bool,
    /// Show standard error instead of standard output.
    #[arg(long)]
    pub stderr: bool,
    /// Start this many bytes before the end.
    #[arg(long, value_name = "BYTES")]
    pub tail: Option<u64>,
}

pub async fn logs(client: &Client, args: &LogsArgs) -> anyhow::Result<bool> {
    let stream = if args.stderr { "stderr" } else { "stdout" };
    let mut path = format!(
        "/jobs/{}/logs?stream={stream}&follow={}",
        args.id, args.follow
    );
    if let Some(t) = args.tail {
        path.push_str(&format!("&tail={t}"));
    }
    // The requested stream is the result: it goes to stdout either way.
    copy(client, &path, false).await?;
    Ok(true)
}

/// Copies a log stream to our stdout (or stderr).
async fn copy(client: &Client, path: &str, to_stderr: bool) -> anyhow::Result<()> {
    let mut body = client.stream(path).await?;
    while let Some(chunk) = body.next_chunk().await? {
        if to_stderr {
            std::io::stderr().write_all(&chunk)?;
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(&chunk)?;
            out.flush()?;
        }
    }
    Ok(())
}

/// Follows a job's stdout (to our stdout) and stderr (to our stderr) until it ends.
pub async fn follow_both(client: &Client, id: JobId) -> anyhow::Result<()> {
    let (out_path, err_path) = (
        format!("/jobs/{id}/logs?stream=stdout&follow=true"),
        format!("/jobs/{id}/logs?stream=stderr&follow=true"),
    );
    let out = copy(client, &out_path, false);
    let err = copy(client, &err_path, true);
    // The first failure ends both (stdout's reader gone: no waiting for the job to end).
    tokio::try_join!(out, err).map(|_| ())
}
