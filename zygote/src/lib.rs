//! forkd's zygote-side library.
//!
//! A zygote is a single-threaded Python interpreter (`python/forkd_zygote.py`)
//! that has imported its preload modules and forks one child per sandbox. This
//! crate is the native half it loads through ctypes (`libforkd_zygote.so`):
//! [`policy`] compiles the isolation policy once, [`template`] builds the
//! sandbox's minimal root once, and [`isolate`] applies everything to each
//! child in a few hundred microseconds. [`ffi`] is the C ABI; [`sys`] holds the
//! raw system calls, and [`kernel`] is the seam through which the isolation
//! sequence makes them (so its order is unit-tested without root).

pub mod branch;
pub mod ffi;
pub mod isolate;
pub mod kernel;
pub mod policy;
pub mod seccomp;
pub mod spec;
pub mod sys;
pub mod syscalls;
pub mod template;
pub mod userns;
pub mod wire;
pub mod workspace;

/// The Python half of the zygote, embedded so the daemon can start it with
/// `python -c` and never depends on a file next to the binary.
pub const ZYGOTE_PY: &str = include_str!("../python/forkd_zygote.py");

/// File name of this library when built as a cdylib.
pub const LIBRARY_FILE_NAME: &str = "libforkd_zygote.so";

pub use policy::{Policy, PolicyError, DEFAULT_POLICY_TOML};
pub use spec::{ChildSpec, InitConfig, InitInfo};
