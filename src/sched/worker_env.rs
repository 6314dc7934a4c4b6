//! Turning a job about to start into a process description: its job directory, the files the
//! worker contract promises (`job.toml`, `spec.json`), and the cleared environment with the
//! documented variables (see `spec::contract`).

use std::path::Path;

use super::SchedSettings;
use crate::proc::{RunAs, SpawnRequest};
use crate::spec::contract::{self, files};
use crate::spec::{JobKind, JobRecord};

/// The jobd executable a job's worker or supervisor runs: the daemon's own file, or, once
/// an upgrade has removed it, the path the daemon was started as (a `current` link).
pub fn jobd_exe(settings: &SchedSettings) -> &Path {
    match &settings.worker_exe_link {
        Some(link) if !settings.worker_exe.exists() && link.exists() => link,
        _ => &settings.worker_exe,
    }
}

/// Prepares the job directory and describes the process to spawn.
pub fn prepare(
    rec: &JobRecord,
    settings: &SchedSettings,
    fake_gpus: bool,
) -> Result<SpawnRequest, String> {
    let dir = rec.dir(&settings.jobs_dir);
    let run_as = if settings.run_as_owner {
        Some(RunAs::lookup(&rec.owner.user).map_err(|e| e.to_string())?)
    } else {
        None
    };
    // The job directory belongs to its owner, who may have replaced any entry in it with a
    // link since the last attempt: everything below goes through `jobfs`, which follows no
    // link and changes owners and modes through handles.
    let owner = run_as.as_ref().map(|r| (r.uid, r.gid));
    let mkdir = |p: &Path, mode: u32| -> Result<(), String> {
        crate::jobfs::ensure_dir(p, mode, owner).map_err(|e| e.to_string())
    };
    mkdir(&dir, 0o750)?;
    let checkpoints = dir.join(files::CHECKPOINTS);
    let output = dir.join(files::OUTPUT);
    mkdir(&checkpoints, 0o750)?;
    mkdir(&output, 0o755)?;
    write_atomic(&dir.join(files::JOB_TOML), rec.source.as_bytes(), owner)?;
    let spec = serde_json::to_vec_pretty(&rec.spec).map_err(|e| e.to_string())?;
    write_atomic(&dir.join(files::SPEC_JSON), &spec, owner)?;

    let placement = rec.placement.clone().unwrap_or_default();
    let (user, home) = match &run_as {
        Some(r) => (r.user.clone(), r.home.display().to_string()),
        None => daemon_user(),
    };
    let mut env: Vec<(String, String)> = vec![
        ("HOME".into(), home),
        ("USER".into(), user.clone()),
        ("LOGNAME".into(), user),
        ("LANG".into(), "C.UTF-8".into()),
        (contract::ENV_JOB_ID.into(), rec.id.to_string()),
        (contract::ENV_JOB_NAME.into(), rec.name.clone()),
        (contract::ENV_JOB_DIR.into(), dir.display().to_string()),
        (
            contract::ENV_CHECKPOINT_DIR.into(),
            checkpoints.display().to_string(),
        ),
        (
            contract::ENV_OUTPUT_DIR.into(),
            output.display().to_string(),
        ),
        (contract::ENV_ATTEMPT.into(), rec.attempts.to_string()),
        (
            contract::ENV_GRACE_SECONDS.into(),
            settings.grace.as_secs().to_string(),
        ),
        (
            contract::ENV_PREEMPT_EXIT_CODE.into(),
            contract::EXIT_PREEMPTED.to_string(),
        ),
        ("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()),
        // CPU jobs see no GPU at all, so they cannot take one by accident.
        (
            "CUDA_VISIBLE_DEVICES".into(),
            placement
                .gpus
                .iter()
                .map(|g| g.index.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ),
        (
            contract::ENV_GPU_UUIDS.into(),
            placement
                .gpus
                .iter()
                .map(|g| g.uuid.clone())
                .collect::<Vec<_>>()
                .join(","),
        ),
    ];
    env.extend(sweep_env(rec));
    if !placement.gpus.is_empty() {
        env.push((
            contract::ENV_VRAM_BYTES.into(),
            placement.vram_per_gpu.to_string(),
        ));
        if fake_gpus {
            env.push((contract::ENV_FAKE_GPUS.into(), "1".into()));
        }
    }
    if let Some(n) = rec.spec.resources.cpus {
        for var in ["OMP_NUM_THREADS", "RAYON_NUM_THREADS", "MKL_NUM_THREADS"] {
            env.push((var.into(), n.to_string()));
        }
    }
    let supervised = rec
        .spec
        .command
        .as_ref()
        .and_then(|c| c.argv.first().cloned())
        .filter(|_| rec.kind == JobKind::Command);
    let (program, args, cwd, path) = match (rec.kind, &rec.spec.command) {
        (JobKind::Command, Some(cmd)) => {
            for (k, v) in &cmd.env {
                env.push((k.clone(), v.clone()));
            }
            let cwd = cmd.workdir.clone().unwrap_or_else(|| dir.clone());
            let path = cmd.env.get("PATH").cloned();
            // Run under `jobd run-command`, which records the outcome in the job directory
            // (read by recovery when the command ended while jobd was down).
            let mut args = vec![
                "run-command".to_string(),
                "--status".into(),
                dir.join(files::EXIT_STATUS).display().to_string(),
                "--attempt".into(),
                rec.attempts.to_string(),
            ];
            // A root daemon's supervisor stays root and runs the command as its owner (see
            // `proc::spawn`), so that the job cannot kill it.
            if let Some(r) = &run_as {
                args.extend([
                    "--uid".into(),
                    r.uid.to_string(),
                    "--gid".into(),
                    r.gid.to_string(),
                    "--workdir".into(),
                    cwd.display().to_string(),
                ]);
                if !r.groups.is_empty() {
                    let groups: Vec<String> = r.groups.iter().map(u32::to_string).collect();
                    args.extend(["--groups".into(), groups.join(",")]);
                }
            }
            args.push("--".into());
            args.extend(cmd.argv.iter().cloned());
            (jobd_exe(settings).display().to_string(), args, cwd, path)
        }
        _ => (
            jobd_exe(settings).display().to_string(),
            vec![
                "worker".into(),
                "--job-dir".into(),
                dir.display().to_string(),
            ],
            dir.clone(),
            None,
        ),
    };
    if path.is_none() {
        env.push(("PATH".into(), contract::DEFAULT_PATH.into()));
    }
    if rec.kind != JobKind::Command
        && let Some(libs) = &settings.worker_library_path
    {
        env.push(("LD_LIBRARY_PATH".into(), libs.clone()));
    }
    Ok(SpawnRequest {
        program,
        args,
        env,
        cwd,
        stdout: dir.join(files::STDOUT),
        stderr: dir.join(files::STDERR),
        run_as,
        supervised,
        kill_escaped: true,
    })
}

/// Writes a file that must never be seen half-written: temp file, fsync, rename.
fn write_atomic(path: &Path, bytes: &[u8], owner: crate::jobfs::Owner) -> Result<(), String> {
    crate::jobfs::write_atomic(path, bytes, owner).map_err(|e| e.to_string())
}

/// The daemon's own user name and home, for jobs run as the daemon.
pub(super) fn daemon_user() -> (String, String) {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => (u.name, u.dir.display().to_string()),
        _ => (uid.to_string(), "/".into()),
    }
}

/// A sweep's job is told which one it is (`JOBD_SWEEP_ID`, `_INDEX`, `_SIZE`); other jobs get
/// nothing.
pub(super) fn sweep_env(rec: &JobRecord) -> Vec<(String, String)> {
    rec.sweep
        .as_ref()
        .map(|s| {
            vec![
                (contract::ENV_SWEEP_ID.into(), s.id.to_string()),
                (contract::ENV_SWEEP_INDEX.into(), s.index.to_string()),
                (contract::ENV_SWEEP_SIZE.into(), s.size.to_string()),
            ]
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Owner, now_ms};

    fn record(text: &str) -> JobRecord {
        let spec = crate::spec::job::parse("t.toml", text).expect("job parses");
        let owner = Owner {
            user: "alice".into(),
            uid: 1000,
        };
        let mut r = JobRecord::new_queued(owner, "t".into(), spec, text.into(), now_ms());
        r.id = 7;
        r
    }

    fn env_of(req: &SpawnRequest, key: &str) -> Option<String> {
        req.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn train_workers_get_the_daemons_library_path_and_commands_do_not() {
        let tmp = tempfile::tempdir().unwrap();
        let settings = SchedSettings {
            jobs_dir: tmp.path().to_path_buf(),
            worker_library_path: Some("/opt/cuda/lib64".into()),
            ..SchedSettings::for_tests(tmp.path(), Default::default())
        };
        let train = record(include_str!("../../jobs/tiny.toml"));
        let req = prepare(&train, &settings, false).unwrap();
        assert_eq!(req.args[0], "worker");
        assert_eq!(
            env_of(&req, "LD_LIBRARY_PATH").as_deref(),
            Some("/opt/cuda/lib64")
        );
        let command = record("kind = \"command\"\n[command]\nargv = [\"true\"]\n");
        let req = prepare(&command, &settings, false).unwrap();
        assert_eq!(env_of(&req, "LD_LIBRARY_PATH"), None);
        let none = SchedSettings {
            worker_library_path: None,
            ..settings
        };
        let req = prepare(&train, &none, false).unwrap();
        assert_eq!(env_of(&req, "LD_LIBRARY_PATH"), None);
    }
}
