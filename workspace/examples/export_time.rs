//! Times a delta export: `export_time UPPER_DIR` (median of 20 runs).

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]
fn main() {
    let dir = std::env::args().nth(1).expect("UPPER_DIR");
    let mut times = Vec::new();
    let mut size = 0;
    let mut stats = None;
    for _ in 0..20 {
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        stats = Some(
            forkd_workspace::export_tar(std::path::Path::new(&dir), &mut out, false)
                .expect("export"),
        );
        times.push(t.elapsed());
        size = out.len();
    }
    times.sort();
    println!(
        "{:?}: {size} bytes of tar; export p50 {:.2} ms",
        stats.unwrap(),
        times[times.len() / 2].as_secs_f64() * 1000.0
    );
}
