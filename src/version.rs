//! What this binary is: version, commit and build time, stamped by `build.rs`.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct BuildInfo {
    pub version: &'static str,
    pub commit: &'static str,
    pub build_time: &'static str,
}

pub const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    commit: env!("MD_GIT_COMMIT"),
    build_time: env!("MD_BUILD_TIME"),
};

impl BuildInfo {
    /// One line for `--version`.
    pub fn long(&self) -> String {
        format!(
            "{} (commit {}, built {})",
            self.version, self.commit, self.build_time
        )
    }
}

/// The `--version` line, built at compile time for clap.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("MD_GIT_COMMIT"),
    ", built ",
    env!("MD_BUILD_TIME"),
    ")"
);
