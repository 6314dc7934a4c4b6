//! jobd — a batch scheduler for shared GPU machines.
//!
//! Layers (a module uses only modules of lower layers; see ARCHITECTURE.md):
//! - L0 [`spec`]: job files, states, records, API types, the worker contract. No IO.
//!   [`jobfs`]: files in users' directories. [`hf_config`]: Hugging Face `config.json`
//!   conventions.
//! - L1 [`store`] (sled), [`gpu`] (inventory), [`proc`] (child processes), [`config`].
//! - L2 [`sched`] (the single writer of job state), [`train`] (Candle, worker only),
//!   [`publish`] (GGUF + Ollama store).
//! - L3 [`api`] (axum), [`client`] (HTTP client for jobctl).
//! - L4 [`daemon`] (wiring, recovery, shutdown), [`cli`] (jobctl subcommands).
//! - L5 `src/bin/jobd.rs`, `src/bin/jobctl.rs`: thin.

pub mod api;
pub mod chat;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod estimate;
pub mod gpu;
pub mod hf_config;
pub mod jobfs;
pub mod proc;
pub mod publish;
pub mod sched;
pub mod spec;
pub mod store;
pub mod train;
pub mod worker;
