//! Where the daemon's files are: its socket, the native zygote library, each
//! zygote's interpreter. Used by start-up, `--check-config` and `doctor`.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::start_error::StartError;

/// Socket path by precedence: explicit, config, `FORKD_SOCKET`, default.
pub fn socket_path(explicit: Option<&Path>, config: &Config) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| config.socket.clone())
        .unwrap_or_else(forkd_ipc::client::default_socket_path)
}

/// Locates `libforkd_zygote.so`: `explicit`, else `FORKD_ZYGOTE_LIB`, else
/// next to the executable (and its parent, for test binaries).
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf, StartError> {
    let name = forkd_zygote::LIBRARY_FILE_NAME;
    let mut candidates = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    } else if let Some(p) = std::env::var_os("FORKD_ZYGOTE_LIB") {
        candidates.push(PathBuf::from(p));
    } else if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join(name));
            // Test binaries live in target/<profile>/deps.
            candidates.push(dir.join("..").join(name));
            candidates.push(dir.join("../lib/forkd").join(name));
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| StartError::Library {
            name,
            tried: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Resolves a zygote's interpreter: a path as given (made absolute, symlinks
/// kept), or a bare name on PATH.
pub fn find_python(python: &Path, zygote: &str) -> Result<PathBuf, StartError> {
    if python.components().count() > 1 {
        // Absolute but not canonical: a venv's python is a symlink whose
        // location is what selects the venv.
        return match std::path::absolute(python) {
            Ok(p) if p.exists() => Ok(p),
            _ => Err(StartError::Python(python.to_path_buf(), zygote.into())),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(python))
        .find(|p| p.is_file())
        .ok_or_else(|| StartError::Python(python.to_path_buf(), zygote.into()))
}
