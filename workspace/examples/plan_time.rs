//! Times planning a workspace: `plan_time DIR RULES_FILE [direct|overlay]`
//! (one `GLOB=MODE` per line). Prints the plan's size and the median of 20 runs.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, rules_file) = (&args[1], &args[2]);
    let kind = if args.get(3).is_some_and(|k| k == "overlay") {
        forkd_workspace::Kind::Overlay
    } else {
        forkd_workspace::Kind::Direct
    };
    let text = std::fs::read_to_string(rules_file).expect("rules file");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let rules = forkd_workspace::Rules::parse(&lines, forkd_workspace::Mode::Read).expect("rules");
    let mut times = Vec::new();
    let mut plan = None;
    for _ in 0..20 {
        let t = std::time::Instant::now();
        plan = Some(
            forkd_workspace::plan(std::path::Path::new(dir), &rules, kind, "/workspace")
                .expect("plan"),
        );
        times.push(t.elapsed());
    }
    times.sort();
    let (_, stamps) =
        forkd_workspace::plan_stamped(std::path::Path::new(dir), &rules, kind, "/workspace")
            .expect("plan");
    let mut checks = Vec::new();
    for _ in 0..20 {
        let t = std::time::Instant::now();
        assert!(stamps.still_valid());
        checks.push(t.elapsed());
    }
    checks.sort();
    println!(
        "re-checking a cached plan ({} directories): p50 {:.3} ms",
        stamps.len(),
        checks[checks.len() / 2].as_secs_f64() * 1000.0
    );
    let p = plan.unwrap();
    let json = serde_json::to_vec(&p).unwrap();
    println!(
        "visited {} entries: {} hidden, {} binds, {} grants, {} bytes of JSON; plan p50 {:.2} ms",
        p.visited,
        p.hidden.len(),
        p.binds.len(),
        p.grants.len(),
        json.len(),
        times[times.len() / 2].as_secs_f64() * 1000.0
    );
}
