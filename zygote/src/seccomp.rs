//! Compiles a [`SeccompPolicy`] (an allow-list with argument rules) to a
//! classic BPF program for x86-64.
//!
//! Layout: an architecture check (anything but the x86-64 ABI, i.e. i386
//! `int 0x80` calls, fails with ENOSYS), an x32 check (numbers with bit 30 set:
//! ENOSYS), then a binary search over runs of system call numbers that share
//! an outcome. Each leaf is a return, or a short argument check (socket
//! family, clone flags, ioctl type, fcntl command) that ends in returns.
//! A program of ~100 runs is ~200 instructions and decides any call in
//! ~7 comparisons, where a linear list pays per listed call.

use seccompiler::{sock_filter, BpfProgram};

use crate::policy::{PolicyError, SeccompPolicy};
use crate::syscalls;

#[allow(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes are 16-bit by definition"
)]
const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
#[allow(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes are 16-bit by definition"
)]
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
#[allow(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes are 16-bit by definition"
)]
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
#[allow(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes are 16-bit by definition"
)]
const BPF_JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
#[allow(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes are 16-bit by definition"
)]
const BPF_JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
#[allow(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes are 16-bit by definition"
)]
const BPF_AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
#[allow(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes are 16-bit by definition"
)]
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low 32 bits of argument `i` (little endian).
const fn off_arg_lo(i: u32) -> u32 {
    16 + 8 * i
}

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// Bit that marks x32 system calls on x86-64.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const CLONE_NS_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// What a system call number leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Allow,
    Errno(i32),
    Socket,
    Clone,
    Ioctl,
    Fcntl,
}

/// A forward jump offset. Offsets stay small: argument lists are bounded in
/// [`compile`] and the tree uses `ja` beyond 255.
fn jump(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn ret_allow() -> sock_filter {
    insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW)
}

fn ret_errno(errno: i32) -> sock_filter {
    insn(
        BPF_RET_K,
        0,
        0,
        libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA),
    )
}

fn family_number(name: &str) -> Option<u32> {
    Some(match name {
        "AF_UNIX" | "AF_LOCAL" => libc::AF_UNIX,
        "AF_INET" => libc::AF_INET,
        "AF_INET6" => libc::AF_INET6,
        "AF_NETLINK" => libc::AF_NETLINK,
        "AF_PACKET" => libc::AF_PACKET,
        "AF_VSOCK" => libc::AF_VSOCK,
        _ => return None,
    } as u32)
}

fn fcntl_number(name: &str) -> Option<u32> {
    Some(match name {
        "F_SETLEASE" => libc::F_SETLEASE,
        "F_NOTIFY" => libc::F_NOTIFY,
        "F_SETLK" => libc::F_SETLK,
        "F_SETLKW" => libc::F_SETLKW,
        "F_OFD_SETLK" => libc::F_OFD_SETLK,
        "F_OFD_SETLKW" => libc::F_OFD_SETLKW,
        _ => return None,
    } as u32)
}

/// An ioctl request `ioctl_deny` may name.
fn ioctl_number(name: &str) -> Option<u32> {
    // Both are 16-bit request numbers (type 'T'), as the filter compares them.
    let n = match name {
        "TIOCSTI" => libc::TIOCSTI,
        "TIOCLINUX" => libc::TIOCLINUX,
        _ => return None,
    };
    u32::try_from(n).ok()
}

/// The checked argument rules, as numbers.
struct Rules {
    families: Vec<u32>,
    netlink_protocols: Vec<u32>,
    ioctl_types: Vec<u32>,
    ioctl_deny: Vec<u32>,
    fcntl_deny: Vec<u32>,
}

fn leaf_code(leaf: Leaf, rules: &Rules) -> Vec<sock_filter> {
    match leaf {
        Leaf::Allow => vec![ret_allow()],
        Leaf::Errno(e) => vec![ret_errno(e)],
        // ld family; jeq f_i → allow; [jeq AF_NETLINK → protocol check]; ret EPERM
        Leaf::Socket => {
            let (n, m) = (rules.families.len(), rules.netlink_protocols.len());
            let netlink = if m > 0 { 3 + m } else { 0 };
            // Index of the final `ret allow`, counted from the first jeq.
            let allow_at = n + netlink + 1;
            let mut p = vec![insn(BPF_LD_W_ABS, 0, 0, off_arg_lo(0))];
            for (i, f) in rules.families.iter().enumerate() {
                p.push(insn(BPF_JEQ_K, jump(allow_at - i - 1), 0, *f));
            }
            if m > 0 {
                p.push(insn(BPF_JEQ_K, 1, 0, libc::AF_NETLINK as u32));
                p.push(ret_errno(libc::EPERM));
                p.push(insn(BPF_LD_W_ABS, 0, 0, off_arg_lo(2)));
                for (j, proto) in rules.netlink_protocols.iter().enumerate() {
                    p.push(insn(BPF_JEQ_K, jump(m - j), 0, *proto));
                }
            }
            p.push(ret_errno(libc::EPERM));
            p.push(ret_allow());
            p
        }
        // ld request; [jeq deny_j → ret EPERM]; and 0xff00; jeq type_i → allow;
        // ret ENOTTY; ret allow
        Leaf::Ioctl => {
            let n = rules.ioctl_types.len();
            let mut p = vec![insn(BPF_LD_W_ABS, 0, 0, off_arg_lo(1))];
            for d in &rules.ioctl_deny {
                p.push(insn(BPF_JEQ_K, 0, 1, *d));
                p.push(ret_errno(libc::EPERM));
            }
            p.push(insn(BPF_AND_K, 0, 0, 0xff00));
            for (i, t) in rules.ioctl_types.iter().enumerate() {
                p.push(insn(BPF_JEQ_K, jump(n - i), 0, t << 8));
            }
            p.push(ret_errno(libc::ENOTTY));
            p.push(ret_allow());
            p
        }
        Leaf::Clone => vec![
            insn(BPF_LD_W_ABS, 0, 0, off_arg_lo(0)),
            insn(BPF_JSET_K, 0, 1, CLONE_NS_FLAGS),
            ret_errno(libc::EPERM),
            ret_allow(),
        ],
        // ld cmd; jeq c_i → errno (last); …; ret allow; ret errno
        Leaf::Fcntl => {
            let mut p = vec![insn(BPF_LD_W_ABS, 0, 0, off_arg_lo(1))];
            let n = rules.fcntl_deny.len();
            for (i, c) in rules.fcntl_deny.iter().enumerate() {
                p.push(insn(BPF_JEQ_K, jump(n - i), 0, *c));
            }
            p.push(ret_allow());
            p.push(ret_errno(libc::EPERM));
            p
        }
    }
}

/// Binary search over `runs` (start number, leaf); `A` holds the number.
fn tree(runs: &[(u32, Leaf)], rules: &Rules) -> Vec<sock_filter> {
    if runs.len() == 1 {
        return leaf_code(runs[0].1, rules);
    }
    let mid = runs.len() / 2;
    let left = tree(&runs[..mid], rules);
    let right = tree(&runs[mid..], rules);
    let mut p = Vec::with_capacity(left.len() + right.len() + 2);
    // Jumps only go forward: the left half follows inline, the right half after it.
    match u8::try_from(left.len()) {
        Ok(skip) => p.push(insn(BPF_JGE_K, skip, 0, runs[mid].0)),
        Err(_) => {
            p.push(insn(BPF_JGE_K, 0, 1, runs[mid].0));
            p.push(insn(
                BPF_JA,
                0,
                0,
                u32::try_from(left.len()).unwrap_or(u32::MAX),
            ));
        }
    }
    p.extend(left);
    p.extend(right);
    p
}

/// Compiles the policy for x86-64.
pub fn compile(policy: &SeccompPolicy) -> Result<BpfProgram, PolicyError> {
    if !cfg!(target_arch = "x86_64") {
        return Err(PolicyError::Seccomp(format!(
            "the seccomp allow-list is compiled for x86-64 only, not {}",
            std::env::consts::ARCH
        )));
    }
    let number = |name: &String| {
        syscalls::x86_64_number(name).ok_or_else(|| PolicyError::UnknownSyscall(name.clone()))
    };
    let max = syscalls::X86_64.last().map(|(_, nr)| *nr).unwrap_or(0) as usize;
    let mut table = vec![Leaf::Errno(libc::ENOSYS); max + 1];
    for name in &policy.deny {
        table[number(name)? as usize] = Leaf::Errno(libc::EPERM);
    }
    let r = &policy.rules;
    for name in policy.allow.iter().flat_map(|g| &g.syscalls) {
        let nr = number(name)? as usize;
        if table[nr] == Leaf::Errno(libc::EPERM) {
            return Err(PolicyError::Seccomp(format!(
                "system call `{name}` is both allowed and denied: keep one"
            )));
        }
        table[nr] = match name.as_str() {
            "socket" => Leaf::Socket,
            "clone" if r.deny_clone_namespaces => Leaf::Clone,
            "ioctl" => Leaf::Ioctl,
            "fcntl" if !r.fcntl_deny.is_empty() => Leaf::Fcntl,
            _ => Leaf::Allow,
        };
    }
    let rules = Rules {
        families: r
            .socket_families
            .iter()
            .map(|f| {
                family_number(f).ok_or_else(|| {
                    PolicyError::Seccomp(format!(
                        "unknown socket family `{f}` (known: AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_VSOCK)"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
        netlink_protocols: r
            .netlink_protocols
            .iter()
            .map(|p| match p.as_str() {
                "NETLINK_ROUTE" => Ok(libc::NETLINK_ROUTE as u32),
                _ => Err(PolicyError::Seccomp(format!(
                    "netlink protocol `{p}` is not supported (only NETLINK_ROUTE: the others show host-wide events)"
                ))),
            })
            .collect::<Result<_, _>>()?,
        ioctl_types: r.ioctl_types.iter().map(|t| u32::from(*t)).collect(),
        ioctl_deny: r
            .ioctl_deny
            .iter()
            .map(|c| {
                ioctl_number(c).ok_or_else(|| {
                    PolicyError::Seccomp(format!(
                        "unknown ioctl request `{c}` in ioctl_deny (known: TIOCSTI, TIOCLINUX)"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
        fcntl_deny: r
            .fcntl_deny
            .iter()
            .map(|c| {
                fcntl_number(c).ok_or_else(|| {
                    PolicyError::Seccomp(format!(
                        "unknown fcntl command `{c}` (known: F_SETLEASE, F_NOTIFY, F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW)"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    if rules.families.len() > 200
        || rules.netlink_protocols.len() > 8
        || rules.ioctl_types.len() > 200
        || rules.ioctl_deny.len() > 16
        || rules.fcntl_deny.len() > 200
    {
        return Err(PolicyError::Seccomp("too many argument values".into()));
    }
    // Runs of equal outcome; numbers past the table (newer calls) get ENOSYS.
    let mut runs: Vec<(u32, Leaf)> = Vec::new();
    for (nr, leaf) in table
        .iter()
        .copied()
        .chain(std::iter::once(Leaf::Errno(libc::ENOSYS)))
        .enumerate()
    {
        if runs.last().map(|(_, l)| *l) != Some(leaf) {
            runs.push((u32::try_from(nr).unwrap_or(u32::MAX), leaf));
        }
    }
    let mut program = vec![
        insn(BPF_LD_W_ABS, 0, 0, OFF_ARCH),
        insn(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        ret_errno(libc::ENOSYS),
        insn(BPF_LD_W_ABS, 0, 0, OFF_NR),
        insn(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        ret_errno(libc::ENOSYS),
    ];
    program.extend(tree(&runs, &rules));
    if program.len() > libc::BPF_MAXINSNS as usize {
        return Err(PolicyError::Seccomp(format!(
            "the filter has {} instructions, more than the kernel's {}",
            program.len(),
            libc::BPF_MAXINSNS
        )));
    }
    Ok(program)
}

/// One line per instruction (`code jt jf k` in hex), for the golden file.
pub fn dump(program: &[sock_filter]) -> String {
    program
        .iter()
        .map(|i| format!("{:04x} {:02x} {:02x} {:08x}\n", i.code, i.jt, i.jf, i.k))
        .collect()
}

/// Runs `program` on one `seccomp_data` (a reference interpreter for the
/// instructions this compiler emits; used by tests to check every outcome).
pub fn evaluate(program: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let word = |off: u32| -> u32 {
        match off {
            OFF_NR => nr,
            OFF_ARCH => arch,
            o if (16..64).contains(&o) => {
                let a = args[((o - 16) / 8) as usize];
                let half = if (o - 16) % 8 == 0 { a } else { a >> 32 };
                #[allow(
                    clippy::cast_possible_truncation,
                    reason = "a 32-bit load reads one half of the argument"
                )]
                let word = half as u32;
                word
            }
            _ => panic!("load from offset {off}"),
        }
    };
    let (mut pc, mut acc) = (0usize, 0u32);
    loop {
        let i = &program[pc];
        pc += 1;
        match i.code {
            BPF_LD_W_ABS => acc = word(i.k),
            BPF_AND_K => acc &= i.k,
            BPF_JA => pc += i.k as usize,
            BPF_JEQ_K | BPF_JGE_K | BPF_JSET_K => {
                let taken = match i.code {
                    BPF_JEQ_K => acc == i.k,
                    BPF_JGE_K => acc >= i.k,
                    _ => acc & i.k != 0,
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            BPF_RET_K => return i.k,
            other => panic!("unexpected opcode {other:#x}"),
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
#[allow(
    clippy::unwrap_used,
    reason = "test helpers: a panic is the failure report"
)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    const ENOTTY: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOTTY as u32;

    fn run(p: &[sock_filter], name: &str, args: [u64; 6]) -> u32 {
        let nr = syscalls::x86_64_number(name).unwrap();
        evaluate(p, nr, AUDIT_ARCH_X86_64, args)
    }

    #[test]
    fn every_number_gets_the_policy_outcome() {
        let policy = Policy::default_policy();
        let p = policy.compile_seccomp().unwrap();
        let allowed: Vec<u32> = policy
            .seccomp
            .allow
            .iter()
            .flat_map(|g| &g.syscalls)
            .map(|n| syscalls::x86_64_number(n).unwrap())
            .collect();
        let denied: Vec<u32> = policy
            .seccomp
            .deny
            .iter()
            .map(|n| syscalls::x86_64_number(n).unwrap())
            .collect();
        for nr in 0..1024u32 {
            let got = evaluate(&p, nr, AUDIT_ARCH_X86_64, [0; 6]);
            let want = if allowed.contains(&nr) {
                ALLOW
            } else if denied.contains(&nr) {
                EPERM
            } else {
                ENOSYS
            };
            // socket(0, …) is AF_UNSPEC, refused by the family rule; ioctl
            // request 0 is of type 0, refused by the class rule.
            let want = match nr as libc::c_long {
                libc::SYS_socket => EPERM,
                libc::SYS_ioctl => ENOTTY,
                _ => want,
            };
            assert_eq!(got, want, "syscall {nr}");
        }
        assert_eq!(evaluate(&p, u32::MAX, AUDIT_ARCH_X86_64, [0; 6]), ENOSYS);
    }

    #[test]
    fn other_abis_get_enosys() {
        let p = Policy::default_policy().compile_seccomp().unwrap();
        const AUDIT_ARCH_I386: u32 = 0x4000_0003;
        // i386 getpid (20) and write (4); x32 getpid.
        assert_eq!(evaluate(&p, 20, AUDIT_ARCH_I386, [0; 6]), ENOSYS);
        assert_eq!(evaluate(&p, 4, AUDIT_ARCH_I386, [0; 6]), ENOSYS);
        assert_eq!(
            evaluate(&p, X32_SYSCALL_BIT | 39, AUDIT_ARCH_X86_64, [0; 6]),
            ENOSYS
        );
    }

    #[test]
    fn argument_rules() {
        let p = Policy::default_policy().compile_seccomp().unwrap();
        let a = |x: u64, y: u64| [x, y, 0, 0, 0, 0];
        for fam in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
            assert_eq!(run(&p, "socket", a(fam as u64, 1)), ALLOW);
        }
        let nl = |proto: i32| [libc::AF_NETLINK as u64, 3, proto as u64, 0, 0, 0];
        assert_eq!(run(&p, "socket", nl(libc::NETLINK_ROUTE)), ALLOW);
        for proto in [
            libc::NETLINK_KOBJECT_UEVENT,
            libc::NETLINK_AUDIT,
            libc::NETLINK_SOCK_DIAG,
        ] {
            assert_eq!(run(&p, "socket", nl(proto)), EPERM, "netlink {proto}");
        }
        for fam in [
            libc::AF_PACKET,
            libc::AF_VSOCK,
            libc::AF_ALG,
            libc::AF_BLUETOOTH,
        ] {
            assert_eq!(run(&p, "socket", a(fam as u64, 1)), EPERM, "family {fam}");
        }
        // High bits of an int argument are ignored by the kernel and here.
        assert_eq!(
            run(&p, "socket", a(1 << 32 | libc::AF_INET as u64, 1)),
            ALLOW
        );
        assert_eq!(run(&p, "clone", a(libc::SIGCHLD as u64, 0)), ALLOW);
        let threads = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert_eq!(run(&p, "clone", a(threads, 0)), ALLOW);
        for ns in [libc::CLONE_NEWUSER, libc::CLONE_NEWNET, libc::CLONE_NEWNS] {
            assert_eq!(run(&p, "clone", a(ns as u64 | 17, 0)), EPERM);
        }
        assert_eq!(run(&p, "clone3", a(0, 0)), ENOSYS);
        assert_eq!(run(&p, "ioctl", a(1, libc::TCGETS)), ALLOW);
        assert_eq!(run(&p, "ioctl", a(1, libc::FIONBIO)), ALLOW);
        assert_eq!(run(&p, "ioctl", a(1, libc::TIOCGPTN)), ALLOW);
        assert_eq!(run(&p, "ioctl", a(1, libc::TIOCSPTLCK)), ALLOW);
        assert_eq!(run(&p, "ioctl", a(1, libc::TIOCSTI)), EPERM);
        assert_eq!(run(&p, "ioctl", a(1, libc::TIOCLINUX)), EPERM);
        assert_eq!(run(&p, "ioctl", a(1, libc::SIOCGIFFLAGS)), ALLOW);
        assert_eq!(run(&p, "ioctl", a(1, 0x4004_6602)), ENOTTY); // FS_IOC_GETVERSION-like
        assert_eq!(run(&p, "ioctl", a(1, 0x8010_aa01)), ENOTTY);
        assert_eq!(run(&p, "fcntl", a(1, libc::F_GETFL as u64)), ALLOW);
        assert_eq!(run(&p, "fcntl", a(1, libc::F_SETLK as u64)), ALLOW);
        assert_eq!(run(&p, "fcntl", a(1, libc::F_SETLEASE as u64)), EPERM);
        assert_eq!(run(&p, "fcntl", a(1, libc::F_NOTIFY as u64)), EPERM);
    }

    #[test]
    fn long_jumps_are_correct() {
        // Every number allowed alternately: hundreds of runs, so the upper
        // tree levels need JA trampolines.
        let mut policy = Policy::default_policy().seccomp;
        policy.deny.clear();
        policy.allow = vec![crate::policy::AllowGroup {
            why: "test".into(),
            syscalls: syscalls::X86_64
                .iter()
                .filter(|(_, nr)| nr % 2 == 0)
                .map(|(n, _)| n.to_string())
                .collect(),
        }];
        policy.rules.deny_clone_namespaces = false;
        policy.rules.fcntl_deny.clear();
        let p = compile(&policy).unwrap();
        assert!(p.iter().any(|i| i.code == BPF_JA), "no trampoline emitted");
        for (name, nr) in syscalls::X86_64 {
            if matches!(*name, "socket" | "ioctl") {
                continue;
            }
            let want = if nr % 2 == 0 { ALLOW } else { ENOSYS };
            assert_eq!(evaluate(&p, *nr, AUDIT_ARCH_X86_64, [0; 6]), want, "{name}");
        }
    }

    /// The compiled default program, checked in: a change to the policy or
    /// the compiler shows up in review as a diff of this file. Regenerate
    /// with `FORKD_BLESS=1 cargo test -p forkd-zygote golden`.
    #[test]
    fn golden_default_program() {
        let p = Policy::default_policy().compile_seccomp().unwrap();
        let text = format!("# {} instructions\n{}", p.len(), dump(&p));
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/default-seccomp.txt"
        );
        if std::env::var_os("FORKD_BLESS").is_some() {
            std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
            std::fs::write(path, &text).unwrap();
        }
        let golden = std::fs::read_to_string(path).expect("golden file (FORKD_BLESS=1 to create)");
        assert_eq!(
            text, golden,
            "compiled default filter changed: review, then FORKD_BLESS=1"
        );
        // Install cost grows with length; the deny-list filter it replaced had 345.
        assert!(p.len() < 300, "filter has {} instructions", p.len());
    }
}
