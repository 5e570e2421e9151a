//! Builds redis-cell (the module `RL.THROTTLE` is a drop-in for) from its source, so
//! the bench can put `CL.THROTTLE` next to Tollgate in the same run.
//!
//! crates.io holds redis-cell 0.2.2 only (the GitHub repository is at 0.5.0, not
//! published); 0.2.2 has the same GCRA, the same key handling (one string key per
//! limit, read and written through the key API, `SET`-like expiry) and replicates
//! the command verbatim, as 0.5.0 does. The bench writes a one-line wrapper crate
//! into `target/redis-cell/` and asks cargo to build the dependency as a `cdylib`
//! (its own crate type, `dylib`, would need Rust's shared libstd at load time).
//! Nothing of redis-cell is kept in this repository.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const VERSION: &str = "0.2.2";

const MANIFEST: &str = r#"# Written by `make bench` (benches/src/cell.rs): builds redis-cell from crates.io.
[package]
name = "redis-cell-for-bench"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
redis-cell = "=0.2.2"

# Not a member of the Tollgate workspace above.
[workspace]
"#;

/// Builds `libredis_cell.so` under `target_dir/redis-cell`; returns its path, or why
/// it could not.
pub fn build(target_dir: &Path) -> Result<PathBuf, String> {
    let dir = target_dir.join("redis-cell");
    std::fs::create_dir_all(dir.join("src")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let manifest = dir.join("Cargo.toml");
    if std::fs::read_to_string(&manifest).ok().as_deref() != Some(MANIFEST) {
        std::fs::write(&manifest, MANIFEST).map_err(|e| format!("{}: {e}", manifest.display()))?;
    }
    let lib = dir.join("src/lib.rs");
    if !lib.exists() {
        std::fs::write(&lib, "").map_err(|e| format!("{}: {e}", lib.display()))?;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(cargo)
        .args(["rustc", "--release", "--quiet", "-p", "redis-cell", "--lib"])
        .args(["--crate-type", "cdylib", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(dir.join("target"))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let last: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(format!(
            "cargo could not build redis-cell {VERSION} from crates.io: {}",
            last.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    let so = dir.join("target/release/libredis_cell.so");
    if so.exists() {
        Ok(so)
    } else {
        Err(format!(
            "cargo built redis-cell but {} is missing",
            so.display()
        ))
    }
}
