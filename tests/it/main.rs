//! Integration tests: the real `jobd` daemon driven by the real `jobctl` and raw HTTP.

mod auth;
mod basics;
mod daemon;
mod dashboard;
mod durability;
mod errors;
mod job_dir;
mod llama_cpp;
mod notify;
#[path = "../publish_support/mod.rs"]
mod publish_support;
mod sched;
mod schedules;
mod sweeps;
mod systemd;
mod train;
