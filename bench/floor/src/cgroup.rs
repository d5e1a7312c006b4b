//! Per-child cgroups with forkd's default limits (512 MiB memory without
//! swap, one CPU, 64 pids): v1 in the memory, cpu, cpuacct and pids
//! hierarchies, or one cgroup2 directory. The child creates and joins its
//! own (before it drops its privileges); the server removes it after the
//! reap. `<hierarchy>/forkd-bench-floor/f<server pid>/c<id>`.

use std::io;
use std::path::{Path, PathBuf};

pub const MEMORY_BYTES: u64 = 512 << 20;
pub const CPU_QUOTA_US: u64 = 100_000;
pub const CPU_PERIOD_US: u64 = 100_000;
pub const PIDS: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    V1,
    V2,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("the floor needs cgroup v1 memory, cpu, cpuacct and pids hierarchies or cgroup2 at /sys/fs/cgroup (with memory, cpu, pids); found neither")]
    Unsupported,
    #[error("floor cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One hierarchy's instance directory and whether it limits memory, cpu,
/// pids there.
#[derive(Debug, Clone)]
struct Hier {
    base: PathBuf,
    memory: bool,
    cpu: bool,
    pids: bool,
}

#[derive(Debug, Clone)]
pub struct Cgroups {
    pub mode: Mode,
    hiers: Vec<Hier>,
}

/// v1 mount point of `controller` from /proc/self/mountinfo.
fn v1_mount(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mut post = post.split(' ');
        if post.next()? != "cgroup" {
            return None;
        }
        let opts = post.nth(1)?;
        if !opts.split(',').any(|o| o == controller) {
            return None;
        }
        pre.split(' ').nth(4).map(PathBuf::from)
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_at(path))
}

/// Removes what a server that died without cleaning up (SIGKILL) left in
/// `parent`: `f<pid>` directories of processes that no longer exist, with
/// their children's directories (those children died with their server,
/// by their parent-death signal). Best effort: a directory still busy stays
/// for the next start.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix('f')) else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        if let Ok(children) = std::fs::read_dir(e.path()) {
            for c in children.flatten() {
                if c.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(c.path());
                }
            }
        }
        let _ = std::fs::remove_dir(e.path());
    }
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_at(path)(e)),
        _ => Ok(()),
    }
}

impl Cgroups {
    pub fn setup() -> Result<Cgroups, CgroupError> {
        let instance = format!("f{}", std::process::id());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_at(Path::new("/proc/self/mountinfo")))?;
        let top_v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").is_ok();
        if top_v2 {
            let root = Path::new("/sys/fs/cgroup");
            let enable =
                |dir: &Path| write(&dir.join("cgroup.subtree_control"), "+memory +cpu +pids");
            enable(root)?;
            let parent = root.join("forkd-bench-floor");
            mkdir(&parent)?;
            remove_stale(&parent);
            enable(&parent)?;
            let base = parent.join(instance);
            mkdir(&base)?;
            enable(&base)?;
            return Ok(Cgroups {
                mode: Mode::V2,
                hiers: vec![Hier {
                    base,
                    memory: true,
                    cpu: true,
                    pids: true,
                }],
            });
        }
        let mut hiers: Vec<Hier> = Vec::new();
        for c in ["memory", "cpu", "cpuacct", "pids"] {
            let mount = v1_mount(&mountinfo, c).ok_or(CgroupError::Unsupported)?;
            let base = mount.join("forkd-bench-floor").join(&instance);
            let h = match hiers.iter_mut().find(|h| h.base == base) {
                Some(h) => h,
                None => {
                    mkdir(&mount.join("forkd-bench-floor"))?;
                    remove_stale(&mount.join("forkd-bench-floor"));
                    mkdir(&base)?;
                    hiers.push(Hier {
                        base,
                        memory: false,
                        cpu: false,
                        pids: false,
                    });
                    hiers.last_mut().expect("pushed")
                }
            };
            match c {
                "memory" => h.memory = true,
                "cpu" => h.cpu = true,
                "pids" => h.pids = true,
                _ => {}
            }
        }
        Ok(Cgroups {
            mode: Mode::V1,
            hiers,
        })
    }

    /// Where the children's CPU time adds up (v1 `cpuacct.usage` in ns, v2
    /// `cpu.stat` `usage_usec`), counting removed children too.
    pub fn cpu_usage_file(&self) -> Option<PathBuf> {
        match self.mode {
            Mode::V2 => Some(self.hiers[0].base.join("cpu.stat")),
            Mode::V1 => self
                .hiers
                .iter()
                .map(|h| h.base.join("cpuacct.usage"))
                .find(|p| p.exists()),
        }
    }

    fn dirs(&self, id: u64) -> impl Iterator<Item = (PathBuf, &Hier)> {
        self.hiers
            .iter()
            .map(move |h| (h.base.join(format!("c{id}")), h))
    }

    /// In the child: create its cgroup with the limits, and join it.
    pub fn create_and_join(&self, id: u64) -> Result<(), CgroupError> {
        for (dir, h) in self.dirs(id) {
            mkdir(&dir)?;
            let v1 = self.mode == Mode::V1;
            if h.memory {
                let m = MEMORY_BYTES.to_string();
                if v1 {
                    write(&dir.join("memory.limit_in_bytes"), &m)?;
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &m)?;
                    }
                } else {
                    write(&dir.join("memory.max"), &m)?;
                    let swap = dir.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                }
            }
            if h.cpu {
                if v1 {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &CPU_QUOTA_US.to_string())?;
                } else {
                    write(
                        &dir.join("cpu.max"),
                        &format!("{CPU_QUOTA_US} {CPU_PERIOD_US}"),
                    )?;
                }
            }
            if h.pids {
                write(&dir.join("pids.max"), &PIDS.to_string())?;
            }
            write(&dir.join("cgroup.procs"), "0")?;
        }
        Ok(())
    }

    /// In the server, after the reap: remove the child's directories
    /// (EBUSY while the kernel still holds the exited child: retried a few
    /// times).
    pub fn remove(&self, id: u64) -> Result<(), CgroupError> {
        for (dir, _) in self.dirs(id) {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    Err(e) => return Err(io_at(&dir)(e)),
                }
            }
        }
        Ok(())
    }

    /// Removes the instance directories (every child must be gone).
    pub fn teardown(&self) -> Result<(), CgroupError> {
        for h in &self.hiers {
            if let Ok(entries) = std::fs::read_dir(&h.base) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            std::fs::remove_dir(&h.base).map_err(io_at(&h.base))?;
            // The shared parent too, unless another server still uses it.
            if let Some(parent) = h.base.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        Ok(())
    }
}
