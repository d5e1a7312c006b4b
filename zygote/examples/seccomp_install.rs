//! Per-spawn cost of installing each policy's seccomp filter (a benchmark,
//! not a test): forks N children that each set no_new_privs and install the
//! compiled filter, timing only the install. Prints instruction count and the
//! median/p90 in microseconds.
//!
//!   cargo run --release -p forkd-zygote --example seccomp_install [N]

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a benchmark example: a panic is its failure report; nanosecond counts fit"
)]

use std::time::Instant;

use forkd_zygote::sys;
use forkd_zygote::Policy;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let prog = Policy::default_policy()
        .compile_seccomp()
        .expect("default policy compiles");
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let (r, w) = sys::pipe().expect("pipe");
        // SAFETY: this example is single-threaded.
        match unsafe { sys::fork() }.expect("fork") {
            sys::Fork::Child => {
                drop(r);
                sys::set_no_new_privs().expect("no_new_privs");
                let t = Instant::now();
                sys::apply_seccomp(&prog).expect("install");
                let ns = t.elapsed().as_nanos() as u64;
                let _ = sys::write_all(std::os::fd::AsFd::as_fd(&w), &ns.to_le_bytes());
                sys::exit_now(0);
            }
            sys::Fork::Parent(pid) => {
                drop(w);
                let mut buf = [0u8; 8];
                let got = std::io::Read::read(&mut std::fs::File::from(r), &mut buf).unwrap_or(0);
                let _ = sys::waitpid(pid);
                if got == 8 {
                    times.push(u64::from_le_bytes(buf));
                }
            }
        }
    }
    times.sort_unstable();
    let pct = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)] as f64 / 1000.0;
    println!(
        "instructions {}  install p50 {:.1} us  p90 {:.1} us  (n={})",
        prog.len(),
        pct(50),
        pct(90),
        times.len()
    );
}
