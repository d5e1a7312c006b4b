//! The floor reference: a zygote of the same interpreter and preload list,
//! driven directly by the bench (the daemon cannot be asked for it), forking
//! the snippet through the same job protocol with no isolation at all.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{histogram, request, Latency, EXPECTED};

pub struct Floor {
    zygote: forkd_pool::Zygote,
    no_cgroups: Arc<forkd_cgroup::Manager>,
    plan: forkd_pool::ChildPlan,
    job: Vec<u8>,
    next_id: AtomicU64,
}

impl Floor {
    pub async fn start(python: &Path, preload: &[String]) -> Result<Arc<Floor>> {
        let library = forkd::daemon::find_library(None).context("floor zygote library")?;
        let cfg = forkd_pool::ZygoteConfig {
            name: "floor".into(),
            python: forkd::daemon::find_python(python, "floor")?,
            preload: preload.to_vec(),
            env: Default::default(),
            library,
            init: forkd_zygote::InitConfig {
                policies: [(
                    "default".to_string(),
                    forkd_zygote::Policy::default_policy(),
                )]
                .into(),
                interpreter_paths: Vec::new(),
                hostname: "sandbox".into(),
            },
            start_timeout: Duration::from_secs(60),
            rootless: false,
            subids: None,
        };
        let zygote = forkd_pool::Zygote::start(&cfg).await?;
        let no_cgroups = Arc::new(forkd_cgroup::Manager::new(&forkd_cgroup::Config {
            mode: forkd_cgroup::ModeChoice::Disabled,
            ..forkd_cgroup::Config::default()
        })?);
        Ok(Arc::new(Floor {
            zygote,
            no_cgroups,
            plan: forkd_pool::ChildPlan {
                policy: "default".into(),
                scratch_bytes: 1 << 26,
                open_files: 256,
                file_size_bytes: 1 << 26,
                cgroup: forkd_cgroup::Limits::default(),
                isolate: false,
                workspace: None,
                branch: None,
            },
            job: forkd::sandbox::job_frame(&request()).expect("the benchmark job encodes"),
            next_id: AtomicU64::new(1),
        }))
    }

    /// One unisolated spawn: when its output was complete (the child is
    /// reaped afterwards, as forkd replies before the kernel's teardown) and
    /// whether it was the expected output.
    async fn spawn(&self) -> Result<(Instant, bool)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut child =
            forkd_pool::prepare(&self.zygote, &self.no_cgroups, None, id, self.plan.clone())
                .await?;
        let (Some(job_w), Some(stdout)) = (child.job.take(), child.stdout.take()) else {
            bail!("prepared child lacks pipes");
        };
        let mut tx = tokio::net::unix::pipe::Sender::from_owned_fd(job_w)?;
        tx.write_all(&self.job).await?;
        drop(tx);
        let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(stdout)?;
        let mut out = Vec::new();
        rx.read_to_end(&mut out).await?;
        let done = Instant::now();
        let _ = (&mut child.exited).await;
        Ok((done, out == EXPECTED.as_bytes()))
    }

    /// `n` sequential spawns.
    pub async fn single(&self, n: usize) -> Result<Latency> {
        let mut h = histogram();
        let mut ok = 0;
        for _ in 0..n {
            let t = Instant::now();
            let (done, good) = self.spawn().await?;
            let _ = h.record(forkd_bench::stats::micros(done - t).max(1));
            ok += u64::from(good);
        }
        Ok(Latency::from(&h, ok))
    }

    /// `n` concurrent spawns: (wall µs from the first request to the last
    /// complete output, verified outputs).
    pub async fn burst(self: &Arc<Self>, n: usize) -> Result<(u64, u64)> {
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let floor = self.clone();
            set.spawn(async move { floor.spawn().await });
        }
        let (mut ok, mut last) = (0, t);
        while let Some(r) = set.join_next().await {
            let (done, good) = r??;
            last = last.max(done);
            ok += u64::from(good);
        }
        Ok((forkd_bench::stats::micros(last - t), ok))
    }

    pub async fn drain(&self) {
        self.zygote.drain().await;
    }
}
