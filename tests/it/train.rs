//! Train jobs through the real daemon: the tiny demo learns, publishes, answers held-out
//! prompts and runs in llama.cpp as in Candle (`llama_cpp.rs`), as a llama and as a Qwen3; interrupted runs (cancel +
//! requeue, kill -9 of the worker, kill -9 of jobd) end bit-identical to uninterrupted ones.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use jobd::spec::JobState;

use crate::daemon::*;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn metrics(d: &TestDaemon, id: u64) -> Vec<serde_json::Value> {
    std::fs::read_to_string(d.state.join(format!("jobs/{id}/metrics.jsonl")))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The tiny demo through the daemon: eval loss falls below a quarter of the first training
/// loss, the model is published into the Ollama store, and `jobd generate` answers held-out
/// prompts (never seen in training) correctly; published again as f32, f16 and q8_0, it runs
/// in llama.cpp as it does in Candle (see `llama_cpp.rs`).
#[test]
fn tiny_job_learns_publishes_and_answers_held_out_prompts() {
    let models = tempfile::tempdir().unwrap();
    let d = TestDaemon::publishing_to(models.path());
    let tiny = repo().join("jobs/tiny.toml");
    let out = d.jobctl(&["submit", "--follow", tiny.to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("step 400/400"),
        "progress lines in the job's output:\n{}",
        stdout(&out)
    );
    let id = 1;
    let m = metrics(&d, id);
    let first = m[0]["loss"].as_f64().unwrap();
    let eval = m
        .iter()
        .rev()
        .find_map(|r| r["eval_loss"].as_f64())
        .unwrap();
    assert!(eval < first / 4.0, "eval loss {eval} vs first loss {first}");

    let job = d.job(id).record;
    assert_eq!(job.state, JobState::Succeeded);
    let published = job.published.expect("published");
    assert_eq!(published.name, "jobd/tiny-shift:latest");
    assert_eq!(published.run_command, "ollama run jobd/tiny-shift:latest");
    assert!(
        models
            .path()
            .join("manifests/registry.ollama.ai/jobd/tiny-shift/latest")
            .exists()
    );
    let show = stdout(&d.jobctl(&["show", &id.to_string()]));
    assert!(show.contains("ollama run jobd/tiny-shift"), "{show}");
    let events = d.events(id);
    assert!(
        events.iter().any(|e| e.state == JobState::Publishing),
        "publishing is a visible stage"
    );
    let listing = stdout(&d.jobctl(&["models"]));
    assert!(listing.contains("jobd/tiny-shift:latest"), "{listing}");
    // Another user may not put their model behind that name in the shared directory.
    let squat = crate::auth::tiny_publishing_as(&d, "jobd/tiny-shift");
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", squat.to_str().unwrap()]);
    assert!(
        out.status.code() == Some(1) && stderr(&out).contains("published by root (job 1)"),
        "{}",
        stderr(&out)
    );

    let output = d.state.join(format!("jobs/{id}/output"));
    let (right, total) = held_out_right(&output, 20);
    assert!(
        right * 10 >= total * 9,
        "{right} of {total} held-out prompts answered correctly"
    );
    crate::llama_cpp::published_tiny_runs_in_llama_cpp_like_candle(&d, id, models.path(), &repo());
    lora_on_the_trained_model(&d, &output, models.path());
}

/// Qwen3 through the daemon: the tiny demo with `model.qk_norm = true` (Qwen3's per-head
/// query/key norms) trains through the CPU's hand-written step, writes a `qwen3`
/// checkpoint that answers held-out prompts, publishes a `qwen3` GGUF that llama.cpp runs as
/// Candle does (see `llama_cpp.rs`); LoRA on it then trains adapters only, leaving the
/// norms as they were.
#[test]
fn qwen3_learns_publishes_and_runs_in_llama_cpp() {
    let models = tempfile::tempdir().unwrap();
    let d = TestDaemon::publishing_to(models.path());
    let tiny = repo().join("jobs/tiny.toml");
    let out = d.jobctl(&[
        "submit",
        "--follow",
        tiny.to_str().unwrap(),
        "--set",
        "model.qk_norm=true",
        "--set",
        "publish.ollama_name=\"jobd/tiny-qwen3:latest\"",
    ]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let id = 1;
    let output = d.state.join(format!("jobs/{id}/output"));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen3");
    assert_eq!(config["architectures"][0], "Qwen3ForCausalLM");
    assert_eq!(
        config["head_dim"], 16,
        "written: Qwen3's own default is 128"
    );
    let log = std::fs::read_to_string(d.state.join(format!("jobs/{id}/stderr.log"))).unwrap();
    assert!(
        log.contains("backward=\"direct\""),
        "the worker's step:\n{log}"
    );
    let (right, total) = held_out_right(&output, 20);
    assert!(
        right * 10 >= total * 9,
        "qwen3: {right} of {total} held-out prompts answered correctly"
    );
    let blob = crate::publish_support::model_blob(models.path(), "jobd/tiny-qwen3:latest");
    let mut f = std::fs::File::open(&blob).unwrap();
    let gguf = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(
        gguf.metadata["general.architecture"].to_string().unwrap(),
        "qwen3"
    );
    assert!(gguf.tensor_infos.contains_key("blk.0.attn_q_norm.weight"));
    crate::llama_cpp::published_tiny_runs_in_llama_cpp_like_candle(&d, id, models.path(), &repo());

    // LoRA on the Qwen3 model: the norms are frozen, so the merged model keeps them.
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("lora.toml");
    let data = repo().join("jobs/data");
    std::fs::write(
        &job,
        format!(
            r#"
name = "qwen3-lora"
kind = "train"
[model]
base = "{}"
[data]
train_file = "{}"
block_size = 16
[training]
max_steps = 20
per_device_train_batch_size = 16
learning_rate = 5e-4
seed = 3
[lora]
r = 4
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
[publish]
ollama_name = "jobd/tiny-qwen3-lora:latest"
"#,
            output.display(),
            data.join("tiny_train.jsonl").display(),
        ),
    )
    .unwrap();
    let out = d.jobctl(&["submit", "--follow", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let merged = d.state.join("jobs/2/output");
    let load = |dir: &Path| {
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (base_w, merged_w) = (load(&output), load(&merged));
    for name in [
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.1.self_attn.k_norm.weight",
    ] {
        let (a, b) = (&base_w[name], &merged_w[name]);
        let same = a
            .eq(b)
            .unwrap()
            .min_all()
            .unwrap()
            .to_scalar::<u8>()
            .unwrap();
        assert_eq!(same, 1, "{name}: frozen under LoRA");
    }
    let q = "model.layers.0.self_attn.q_proj.weight";
    let moved = (&base_w[q] - &merged_w[q])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 0.0,
        "the adapter is merged into q_proj"
    );
    let blob = crate::publish_support::model_blob(models.path(), "jobd/tiny-qwen3-lora:latest");
    assert!(blob.exists(), "the merged model is published");
}

/// How many of the first `n` held-out prompts of the tiny task `jobd generate` answers right
/// with the model in `dir`; and `n`.
fn held_out_right(dir: &Path, n: usize) -> (usize, usize) {
    let eval_file = std::fs::read_to_string(repo().join("jobs/data/tiny_eval.jsonl")).unwrap();
    let mut right = 0;
    for line in eval_file.lines().take(n) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (prompt, want) = (
            v["prompt"].as_str().unwrap(),
            v["completion"].as_str().unwrap(),
        );
        let out = Command::new(JOBD)
            .args(["generate", "--model", dir.to_str().unwrap()])
            .args(["--prompt", prompt, "--max-tokens", "5"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        if stdout(&out).starts_with(want) {
            right += 1;
        }
    }
    (right, n)
}

/// LoRA on top of the tiny job's output through the daemon: adapters on every projection with
/// dropout and activation checkpointing (the trainer's hand-written step), merged into the base
/// and published; the merged model still answers held-out prompts.
fn lora_on_the_trained_model(d: &TestDaemon, base: &Path, models: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("lora.toml");
    let data = repo().join("jobs/data");
    std::fs::write(
        &job,
        format!(
            r#"
name = "tiny-lora"
kind = "train"
[model]
base = "{}"
[data]
train_file = "{}"
eval_file = "{}"
block_size = 16
[training]
max_steps = 40
per_device_train_batch_size = 16
learning_rate = 5e-4
logging_steps = 10
save_steps = 20
gradient_checkpointing = true
seed = 3
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.1
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[publish]
ollama_name = "jobd/tiny-lora:latest"
"#,
            base.display(),
            data.join("tiny_train.jsonl").display(),
            data.join("tiny_eval.jsonl").display()
        ),
    )
    .unwrap();
    // A base whose tokenizer GGUF cannot represent is refused before training, by both
    // `jobctl validate` and the daemon (it used to train, then fail to publish).
    let copy_base = |name: &str| {
        let copy = dir.path().join(name);
        std::fs::create_dir(&copy).unwrap();
        for e in std::fs::read_dir(base).unwrap().flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
            }
        }
        copy
    };
    let odd = copy_base("odd-base");
    let tok_path = odd.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&tok_path).unwrap()).unwrap();
    tok["normalizer"] = serde_json::json!({"type": "NFKC"});
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let odd_job = dir.path().join("odd.toml");
    std::fs::write(
        &odd_job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace(&base.display().to_string(), &odd.display().to_string()),
    )
    .unwrap();
    for cmd in ["validate", "submit"] {
        let out = d.jobctl(&[cmd, odd_job.to_str().unwrap()]);
        let err = stderr(&out);
        assert!(
            !out.status.success()
                && err.contains("model.base")
                && err.contains("normalizer")
                && err.contains("fail to publish"),
            "{cmd}: {err}"
        );
    }
    // The daemon's own check (a client that skips jobctl's); a root daemon reads the files
    // with the token user's rights.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let refused_by_daemon = |job: &Path, words: &str| {
        let body = serde_json::json!({
            "toml": std::fs::read_to_string(job).unwrap(),
            "base_dir": dir.path(),
        });
        let (status, resp) = post_json(
            d.addr(),
            "/api/v1/jobs",
            Some(TOKEN_DAEMON),
            &body.to_string(),
        );
        assert!(status == 400 && resp.contains(words), "{status} {resp}");
    };
    refused_by_daemon(&odd_job, "normalizer");
    // Conversations need a chat template. The tiny model has none, so a chat job on it is
    // refused at submit, by jobctl and by the daemon, naming the data and the fix (a copy of
    // it the daemon's token user may read).
    let chat_base = copy_base("chat-base");
    let chat_job = dir.path().join("chat.toml");
    std::fs::write(
        &chat_job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace(
                &base.display().to_string(),
                &chat_base.display().to_string(),
            )
            .replace("tiny_train.jsonl", "tiny_chat_train.jsonl")
            .replace("tiny_eval.jsonl", "tiny_chat_eval.jsonl"),
    )
    .unwrap();
    for cmd in ["validate", "submit"] {
        let out = d.jobctl(&[cmd, chat_job.to_str().unwrap()]);
        let err = stderr(&out);
        assert!(
            !out.status.success()
                && err.contains("data.train_file")
                && err.contains("no chat_template")
                && err.contains("set data.chat_template"),
            "{cmd}: {err}"
        );
    }
    refused_by_daemon(&chat_job, "no chat_template");
    // A template whose expression is deep enough to overflow a parser's stack (hidden after
    // a `}}` in a dict literal) is refused, by jobctl and by the daemon, which lives on.
    let deep = dir.path().join("deep.jinja");
    std::fs::write(
        &deep,
        format!("{{{{ ({{'a': {{}}}}) ~ {}1 }}}}", "- ".repeat(100_000)),
    )
    .unwrap();
    let deep_job = dir.path().join("deep.toml");
    let with_deep = std::fs::read_to_string(&chat_job).unwrap().replace(
        "[data]\n",
        &format!("[data]\nchat_template = \"{}\"\n", deep.display()),
    );
    std::fs::write(&deep_job, with_deep).unwrap();
    let out = d.jobctl(&["validate", deep_job.to_str().unwrap()]);
    assert!(
        !out.status.success() && stderr(&out).contains("more than 1024 tokens"),
        "{}",
        stderr(&out)
    );
    refused_by_daemon(&deep_job, "more than 1024 tokens");
    assert!(d.jobctl(&["list"]).status.success(), "the daemon lives on");
    let template = dir.path().join("chatml.jinja");
    std::fs::write(&template, jobd::chat::CHATML).unwrap();
    let set = format!("data.chat_template=\"{}\"", template.display());
    let out = d.jobctl(&["validate", chat_job.to_str().unwrap(), "--set", &set]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = d.jobctl(&["submit", "--follow", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let id = 2;
    let rec = d.job(id).record;
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!(
        rec.published.expect("published").name,
        "jobd/tiny-lora:latest"
    );
    assert!(
        models
            .join("manifests/registry.ollama.ai/jobd/tiny-lora/latest")
            .exists()
    );
    let log = std::fs::read_to_string(d.state.join(format!("jobs/{id}/stderr.log"))).unwrap();
    assert!(
        log.contains("direct over ops") && log.contains("activation_checkpointing=true"),
        "the worker's step:\n{log}"
    );
    let merged = d.state.join(format!("jobs/{id}/output"));
    let (right, total) = held_out_right(&merged, 10);
    assert!(
        right * 10 >= total * 8,
        "merged LoRA model: {right} of {total} held-out prompts right"
    );
}

/// A job file for a short variant of the demo (120 steps, a checkpoint every 10).
fn short_job(dir: &Path, seed: u64) -> String {
    let data = repo().join("jobs/data");
    let text = std::fs::read_to_string(repo().join("jobs/tiny.toml")).unwrap();
    let text = text.split("[publish]").next().unwrap().to_string();
    let text = text
        .replace("data/tiny_", &format!("{}/tiny_", data.display()))
        .replace("max_steps = 400", "max_steps = 120")
        .replace("save_steps = 100", "save_steps = 10")
        .replace("logging_steps = 25", "logging_steps = 10")
        .replace("eval_steps = 100", "eval_steps = 40")
        .replace("save_total_limit = 2", "save_total_limit = 3")
        .replace("seed = 1", &format!("seed = {seed}"));
    let _ = dir;
    format!("{text}\n[retry]\nmax = 5\nbackoff = \"0s\"\n")
}

fn step(d: &TestDaemon, id: u64) -> u64 {
    std::fs::read(d.state.join(format!("jobs/{id}/progress.json")))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(0)
}

fn wait_step(d: &TestDaemon, id: u64, at_least: u64) {
    wait_for(
        &format!("job {id} to reach step {at_least}"),
        Duration::from_secs(120),
        || d.state(id) == JobState::Running && step(d, id) >= at_least,
    );
}

#[derive(Clone, Copy, Debug)]
enum Interruption {
    /// `jobctl cancel` (SIGTERM: the worker checkpoints) then `jobctl requeue`.
    CancelRequeue,
    /// kill -9 of the worker: `[retry]` requeues it; it resumes from its last checkpoint.
    KillWorker,
    /// kill -9 of the daemon and of its worker (the machine went down), then a restart:
    /// recovery requeues the job; it resumes from its last checkpoint.
    KillDaemonAndWorker,
    /// kill -9 of the daemon only, then a restart: the worker never stopped; the restarted
    /// daemon takes it over and it goes on (no resume).
    KillDaemon,
}

/// Deterministic fields of the metrics records (wall-clock fields differ run to run).
fn deterministic(m: &[serde_json::Value]) -> Vec<String> {
    m.iter()
        .map(|r| {
            format!(
                "{} {} {} {} {} {}",
                r["step"],
                r["epoch"],
                r["loss"],
                r["learning_rate"],
                r["grad_norm"],
                r["eval_loss"]
            )
        })
        .collect()
}

fn interrupted_run_is_bit_identical(seed: u64, schedule: &[(u64, Interruption)]) {
    let mut d = TestDaemon::start(&[
        "--gpus",
        "none",
        "--max-cpu-jobs",
        "1",
        "--grace-period",
        "20s",
    ]);
    let file = d.write("short.toml", &short_job(d.dir.path(), seed));
    let reference = d.submit(&file);
    let out = d.jobctl(&["wait", &reference.to_string()]);
    assert!(out.status.success(), "reference run: {}", stderr(&out));

    let id = d.submit(&file);
    for (at, how) in schedule {
        wait_step(&d, id, *at);
        match how {
            Interruption::CancelRequeue => {
                assert!(d.jobctl(&["cancel", &id.to_string()]).status.success());
                d.wait_state(id, JobState::Cancelled, Duration::from_secs(30));
                let out = d.jobctl(&["requeue", &id.to_string()]);
                assert!(out.status.success(), "{}", stderr(&out));
            }
            Interruption::KillWorker => {
                let pid = d.job(id).record.process.expect("running worker").pid;
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .unwrap();
            }
            Interruption::KillDaemonAndWorker => {
                let pid = d.job(id).record.process.expect("running worker").pid;
                d.kill9();
                nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .unwrap();
                d.restart();
            }
            Interruption::KillDaemon => {
                let before = d.job(id).record;
                d.kill9();
                d.restart();
                let after = d.job(id).record;
                assert_eq!(
                    (after.state, after.attempts, after.process.map(|p| p.pid)),
                    (
                        JobState::Running,
                        before.attempts,
                        before.process.map(|p| p.pid)
                    ),
                    "the same worker goes on: {:#?}",
                    d.events(id)
                );
            }
        }
    }
    let out = d.jobctl(&["wait", &id.to_string()]);
    assert!(
        out.status.success(),
        "interrupted run: {}\n{}",
        stderr(&out),
        d.log()
    );

    let weights = |job: u64| {
        std::fs::read(d.state.join(format!("jobs/{job}/output/model.safetensors"))).unwrap()
    };
    assert!(
        weights(id) == weights(reference),
        "final weights are bit-identical (seed {seed}, {schedule:?})"
    );
    assert_eq!(
        deterministic(&metrics(&d, id)),
        deterministic(&metrics(&d, reference)),
        "the same metrics records"
    );
    let log = std::fs::read_to_string(d.state.join(format!("jobs/{id}/stderr.log"))).unwrap();
    let resumes = schedule
        .iter()
        .filter(|(_, how)| !matches!(how, Interruption::KillDaemon))
        .count();
    assert_eq!(
        log.matches("jobd worker: resumed from step").count(),
        resumes,
        "each restart resumed, and a worker taken over did not restart:\n{log}"
    );
    let _ = d.pid();
}

#[test]
fn interruptions_seed_1_end_bit_identical() {
    use Interruption::*;
    interrupted_run_is_bit_identical(
        1,
        &[
            (20, CancelRequeue),
            (45, KillDaemon),
            (70, KillWorker),
            (95, KillDaemonAndWorker),
        ],
    );
}

#[test]
fn interruptions_seed_2_end_bit_identical() {
    use Interruption::*;
    interrupted_run_is_bit_identical(
        2,
        &[
            (15, KillDaemonAndWorker),
            (40, KillDaemon),
            (67, KillWorker),
            (95, CancelRequeue),
        ],
    );
}

/// A train job whose training finished but whose publishing failed (here: the Ollama models
/// directory had become a file) fails saying why, and can then be published by hand once the
/// problem is fixed; it used to be refused ("not a succeeded train job") with no way out but
/// `jobctl export`. A quantization the model's shape cannot take is refused at submit.
#[test]
fn a_failed_publish_can_be_done_again_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    std::fs::create_dir(&models).unwrap();
    let d = TestDaemon::publishing_to(&models);
    let text = tiny_four_steps();
    assert!(text.contains("max_steps = 4\n") && text.contains("warmup_steps = 1\n"));
    // q4_k needs rows of 256; the tiny model's are 64 wide: refused before any training.
    let q4k = d.write("tiny-q4k.toml", &text.replace("\"f16\"", "\"q4_k\""));
    let out = d.jobctl(&["submit", q4k.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("publish.quantization: q4_k needs every weight's input dimension"),
        "{}",
        stderr(&out)
    );

    // The models directory breaks while the job trains (a missing one is refused at submit).
    // Its notifier hears of both ends: the failure, then the success with the model.
    let ends = tmp.path().join("ends");
    let tell = d.write(
        "tell.sh",
        &format!(
            "#!/bin/sh\necho \"$JOBD_JOB_STATE $JOBD_MODEL\" >> {}\n",
            ends.display()
        ),
    );
    std::fs::set_permissions(&tell, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let longer = format!(
        "{}\n[notify]\nargv = [{:?}]\n",
        text.replace("max_steps = 4\n", "max_steps = 60\n"),
        tell.display().to_string()
    );
    let id = d.submit(&d.write("tiny-short.toml", &longer));
    d.wait_state(id, JobState::Running, Duration::from_secs(20));
    std::fs::remove_dir(&models).unwrap();
    std::fs::write(&models, "not a directory").unwrap();
    let again = d.write("again.toml", &text);
    let out = d.jobctl(&["submit", again.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("Ollama models directory")
            && stderr(&out).contains("is not a directory"),
        "{}",
        stderr(&out)
    );
    d.wait_state(id, JobState::Failed, Duration::from_secs(60));
    let reason = d.job(id).record.reason.unwrap_or_default();
    assert!(reason.contains("publishing failed"), "{reason}");
    let told = || std::fs::read_to_string(&ends).unwrap_or_default();
    wait_for(
        "the failure's notification",
        Duration::from_secs(20),
        || told() == "failed \n",
    );

    std::fs::remove_file(&models).unwrap();
    std::fs::create_dir(&models).unwrap();
    let out = d.jobctl(&["publish", &id.to_string(), "--quantization", "q8_0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rec = d.job(id).record;
    assert_eq!(rec.published.expect("published").quantization, "q8_0");
    // It has done all it was for now: succeeded, and `wait` says so.
    assert_eq!(rec.state, JobState::Succeeded);
    wait_for(
        "the success's notification",
        Duration::from_secs(20),
        || told() == "failed \nsucceeded jobd/tiny-shift:latest\n",
    );
    // Mistakes in a publish or export by hand are named before any work.
    let job = id.to_string();
    for (args, why) in [
        (vec!["publish", &job, "--name", ""], "must not be empty"),
        (
            vec!["publish", &job, "--models-dir", again.to_str().unwrap()],
            "is not a directory",
        ),
        (
            vec!["export", &job, "--gguf", tmp.path().to_str().unwrap()],
            "a directory; give the file to write",
        ),
        (
            vec!["export", &job, "--gguf", "/no/such/dir/m.gguf"],
            "/no/such/dir does not exist",
        ),
    ] {
        let out = d.jobctl(&args);
        assert!(
            out.status.code() == Some(1) && stderr(&out).contains(why),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(d.jobctl(&["wait", &id.to_string()]).status.success());
    // A models directory of the user's own: `publish --models-dir` writes there and
    // `models --models-dir` lists it; the daemon's listing is of its own directory.
    let own = tmp.path().join("own-models");
    std::fs::create_dir(&own).unwrap();
    let own_dir = own.to_str().unwrap();
    let out = d.jobctl(&[
        "publish",
        &job,
        "--models-dir",
        own_dir,
        "--name",
        "jobd/own:v1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = d.jobctl(&["models", "--models-dir", own_dir]);
    assert!(
        stdout(&listed).contains("jobd/own:v1") && stderr(&listed).contains(own_dir),
        "{}{}",
        stdout(&listed),
        stderr(&listed)
    );
    assert!(!stdout(&d.jobctl(&["models"])).contains("jobd/own:v1"));
    let missing = d.jobctl(&["models", "--models-dir", "/no/such/models"]);
    assert!(
        missing.status.code() == Some(1)
            && stderr(&missing).contains("--models-dir /no/such/models: No such file"),
        "{}",
        stderr(&missing)
    );
    // A job that never finished training has nothing to publish.
    let never = d.write("never.toml", &command_job("exit 3", ""));
    let cmd = d.submit(&never);
    d.wait_state(cmd, JobState::Failed, Duration::from_secs(20));
    let out = d.jobctl(&["publish", &cmd.to_string(), "--name", "x/y:z"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no finished training"),
        "{}",
        stderr(&out)
    );
}

/// A train job that fails says why in its reason (`jobctl show`, `list`, `--json`), not only in
/// its log: QA saw "failed: exit code 1" for a data file with a line that is not JSON.
#[test]
fn a_failed_train_job_says_why_in_its_reason() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let data = repo().join("jobs/data");
    let mut lines = std::fs::read_to_string(data.join("tiny_train.jsonl")).unwrap();
    lines.push_str("{\"text\": \"unterminated\n");
    let bad = d.write("bad.jsonl", &lines);
    let text = std::fs::read_to_string(repo().join("jobs/tiny.toml"))
        .unwrap()
        .replace(
            "\"data/tiny_train.jsonl\"",
            &format!("{:?}", bad.display().to_string()),
        )
        .replace("\"data/", &format!("\"{}/", data.display()));
    let text = text.split("[publish]").next().unwrap().to_string();
    let id = d.submit(&d.write("bad.toml", &text));
    d.wait_state(id, JobState::Failed, Duration::from_secs(60));
    let reason = d.job(id).record.reason.unwrap_or_default();
    let line = lines.lines().count();
    assert!(
        reason.starts_with("failed: exit code 1: ")
            && reason.contains(&format!("bad.jsonl:{line}:"))
            && reason.contains("invalid JSON"),
        "{reason}"
    );
    let show = stdout(&d.jobctl(&["show", &id.to_string()]));
    assert!(show.contains("invalid JSON"), "{show}");
}

/// A training that finishes while jobd is down is recorded as finished at the next start
/// (its worker leaves its exit status, as a command's supervisor does): not resumed as if
/// interrupted, with its real run time.
#[test]
fn a_training_that_ended_while_jobd_was_down_is_recorded() {
    let mut d = TestDaemon::start(&["--gpus", "none"]);
    let id = d.submit(&d.write("short.toml", &short_job(d.dir.path(), 3)));
    wait_step(&d, id, 10);
    d.kill9();
    let status = d.state.join(format!("jobs/{id}/exit-status.json"));
    wait_for("the worker to finish", Duration::from_secs(120), || {
        status.exists()
    });
    std::thread::sleep(Duration::from_millis(1500));
    d.restart();
    d.wait_state(id, JobState::Succeeded, Duration::from_secs(30));
    let rec = d.job(id).record;
    assert_eq!(rec.attempts, 1, "{:#?}", d.events(id));
    assert!(
        d.events(id).iter().any(|e| e
            .reason
            .contains("its worker had ended meanwhile (exit code 0)")),
        "{:#?}",
        d.events(id)
    );
    assert!(rec.finished_at.unwrap() + 1000 < jobd::spec::now_ms());
}

/// A worker that cannot even read its job leaves how it ended (exit code and error) in its
/// job directory for this attempt, as every worker does: a daemon that is not its parent
/// (restarted meanwhile) learns the outcome and the reason from there.
#[test]
fn a_worker_leaves_its_end_in_the_job_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(JOBD)
        .args(["worker", "--job-dir"])
        .arg(dir.path())
        .env("JOBD_ATTEMPT", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.path().join(name)).unwrap()).unwrap()
    };
    let status = read("exit-status.json");
    assert_eq!(
        (status["attempt"].as_u64(), status["code"].as_i64()),
        (Some(3), Some(1))
    );
    let error = read("worker-error.json");
    assert_eq!(error["attempt"].as_u64(), Some(3));
    assert!(
        error["message"].as_str().unwrap().contains("cannot read"),
        "{error}"
    );
}

/// A daemon that dies while publishing a finished training publishes it again at its next
/// start, without training again (QA: the job went back to the queue for a GPU and its worker
/// ran a second time).
#[test]
fn a_publish_cut_by_a_crash_is_done_again_without_training() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    std::fs::create_dir(&models).unwrap();
    let mut d = TestDaemon::start_full(
        &[
            "--gpus",
            "none",
            "--ollama-models",
            models.to_str().unwrap(),
        ],
        "",
        &[("JOBD_FAILPOINT", "exit-while-publishing")],
    );
    let text = tiny_four_steps();
    assert!(text.contains("max_steps = 4\n") && text.contains("[publish]"));
    let id = d.submit(&d.write("tiny.toml", &text));
    let status = d.wait_exit(Duration::from_secs(120));
    assert_eq!(status.code(), Some(86), "the failpoint: {}", d.log());
    d.restart_with_env(&[]);
    d.wait_state(id, JobState::Succeeded, Duration::from_secs(60));
    let rec = d.job(id).record;
    assert_eq!(rec.attempts, 1, "{:#?}", d.events(id));
    d.assert_said(id, "publishing again");
    let log = std::fs::read_to_string(d.state.join(format!("jobs/{id}/stderr.log"))).unwrap();
    assert_eq!(
        log.matches("training complete").count(),
        1,
        "trained once:\n{log}"
    );
    let out = d.jobctl(&["models"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("jobd/tiny-shift"), "{}", stdout(&out));
}

/// jobs/tiny.toml (with its `[publish]`), its data paths made absolute, trained for 4 steps
/// with a checkpoint and an evaluation every 2.
fn tiny_four_steps() -> String {
    let data = repo().join("jobs/data");
    std::fs::read_to_string(repo().join("jobs/tiny.toml"))
        .unwrap()
        .replace("\"data/", &format!("\"{}/", data.display()))
        .replace("max_steps = 400", "max_steps = 4")
        .replace("warmup_steps = 20", "warmup_steps = 1")
        .replace("eval_steps = 100", "eval_steps = 2")
        .replace("save_steps = 100", "save_steps = 2")
}
