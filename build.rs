//! Compiles the training kernels (src/train/cuda/kernels.cu) twice:
//! - always, as C++ with the host compiler, into the CPU emulator the library's tests run them
//!   in (src/train/cuda/emulator.cc; linked only into the test binary by
//!   src/train/kernel_emulator.rs);
//! - with the `cuda` feature, to PTX with nvcc, for `include_str!` in src/train/cuda/mod.rs; the
//!   driver compiles the PTX for the GPU at load time. No CUDA is needed to build or test.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/train/cuda/kernels.cu");
    println!("cargo:rerun-if-changed=src/train/cuda/emulator.cc");
    build_emulator();
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("jobd_kernels.ptx");
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // PTX for the lowest architecture the kernels need (they use no tensor-core instructions;
    // matrix products go through cuBLAS), or the one the build names, as candle-kernels does.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/train/cuda/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("the cuda feature needs nvcc ({}): {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on src/train/cuda/kernels.cu");
}

/// The kernels' CPU emulator as a static library in OUT_DIR. Only its search path is given to
/// rustc: the test module names the library (and libstdc++) itself, so nothing else links it.
fn build_emulator() {
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .debug(false)
        .warnings(true)
        .file("src/train/cuda/emulator.cc")
        .cargo_metadata(false)
        .compile("jobd_kernel_emulator");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    println!("cargo:rustc-link-search=native={out}");
}
