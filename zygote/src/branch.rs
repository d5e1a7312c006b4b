//! Session branches: namespaces that a copy of a running session's
//! interpreter can enter (docs/branch.md).
//!
//! A branch's namespaces are made by a root helper, not by the copy (which
//! has no capabilities). Two halves:
//!
//! - [`make_shell`], in a child the zygote forked (root, host namespaces):
//!   joins the parent session's pid namespace for its children, makes a user
//!   namespace owned by the parent session's uid (its uid 0 is the branch's
//!   own host uid), then fresh mount, net, ipc, uts and cgroup namespaces
//!   owned by it; its child (in the parent session's pid namespace) makes
//!   the branch's pid namespace and forks the branch's init into it. Both
//!   stay as parents that end as the init ends.
//! - [`join`], in a fork of the parent's interpreter: enters those
//!   namespaces through a pidfd of the branch's init (the parent's uid owns
//!   the user namespace, so the kernel lets it), forks the copy that lives in
//!   the branch, which takes the branch's uid and drops every capability the
//!   user namespace gave it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::spec::BranchOf;
use crate::sys;

/// The namespaces a branch has of its own (and a copy enters).
pub const BRANCH_NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWPID;

fn step(what: &'static str) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Makes the branch's namespaces and forks its init. Returns in that init
/// (pid 1 of the branch's pid namespace, uid 0 of its user namespace, with
/// every capability there, in the template's mount tree); the caller
/// continues the isolation sequence. The calling process never returns.
///
/// `branch_uid` is the branch's host uid (and gid).
pub fn make_shell(branch: &BranchOf, branch_uid: u32, template: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    // A helper that stays root in the host's namespaces writes the maps of
    // the new user namespace (we cannot once we are in it), then shows the
    // branch's namespaces to the parent session (see `expose`) until the
    // init closes `keep` (when it seals itself, or dies).
    let (ready_r, ready_w) = sys::pipe().map_err(step("pipe"))?;
    let (done_r, done_w) = sys::pipe().map_err(step("pipe"))?;
    let (born_r, born_w) = sys::pipe().map_err(step("pipe"))?;
    let (shown_r, shown_w) = sys::pipe().map_err(step("pipe"))?;
    let (keep_r, keep_w) = sys::pipe().map_err(step("pipe"))?;
    // SAFETY: the caller (a child the zygote just forked) is single-threaded.
    let helper = match unsafe { sys::fork() }.map_err(step("fork the map writer"))? {
        sys::Fork::Child => {
            drop((ready_w, done_r, born_w, shown_r, keep_w));
            // Opened first, as root: the parent's init may not be dumpable.
            let parent_ns = |name: &str| {
                let path = format!("/proc/{}/ns/{name}", branch.parent_pid);
                sys::open(
                    &sys::cstring(std::path::Path::new(&path))?,
                    libc::O_RDONLY,
                    0,
                )
            };
            let mnt = parent_ns("mnt");
            let mut byte = [0u8; 1];
            let mut ok = sys::read_exact(ready_r.as_fd(), &mut byte).is_ok() && mnt.is_ok();
            // A branch of a branch: its user namespace lies inside the
            // parent's, and the kernel takes its maps only from a writer in
            // the parent's, in the parent's ids (its uid 0 then owns the
            // socket too).
            let (id, owner) = match branch.inner_uid {
                Some(inner) => {
                    ok = ok
                        && parent_ns("user")
                            .and_then(|u| sys::setns(u.as_fd(), libc::CLONE_NEWUSER))
                            .is_ok();
                    (inner, 0)
                }
                None => (branch_uid, branch.parent_uid),
            };
            ok = ok && write_maps(me, id, branch.block).is_ok();
            if branch.inner_uid.is_some() {
                // Only now: the shell's /proc files belong to host root (it
                // is not dumpable), which this process still is; the socket
                // below is made as the parent's uid 0.
                ok = ok && sys::set_ids(0, 0).is_ok();
            }
            let _ = sys::write_all(done_w.as_fd(), &[u8::from(ok)]);
            drop(done_w);
            if let (true, Ok(mnt)) = (ok, mnt) {
                if sys::read_exact(born_r.as_fd(), &mut byte).is_ok() {
                    expose(me, mnt, owner, shown_w, keep_r);
                }
            }
            sys::exit_now(0)
        }
        sys::Fork::Parent(pid) => pid,
    };
    drop((ready_r, done_w, born_r, shown_w, keep_r));
    let shell = (|| -> io::Result<()> {
        let pidns = sys::open(
            &sys::cstring(std::path::Path::new(&format!(
                "/proc/{}/ns/pid",
                branch.parent_pid
            )))?,
            libc::O_RDONLY,
            0,
        )
        .map_err(step("open the parent session's pid namespace"))?;
        sys::setns(pidns.as_fd(), libc::CLONE_NEWPID)
            .map_err(step("enter the parent session's pid namespace"))?;
        let parent_user = match branch.inner_uid {
            Some(_) => Some(
                sys::open(
                    &sys::cstring(std::path::Path::new(&format!(
                        "/proc/{}/ns/user",
                        branch.parent_pid
                    )))?,
                    libc::O_RDONLY,
                    0,
                )
                .map_err(step("open the parent branch's user namespace"))?,
            ),
            None => None,
        };
        sys::setns(template, libc::CLONE_NEWNS).map_err(step("enter the sandbox root"))?;
        // The parent session's uid owns the user namespace: a copy of its
        // interpreter may enter it, nobody else (but root) can. A parent
        // that is itself a branch runs in its own user namespace: the new
        // one is made inside it, by its uid 0 (the parent's host uid).
        match parent_user {
            Some(user) => {
                sys::setns(user.as_fd(), libc::CLONE_NEWUSER)
                    .map_err(step("enter the parent branch's user namespace"))?;
                sys::set_ids(0, 0).map_err(step("become the parent branch's uid"))?;
            }
            None => sys::become_user(branch.parent_uid, branch.parent_uid)
                .map_err(step("become the parent session's uid"))?,
        }
        sys::unshare(libc::CLONE_NEWUSER).map_err(step("unshare the user namespace"))?;
        sys::write_all(ready_w.as_fd(), b"u").map_err(step("signal the map writer"))?;
        let mut ok = [0u8; 1];
        sys::read_exact(done_r.as_fd(), &mut ok).map_err(step("wait for the map writer"))?;
        if ok[0] != 1 {
            return Err(io::Error::other(
                "the user namespace's uid and gid maps could not be written",
            ));
        }
        // uid 0 here is the branch's own host uid (setgroups is denied).
        sys::set_ids(0, 0).map_err(step("become uid 0 of the branch's user namespace"))?;
        sys::unshare(BRANCH_NAMESPACES & !libc::CLONE_NEWPID)
            .map_err(step("unshare the branch's namespaces"))
    })();
    drop((ready_w, done_r));
    if let Err(e) = shell {
        drop((born_w, shown_r, keep_w));
        let _ = sys::waitpid(helper);
        return Err(e);
    }
    // A new pid namespace is made below the caller's own only (not below
    // the one it set for its children): the next process, which lives in
    // the parent session's pid namespace, makes the branch's, and its
    // first child is the branch's init.
    // SAFETY: still single-threaded.
    if let sys::Fork::Parent(inner) = unsafe { sys::fork() }.map_err(step("fork"))? {
        drop((born_w, shown_r, keep_w));
        mirror(inner)
    }
    sys::set_parent_death_signal(libc::SIGKILL).map_err(step("set parent-death signal"))?;
    sys::unshare(libc::CLONE_NEWPID).map_err(step("unshare the branch's pid namespace"))?;
    // SAFETY: still single-threaded.
    let forked = unsafe { sys::fork() }.map_err(step("fork the branch's init"))?;
    if let sys::Fork::Parent(init) = forked {
        drop((born_w, shown_r, keep_w));
        mirror(init)
    }
    sys::set_parent_death_signal(libc::SIGKILL).map_err(step("set parent-death signal"))?;
    if branch.inner_uid.is_some() {
        // The map writer shows our namespaces from inside the parent
        // branch's user namespace, where only a dumpable process's are
        // open to it (the init stays dumpable until sealed anyway).
        sys::set_dumpable().map_err(step("set dumpable"))?;
    }
    sys::write_all(born_w.as_fd(), b"b").map_err(step("signal the map writer"))?;
    drop(born_w);
    let mut shown = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(shown_r), &mut shown)
        .map_err(step("wait for the namespaces to be shown"))?;
    if shown.first() != Some(&1) {
        return Err(io::Error::other(format!(
            "the branch's namespaces could not be shown to the parent session: {}",
            String::from_utf8_lossy(shown.get(1..).unwrap_or_default())
        )));
    }
    // Held until the init seals itself (it closes what it inherited).
    std::mem::forget(keep_w);
    Ok(())
}

/// Where the parent session's copy asks for the namespaces of the branch
/// made by helper `shell` (a host pid): a directory of the parent's
/// scratch stage holding one Unix socket, there while the copy joins.
pub fn exposed_dir(shell: libc::pid_t) -> String {
    format!("/dev/.scratch/.forkd-ns-{shell}")
}

/// The namespaces a copy receives, in the order it enters them (the user
/// namespace first: it grants the rights the others need).
pub const EXPOSED: [(&str, libc::c_int); 7] = [
    ("user", libc::CLONE_NEWUSER),
    ("mnt", libc::CLONE_NEWNS),
    ("net", libc::CLONE_NEWNET),
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("pid", libc::CLONE_NEWPID),
];

/// In the map writer (root, host namespaces): listens on a Unix socket in
/// the parent session's mount namespace ([`exposed_dir`]) and hands the
/// branch init's namespace descriptors to the first of the parent's uid to
/// connect (its copy); reports on `shown`; removes the socket once `keep`
/// reports end-of-file. The copy cannot open them itself: landlock refuses
/// a landlocked process ptrace-class access (which /proc's namespace files
/// and pidfd setns need) to a process outside its domain, and the kernel
/// refuses to bind a mount namespace file into an older mount namespace.
fn expose(shell: libc::pid_t, mnt: OwnedFd, parent_uid: u32, shown: OwnedFd, keep: OwnedFd) {
    let dir = exposed_dir(shell);
    let sock = format!("{dir}/sock");
    let made = (|| -> io::Result<(Vec<OwnedFd>, std::os::unix::net::UnixListener)> {
        // The shell's children: this writer, and the process whose child
        // is the init.
        // SAFETY: getpid cannot fail.
        let me = unsafe { libc::getpid() };
        let inner = child_other_than(shell, me)?;
        let init = child_other_than(inner, me)?;
        let mut files = Vec::new();
        for (name, _) in EXPOSED {
            let path = sys::cstring(std::path::Path::new(&format!("/proc/{init}/ns/{name}")))?;
            files.push(sys::open(&path, libc::O_RDONLY, 0).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("open the {name} namespace of {init}: {e}"),
                )
            })?);
        }
        sys::setns(mnt.as_fd(), libc::CLONE_NEWNS)
            .map_err(step("enter the parent's mount namespace"))?;
        std::fs::create_dir(&dir).map_err(step("make the directory"))?;
        let listener = std::os::unix::net::UnixListener::bind(&sock).map_err(step("listen"))?;
        // Only the parent's uid may connect (root bound it).
        std::os::unix::fs::chown(&sock, Some(parent_uid), Some(parent_uid))
            .map_err(step("own the socket"))?;
        std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(step("restrict the socket"))?;
        listener.set_nonblocking(true).map_err(step("listen"))?;
        Ok((files, listener))
    })();
    let report = match &made {
        Ok(_) => vec![1u8],
        Err(e) => [&[0u8][..], e.to_string().as_bytes()].concat(),
    };
    let _ = sys::write_all(shown.as_fd(), &report);
    drop(shown);
    if let Ok((files, listener)) = made {
        serve_copy(&files, &listener, &keep);
    }
    let mut byte = [0u8; 1];
    // Returns at end-of-file: the init sealed itself, or died.
    let _ = sys::read_exact(keep.as_fd(), &mut byte);
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir(&dir);
}

/// Hands `files` to the first connection on `listener`, or gives up when
/// `keep` ends first.
fn serve_copy(files: &[OwnedFd], listener: &std::os::unix::net::UnixListener, keep: &OwnedFd) {
    use std::os::fd::AsRawFd;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: keep.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return; // the init is sealed or gone: nobody joins any more
        }
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(7))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        control.push(rustix::net::SendAncillaryMessage::ScmRights(&borrowed));
        let sent = rustix::net::sendmsg(
            &conn,
            &[io::IoSlice::new(b"n")],
            &mut control,
            rustix::net::SendFlags::NOSIGNAL,
        );
        if sent.is_ok() {
            return;
        }
    }
}

fn child_other_than(pid: libc::pid_t, not: libc::pid_t) -> io::Result<libc::pid_t> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|p| *p != not)
        .ok_or_else(|| io::Error::other(format!("process {pid} has no child")))
}

/// Waits for `child` and ends this process as it ended, so that the zygote,
/// which waits for the first process of the chain, reports the branch's
/// init.
fn mirror(child: libc::pid_t) -> ! {
    let status = sys::waitpid(child).unwrap_or(0);
    if libc::WIFSIGNALED(status) {
        sys::die_by_signal(libc::WTERMSIG(status));
    }
    sys::exit_now(libc::WEXITSTATUS(status))
}

/// uid 0 is `id`; with a block, uids 1.. are the block's (its own
/// branches' ids, which their user namespaces, made inside this one, map).
fn write_maps(pid: libc::pid_t, id: u32, block: Option<(u32, u32)>) -> io::Result<()> {
    let map = match block {
        Some((base, count)) => format!("0 {id} 1\n1 {base} {count}"),
        None => format!("0 {id} 1"),
    };
    std::fs::write(format!("/proc/{pid}/uid_map"), &map)?;
    std::fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
    std::fs::write(format!("/proc/{pid}/gid_map"), &map)
}

/// In a fresh fork of a session's interpreter: enters the namespaces of the
/// branch shown in `dir` (see [`exposed_dir`]), forks, and returns in the
/// child (pid 2 or later of the branch, its uid 0, no capabilities). The
/// calling process exits once it has forked.
pub fn join(dir: &str) -> io::Result<()> {
    let conn = std::os::unix::net::UnixStream::connect(format!("{dir}/sock"))
        .map_err(step("ask for the branch's namespaces"))?;
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(7))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(
        &conn,
        &mut [io::IoSliceMut::new(&mut byte)],
        &mut control,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| step("receive the branch's namespaces")(e.into()))?;
    let mut files: Vec<OwnedFd> = Vec::new();
    for msg in control.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(fds) = msg {
            files.extend(fds);
        }
    }
    if files.len() != EXPOSED.len() {
        return Err(io::Error::other(format!(
            "received {} namespace descriptors, not {}",
            files.len(),
            EXPOSED.len()
        )));
    }
    for ((name, flag), fd) in EXPOSED.iter().zip(&files) {
        sys::setns(fd.as_fd(), *flag).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("enter the branch's {name} namespace: {e}"),
            )
        })?;
    }
    drop(files);
    // SAFETY: the caller is a fresh fork of the interpreter: one thread.
    match unsafe { sys::fork() }.map_err(step("fork into the branch"))? {
        sys::Fork::Child => {
            sys::set_ids(0, 0).map_err(step("take the branch's uid"))?;
            for cap in 0..=sys::last_capability() {
                match sys::drop_bounding_cap(cap) {
                    Err(e) if e.raw_os_error() != Some(libc::EINVAL) => {
                        return Err(step("drop bounding capability")(e))
                    }
                    _ => {}
                }
            }
            sys::clear_ambient_caps().map_err(step("clear ambient capabilities"))?;
            sys::clear_capabilities().map_err(step("drop capabilities"))?;
            sys::set_dumpable().map_err(step("set dumpable"))?;
            Ok(())
        }
        sys::Fork::Parent(_) => sys::exit_now(0),
    }
}
