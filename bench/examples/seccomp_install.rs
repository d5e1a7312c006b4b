//! Time to install the floor's and forkd's default seccomp filters, each in
//! a freshly forked child (median and p90 of N, in µs):
//! `cargo run --release -p forkd-bench --example seccomp_install [N]`.

use std::io::Read;
use std::os::fd::AsFd;

use forkd_bench_floor::sys;

fn install_time_ns(program: &seccompiler::BpfProgram) -> u64 {
    let (r, w) = sys::pipe().expect("pipe");
    // SAFETY: the child reads the clock, installs the filter (no allocation),
    // writes eight bytes to a pipe and _exits.
    match unsafe { sys::fork() }.expect("fork") {
        sys::Fork::Child => {
            drop(r);
            let t = std::time::Instant::now();
            if seccompiler::apply_filter(program).is_err() {
                sys::exit_now(2);
            }
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let _ = sys::write_all(w.as_fd(), &ns.to_le_bytes());
            sys::exit_now(0);
        }
        sys::Fork::Parent(pid) => {
            drop(w);
            let mut buf = Vec::new();
            std::fs::File::from(r).read_to_end(&mut buf).expect("read");
            assert_eq!(sys::waitpid(pid).expect("waitpid"), 0, "install failed");
            u64::from_le_bytes(buf.try_into().expect("eight bytes"))
        }
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    let floor = forkd_bench_floor::policy::seccomp().expect("floor filter");
    let forkd = forkd_zygote::Policy::default_policy()
        .compile_seccomp()
        .expect("forkd filter");
    let mut times = [Vec::new(), Vec::new()];
    // Alternate, so both see the same load.
    for _ in 0..n {
        times[0].push(install_time_ns(&floor));
        times[1].push(install_time_ns(&forkd));
    }
    for ((name, p), t) in [("floor", &floor), ("forkd", &forkd)]
        .into_iter()
        .zip(&mut times)
    {
        t.sort_unstable();
        println!(
            "{name}: {} instructions, install p50 {:.1} µs, p90 {:.1} µs (n={n})",
            p.len(),
            t[n / 2] as f64 / 1000.0,
            t[n * 9 / 10] as f64 / 1000.0
        );
    }
}
