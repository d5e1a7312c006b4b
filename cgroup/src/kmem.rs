//! Kernel memory of socket buffers on cgroup v1.
//!
//! v1 charges slab, pipe buffers and other kernel objects to
//! `memory.usage_in_bytes` by default, but TCP socket buffers only to a
//! separate counter, and only once `memory.kmem.tcp.limit_in_bytes` has been
//! written for the cgroup (that write turns the accounting on). Without it a
//! sandbox can hold hundreds of MiB in loopback TCP buffers outside its
//! memory limit and push the host's global `tcp_mem` into pressure. v2 charges
//! socket memory to `memory.current` by default, so nothing is needed there.

use std::path::Path;

use crate::{sys, Error};

/// Share of the memory limit a v1 sandbox may hold in TCP buffers, on top of
/// the memory limit (v1 cannot count both against one limit).
pub const TCP_SHARE_DIVISOR: u64 = 4;

/// The v1 TCP buffer limit for a memory limit of `memory_bytes`.
pub fn v1_tcp_limit(memory_bytes: u64) -> u64 {
    (memory_bytes / TCP_SHARE_DIVISOR).max(1 << 20)
}

/// Limits TCP buffer memory of the v1 memory cgroup `dir` (and turns its
/// accounting on). Returns false when the kernel has no such file.
pub(crate) fn set_v1_tcp_limit(dir: &Path, memory_bytes: u64) -> Result<bool, Error> {
    let file = dir.join("memory.kmem.tcp.limit_in_bytes");
    if !file.exists() {
        return Ok(false);
    }
    sys::write(&file, &v1_tcp_limit(memory_bytes).to_string())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarter_of_memory_with_a_floor() {
        assert_eq!(v1_tcp_limit(512 << 20), 128 << 20);
        assert_eq!(v1_tcp_limit(1 << 20), 1 << 20);
    }
}
