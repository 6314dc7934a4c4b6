//! `jobctl logs`.

use std::io::Write;
use std::time::{Duration, Instant};

use clap::Args;

use crate::client::{Client, ClientError};
use crate::spec::JobId;
use crate::spec::api::{JobView, LOG_OFFSET_HEADER};

/// How long a following jobctl (`logs -f`, `wait`, `submit --follow`) waits for a daemon that
/// went away to come back (a restart or an upgrade) before it gives up with exit code 2.
pub const RECONNECT_FOR: Duration = Duration::from_secs(120);

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
    // The requested stream is the result: it goes to stdout either way.
    copy(client, args.id, stream, args.follow, args.tail, false).await?;
    Ok(true)
}

/// Copies a job's log to our stdout (or stderr). Following, it survives a daemon restart:
/// when the connection breaks, or the stream ends while the job has not, it waits for jobd
/// to come back and goes on from the byte where it stopped (nothing twice, nothing lost).
async fn copy(
    client: &Client,
    id: JobId,
    stream: &str,
    follow: bool,
    tail: Option<u64>,
    to_stderr: bool,
) -> anyhow::Result<()> {
    // Where the next byte comes from in the file, once the daemon has said where it started.
    let mut offset: Option<u64> = None;
    // Breaks in a row that brought no byte while jobd kept answering: a stream that cannot
    // be read, not a restart. Give up after a few.
    let mut fruitless = 0;
    loop {
        let before = offset;
        let mut path = format!("/jobs/{id}/logs?stream={stream}&follow={follow}");
        match (offset, tail) {
            (Some(o), _) => path.push_str(&format!("&offset={o}")),
            (None, Some(t)) => path.push_str(&format!("&tail={t}")),
            (None, None) => {}
        }
        let copied = async {
            let mut body = client.stream(&path).await?;
            if offset.is_none() {
                let start = body.header(LOG_OFFSET_HEADER).and_then(|v| v.parse().ok());
                offset = Some(start.unwrap_or(0));
            }
            while let Some(chunk) = body.next_chunk().await? {
                if to_stderr {
                    std::io::stderr().write_all(&chunk)?;
                } else {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&chunk)?;
                    out.flush()?;
                }
                if let Some(o) = offset.as_mut() {
                    *o += chunk.len() as u64;
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if !follow {
            return copied;
        }
        match copied {
            // The stream ends when the job does, or when jobd stops.
            Ok(()) => match client.get::<JobView>(&format!("/jobs/{id}")).await {
                Ok(j) if j.record.state.is_terminal() => return Ok(()),
                Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) if e.is_transient() => reconnect(client, &e).await?,
                Err(e) => return Err(e.into()),
            },
            Err(e) => match e.downcast_ref::<ClientError>() {
                Some(c) if c.is_transient() => {
                    fruitless = if offset == before { fruitless + 1 } else { 0 };
                    if fruitless > 3 {
                        return Err(e);
                    }
                    reconnect(client, c).await?
                }
                _ => return Err(e),
            },
        }
    }
}

/// Waits (up to [`RECONNECT_FOR`]) for jobd to answer again after it went away mid-follow,
/// saying so on stderr; the last error if it does not come back.
pub async fn reconnect(client: &Client, why: &ClientError) -> Result<(), ClientError> {
    eprintln!(
        "jobctl: lost jobd: {why}; waiting up to {}s for it to come back",
        RECONNECT_FOR.as_secs()
    );
    let deadline = Instant::now() + RECONNECT_FOR;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        match client.get::<serde_json::Value>("/health").await {
            Ok(_) => {
                eprintln!("jobctl: jobd is back; following again");
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline || !e.is_transient() => return Err(e),
            Err(_) => {}
        }
    }
}

/// Follows a job's stdout (to our stdout, or stderr with `all_to_stderr`) and stderr (to our
/// stderr) until it ends.
pub async fn follow_both(client: &Client, id: JobId, all_to_stderr: bool) -> anyhow::Result<()> {
    let out = copy(client, id, "stdout", true, None, all_to_stderr);
    let err = copy(client, id, "stderr", true, None, true);
    // The first failure ends both (stdout's reader gone: no waiting for the job to end).
    tokio::try_join!(out, err).map(|_| ())
}
