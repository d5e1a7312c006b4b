//! Preparing one child: everything a sandbox needs before it can run a job.
//!
//! [`prepare`] creates the child's cgroup, its pipes, takes a network
//! namespace from the stock, and has the zygote fork it; the child isolates
//! itself and then waits for its job on fd 0. The result, a [`ReadyChild`],
//! is either handed a request at once (on demand) or parked in the warm pool.
//! Dropping an unused `ReadyChild` kills the child and removes its cgroup in
//! the background ([`crate::reaper`]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use forkd_cgroup::{Manager, SandboxCgroup};
use tokio::sync::oneshot;

use crate::netns::NetnsStock;
use crate::zygote::{Exited, SpawnFds, Zygote, ZygoteError};

/// What a child is isolated with; children with equal plans are
/// interchangeable (cgroup limits excepted: those can change before hand-off).
#[derive(Debug, Clone, PartialEq)]
pub struct ChildPlan {
    pub policy: String,
    pub scratch_bytes: u64,
    pub open_files: u64,
    pub file_size_bytes: u64,
    pub cgroup: forkd_cgroup::Limits,
    /// Always true in the daemon; false only for the benchmark's floor.
    pub isolate: bool,
    /// A workspace mounted into the child (such children are never pooled).
    pub workspace: Option<forkd_zygote::workspace::MountPlan>,
    /// A branch of a running session (never pooled).
    pub branch: Option<forkd_zygote::spec::BranchOf>,
}

impl ChildPlan {
    /// The CPUs the cgroup's cpu limit amounts to, rounded up (at least 1);
    /// None without an enforced limit.
    pub fn cpu_count(&self) -> Option<u32> {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a validated finite positive CPU count, clamped to u32"
        )]
        self.cgroup
            .cpus
            .filter(|c| c.is_finite() && *c > 0.0)
            .map(|c| c.ceil().clamp(1.0, f64::from(u32::MAX)) as u32)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("cannot create the sandbox's cgroup: {0}")]
    Cgroup(forkd_cgroup::Error),
    #[error("cannot create the sandbox's pipes: {0}")]
    Io(std::io::Error),
    #[error(transparent)]
    Zygote(ZygoteError),
    #[error(transparent)]
    Uid(crate::uids::UidError),
}

/// A forked, isolated child waiting for its job.
pub struct ReadyChild {
    pub sandbox: u64,
    pub plan: ChildPlan,
    /// The zygote generation that forked it.
    pub zygote: Zygote,
    /// Write end of the job pipe (the child's fd 0).
    pub job: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub status: Option<OwnedFd>,
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub exited: oneshot::Receiver<Result<Exited, ZygoteError>>,
    pub cgroup: CgroupCleanup,
    pub forked_at: Instant,
    /// (A first-level session branch.) The ids its own branches get.
    pub descendant_uids: Option<crate::uids::UidRange>,
}

impl ReadyChild {
    /// True while the child has not exited (a pooled child can die, e.g. with
    /// its zygote).
    pub fn is_alive(&mut self) -> bool {
        matches!(
            self.exited.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        )
    }

    /// Alive and forked by a zygote that is still current: children of a
    /// recycled zygote are not handed out (recycling bounds how many share
    /// its memory layout), and dropping them lets the old zygote exit.
    pub fn is_usable(&mut self) -> bool {
        !self.zygote.is_retired() && self.is_alive()
    }

    pub fn kill(&self) {
        kill_pidfd(self.pidfd.as_fd());
    }
}

impl Drop for ReadyChild {
    fn drop(&mut self) {
        // Unused or abandoned: make sure it is gone (closing the job pipe
        // alone would also end it, once it runs again).
        if self.job.is_some() {
            self.kill();
        }
    }
}

/// Sends SIGKILL through a pidfd. Killing a pid namespace's init kills every
/// process in it; an exited process is not an error.
pub fn kill_pidfd(pidfd: BorrowedFd<'_>) {
    signal_pidfd(pidfd, libc::SIGKILL);
}

/// Sends `sig` through a pidfd; an exited process is not an error.
pub fn signal_pidfd(pidfd: BorrowedFd<'_>, sig: libc::c_int) {
    // SAFETY: pidfd_send_signal with a borrowed, open pidfd and no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        );
    }
}

/// Owns a sandbox cgroup and hands it to the background reaper when dropped
/// (which retries removal until the sandbox's processes are gone).
pub struct CgroupCleanup(pub Option<SandboxCgroup>);

impl CgroupCleanup {
    pub fn get(&self) -> Option<&SandboxCgroup> {
        self.0.as_ref()
    }
}

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            crate::reaper::remove_later(cg);
        }
    }
}

/// Forks and isolates one child for `plan`, for a request waiting now.
pub async fn prepare(
    zygote: &Zygote,
    cgroups: &Arc<Manager>,
    netns: Option<&NetnsStock>,
    sandbox: u64,
    plan: ChildPlan,
) -> Result<ReadyChild, PrepareError> {
    prepare_child(zygote, cgroups, netns, sandbox, plan, false).await
}

/// [`prepare`] for a session branch's init (`plan.branch`): the zygote forks
/// a root helper that makes the branch's namespaces (see
/// `forkd_zygote::branch`); the returned pid and pidfd are that helper's,
/// which lives exactly as long as the branch's init.
///
/// `uids`: the parent branch's block when the parent is itself a branch
/// (the new branch's uid comes from it, and it gets no block of its own);
/// otherwise the branch gets a block of [`BRANCH_UID_BLOCK`] ids for its
/// own branches ([`ReadyChild::descendant_uids`]).
pub async fn prepare_branch(
    zygote: &Zygote,
    cgroups: &Arc<Manager>,
    sandbox: u64,
    plan: ChildPlan,
    uids: Option<&crate::uids::UidRange>,
) -> Result<ReadyChild, PrepareError> {
    prepare_child_from(zygote, cgroups, None, sandbox, plan, false, uids).await
}

/// Ids a first-level branch keeps for its own branches (and their spares)
/// alive at once: its user namespace maps them beside its own.
pub const BRANCH_UID_BLOCK: u32 = 32;

/// [`prepare`] for a child parked in the warm pool: it pre-touches the
/// memory a job writes while it waits, so a request does not pay for
/// those copy-on-write faults.
pub async fn prepare_parked(
    zygote: &Zygote,
    cgroups: &Arc<Manager>,
    netns: Option<&NetnsStock>,
    sandbox: u64,
    plan: ChildPlan,
) -> Result<ReadyChild, PrepareError> {
    prepare_child(zygote, cgroups, netns, sandbox, plan, true).await
}

async fn prepare_child(
    zygote: &Zygote,
    cgroups: &Arc<Manager>,
    netns: Option<&NetnsStock>,
    sandbox: u64,
    plan: ChildPlan,
    parked: bool,
) -> Result<ReadyChild, PrepareError> {
    prepare_child_from(zygote, cgroups, netns, sandbox, plan, parked, None).await
}

async fn prepare_child_from(
    zygote: &Zygote,
    cgroups: &Arc<Manager>,
    netns: Option<&NetnsStock>,
    sandbox: u64,
    mut plan: ChildPlan,
    parked: bool,
    from: Option<&crate::uids::UidRange>,
) -> Result<ReadyChild, PrepareError> {
    let limits = plan.cgroup;
    let manager = cgroups.clone();
    let cgroup =
        tokio::task::spawn_blocking(move || manager.create(&format!("sb{sandbox}"), &limits))
            .await
            .map_err(|e| PrepareError::Io(std::io::Error::other(e.to_string())))?
            .map_err(PrepareError::Cgroup)?;
    let cgroup = CgroupCleanup(Some(cgroup));

    // A root daemon runs each sandbox as its own unprivileged uid, and so
    // does a rootless one whose zygotes map a subordinate range; one without
    // keeps its only mapped id for all (see `uids::per_sandbox`). A
    // workspace with `owner` set (root daemon; direct or overlay) is
    // idmapped so that this uid acts as the requester; one without keeps
    // the capability-less uid 0.
    let own_uid = plan.workspace.as_ref().is_none_or(|w| w.owner.is_some());
    let uid = if plan.isolate && own_uid && crate::uids::per_sandbox() {
        Some(
            from.unwrap_or(crate::uids::global())
                .lease()
                .map_err(PrepareError::Uid)?,
        )
    } else {
        None
    };
    // A session branch: ids for its own branches, mapped in its user
    // namespace (kept with its uid until its helper is reaped), or, as a
    // branch of a branch, its uid as its parent's namespace maps it.
    let mut descendant_uids = None;
    if let (Some(branch), Some(lease)) = (plan.branch.as_mut(), uid.as_ref()) {
        match from {
            Some(block) => branch.inner_uid = Some(lease.id() - block.base() + 1),
            None => {
                let block = crate::uids::global()
                    .lease_block(BRANCH_UID_BLOCK)
                    .map_err(PrepareError::Uid)?;
                branch.block = Some((block.base(), block.count()));
                descendant_uids = Some(block);
            }
        }
    }
    let uid = match (uid, &descendant_uids) {
        (Some(lease), Some(block)) => Some(lease.keep(block.clone())),
        (uid, _) => uid,
    };
    let (job_r, job_w) = forkd_zygote::sys::pipe().map_err(PrepareError::Io)?;
    let (stdout_r, stdout_w) = forkd_zygote::sys::pipe().map_err(PrepareError::Io)?;
    let (stderr_r, stderr_w) = forkd_zygote::sys::pipe().map_err(PrepareError::Io)?;
    let (status_r, status_w) = forkd_zygote::sys::pipe().map_err(PrepareError::Io)?;
    let spec = forkd_zygote::ChildSpec {
        policy: plan.policy.clone(),
        cgroup_procs: cgroup
            .get()
            .map(|cg| {
                cg.procs_files()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect()
            })
            .unwrap_or_default(),
        scratch_bytes: plan.scratch_bytes,
        open_files: plan.open_files,
        file_size_bytes: plan.file_size_bytes,
        isolate: plan.isolate,
        workspace: plan.workspace.clone().map(|mut w| {
            w.idmap_to = w.owner.and(uid.as_ref().map(crate::uids::Lease::id));
            w
        }),
        // A branch of a workspace session without an owner keeps uid 0.
        uid: uid
            .as_ref()
            .map(crate::uids::Lease::id)
            .or_else(|| (plan.branch.is_some() && plan.workspace.is_some()).then_some(0)),
        cpus: plan.cpu_count(),
        // Every session may be branched, and sessions take children from
        // the warm pool: every child without a workspace gets the grant, and
        // one whose workspace mounts alone enforce (overlay, no `view`).
        branchable: plan
            .workspace
            .as_ref()
            .is_none_or(forkd_zygote::workspace::MountPlan::branchable),
        branch: plan.branch.clone(),
    };
    let spec =
        serde_json::to_string(&spec).map_err(|e| PrepareError::Io(std::io::Error::other(e)))?;
    let fds = SpawnFds {
        job: job_r,
        stdout: stdout_w,
        stderr: stderr_w,
        status: status_w,
        // A branch makes its network namespace inside its user namespace.
        netns: if plan.branch.is_some() {
            None
        } else {
            netns.and_then(NetnsStock::take)
        },
    };
    let forked = match (plan.branch.is_some(), uid) {
        (true, Some(uid)) => zygote.spawn_branch(sandbox, &spec, fds, Some(uid)).await,
        // A workspace session's branch without an owner: uid 0 (`spec.uid`).
        (true, None) if plan.workspace.is_some() => {
            zygote.spawn_branch(sandbox, &spec, fds, None).await
        }
        (true, None) => {
            return Err(PrepareError::Io(std::io::Error::other(
                "a session branch needs a root daemon (its own uid)",
            )))
        }
        (false, uid) => zygote.spawn_leased(sandbox, &spec, fds, parked, uid).await,
    }
    .map_err(PrepareError::Zygote)?;
    Ok(ReadyChild {
        sandbox,
        plan,
        zygote: zygote.clone(),
        job: Some(job_w),
        stdout: Some(stdout_r),
        stderr: Some(stderr_r),
        status: Some(status_r),
        pid: forked.pid,
        pidfd: forked.pidfd,
        exited: forked.exited,
        cgroup,
        forked_at: Instant::now(),
        descendant_uids,
    })
}
