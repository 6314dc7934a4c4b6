//! Identity and authorisation: who may change what.

use crate::daemon::*;

/// Another user's cancel is refused with 403; the owner's and an admin's succeed.
#[test]
fn only_the_owner_or_an_admin_may_cancel() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let job = d.write("j.toml", &command_job("sleep 30", ""));
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();

    // Over HTTP directly: 403 with the error shape.
    let (status, body) = post_json(
        d.addr(),
        &format!("/api/v1/jobs/{id}/cancel"),
        Some(TOKEN_DAEMON),
        "{}",
    );
    assert_eq!(status, 403, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "forbidden");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("belongs to nobody"),
        "{body}"
    );
    // Through jobctl: exit 1 and the reason.
    let out = d.jobctl_tcp(Some(TOKEN_DAEMON), &["cancel", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("only its owner or an admin"),
        "{}",
        stderr(&out)
    );
    let out = d.jobctl_tcp(Some(TOKEN_DAEMON), &["priority", &id, "5"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "priority changes are refused too"
    );

    // A user may lower their job's priority, not raise it above scheduler.max_user_priority
    // (0 by default): that would put it ahead of other people's jobs and preempt them.
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["priority", &id, "1"]);
    assert!(
        out.status.code() == Some(1) && stderr(&out).contains("scheduler.max_user_priority"),
        "{}",
        stderr(&out)
    );
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["priority", &id, "-5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let high = d.write("high.toml", &command_job("sleep 30", "priority = 3"));
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", high.to_str().unwrap()]);
    assert!(
        out.status.code() == Some(1) && stderr(&out).contains("above what users may give"),
        "{}",
        stderr(&out)
    );
    // An admin may raise it; its owner may then lower it again, not raise it further.
    assert!(d.jobctl(&["priority", &id, "50"]).status.success());
    assert!(
        d.jobctl_tcp(Some(TOKEN_NOBODY), &["priority", &id, "20"])
            .status
            .success()
    );
    assert_eq!(
        d.jobctl_tcp(Some(TOKEN_NOBODY), &["priority", &id, "30"])
            .status
            .code(),
        Some(1)
    );

    // The socket caller here is the test's own user: root or the daemon's user, an admin.
    let out = d.jobctl(&["cancel", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// On TCP, a request without a valid token cannot change anything (401); reading is allowed.
#[test]
fn tcp_without_a_valid_token_is_refused() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let job = d.write("j.toml", &command_job("sleep 30", ""));
    let body = serde_json::json!({"toml": std::fs::read_to_string(&job).unwrap(), "base_dir": d.dir.path()}).to_string();
    let (status, resp) = post_json(d.addr(), "/api/v1/jobs", None, &body);
    assert_eq!(status, 401, "{resp}");
    let (status, resp) = post_json(d.addr(), "/api/v1/jobs", Some("not-a-token"), &body);
    assert_eq!(status, 401, "{resp}");
    assert!(resp.contains("invalid bearer token"));
    // Validation checks paths with the daemon's rights: not for anonymous callers.
    let probe = serde_json::json!({"toml": "kind = \"command\"\n[command]\nargv = [\"/root/.bashrc\"]\n", "base_dir": "/"}).to_string();
    let (status, resp) = post_json(d.addr(), "/api/v1/jobs/validate", None, &probe);
    assert_eq!(status, 401, "{resp}");
    let (status, resp) = post_json(d.addr(), "/api/v1/jobs/validate", Some(TOKEN_NOBODY), &body);
    assert_eq!(status, 200, "{resp}");
    let (status, resp) = raw_http(d.addr(), b"GET /api/v1/jobs HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong\r\nConnection: close\r\n\r\n");
    assert_eq!(
        status, 401,
        "a wrong token is refused even for reads: {resp}"
    );
    let (status, _) = post_json(d.addr(), "/api/v1/jobs", Some(TOKEN_NOBODY), &body);
    assert_eq!(status, 201);
    let id = 1;
    let (status, _) = post_json(d.addr(), &format!("/api/v1/jobs/{id}/cancel"), None, "{}");
    assert_eq!(status, 401);
    // jobctl without a token: a clear message, exit 1.
    let out = d.jobctl_tcp(None, &["cancel", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bearer token"), "{}", stderr(&out));
    // Reading needs no token.
    let (status, body) = raw_http(
        d.addr(),
        b"GET /api/v1/jobs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    let who = d.jobctl_tcp(Some(TOKEN_NOBODY), &["whoami"]);
    assert!(stdout(&who).starts_with("nobody"), "{}", stdout(&who));
}

/// Logs are private to the owner and admins; other users get 403.
#[test]
fn logs_are_private_to_the_owner() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let job = d.write("j.toml", &command_job("echo secret", ""));
    let out = d.jobctl_tcp(
        Some(TOKEN_NOBODY),
        &["submit", "--follow", job.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let other = d.jobctl_tcp(Some(TOKEN_DAEMON), &["logs", "1"]);
    assert_eq!(other.status.code(), Some(1));
    assert!(
        stderr(&other).contains("visible to its owner"),
        "{}",
        stderr(&other)
    );
    let owner = d.jobctl_tcp(Some(TOKEN_NOBODY), &["logs", "1"]);
    assert_eq!(stdout(&owner), "secret\n");
}

/// A train job of `tiny.toml` publishing as `name`, with its data copied where any user can
/// read it (jobs submitted with another user's token are checked with that user's rights).
pub fn tiny_publishing_as(d: &TestDaemon, name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = tempfile::Builder::new()
        .prefix("jobd-data")
        .tempdir()
        .unwrap()
        .keep();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["tiny_train.jsonl", "tiny_eval.jsonl"] {
        let to = data.join(f);
        std::fs::copy(repo.join("jobs/data").join(f), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let text = std::fs::read_to_string(repo.join("jobs/tiny.toml"))
        .unwrap()
        .replace("data/tiny_", &format!("{}/tiny_", data.display()))
        .replace("jobd/tiny-shift:latest", name);
    d.write(&format!("{}.toml", name.replace(['/', ':'], "_")), &text)
}

/// In the daemon's shared Ollama directory a user may not take a name that jobd did not
/// publish (a model pulled with `ollama pull`), while their own names and an admin's are
/// fine: anyone could otherwise put their weights behind a model others run.
#[test]
fn a_shared_model_name_is_its_publishers() {
    let models = tempfile::tempdir().unwrap();
    let d = TestDaemon::publishing_to(models.path());
    let pulled = models
        .path()
        .join("manifests/registry.ollama.ai/library/llama3");
    std::fs::create_dir_all(&pulled).unwrap();
    std::fs::write(pulled.join("latest"), "{}").unwrap();

    let squat = tiny_publishing_as(&d, "llama3");
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", squat.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("llama3:latest")
            && stderr(&out).contains("published by someone outside jobd"),
        "{}",
        stderr(&out)
    );
    let own = tiny_publishing_as(&d, "nobody/shift");
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", own.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(d.jobctl(&["cancel", stdout(&out).trim()]).status.success());
    // root is an admin.
    let out = d.jobctl(&["submit", squat.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(d.jobctl(&["cancel", stdout(&out).trim()]).status.success());

    // A name taken outside jobd while a job trains is checked again before publishing: the
    // job fails to publish (it used to replace the model), and can be published by hand
    // under another name.
    let short = [
        "--set",
        "training.max_steps=40",
        "--set",
        "training.eval_steps=20",
        "--set",
        "training.save_steps=20",
        "--set",
        "training.logging_steps=10",
    ];
    let later = tiny_publishing_as(&d, "later");
    let mut args = vec!["submit", later.to_str().unwrap(), "--hold"];
    args.extend(short);
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let taken = models
        .path()
        .join("manifests/registry.ollama.ai/library/later");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join("latest"), "{\"handmade\": true}").unwrap();
    assert!(
        d.jobctl_tcp(Some(TOKEN_NOBODY), &["release", &id])
            .status
            .success()
    );
    d.wait_state(
        id.parse().unwrap(),
        jobd::spec::JobState::Failed,
        std::time::Duration::from_secs(180),
    );
    let rec = d.job(id.parse().unwrap()).record;
    assert!(
        rec.reason
            .as_deref()
            .is_some_and(|r| r.contains("outside jobd")),
        "{:?}",
        rec.reason
    );
    assert_eq!(
        std::fs::read_to_string(taken.join("latest")).unwrap(),
        "{\"handmade\": true}"
    );
    let out = d.jobctl_tcp(
        Some(TOKEN_NOBODY),
        &["publish", &id, "--name", "nobody/later"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}
