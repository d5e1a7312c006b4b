//! Network namespaces made ahead of requests.
//!
//! Creating a network namespace is the costliest single step of isolating a
//! child (~0.5 ms here, plus ~0.1 ms to bring `lo` up), and none of it depends
//! on the request. A dedicated thread of the daemon therefore keeps a small
//! stock of fresh namespaces: it `unshare`s a new one (a per-thread operation,
//! safe in a multi-threaded process — nothing forks), brings `lo` up, keeps a
//! descriptor to it and returns to the daemon's own namespace. A request takes
//! one, the child `setns`es into it, and the daemon drops its descriptor once
//! the child has it, so the namespace dies with the sandbox. Every sandbox
//! still gets a namespace of its own; when the stock is empty the child
//! creates one itself, as before.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_zygote::sys as zsys;

pub struct NetnsStock {
    ready: Mutex<Receiver<OwnedFd>>,
    stopped: Arc<AtomicBool>,
    maker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl NetnsStock {
    /// Starts the maker thread with room for `capacity` namespaces; `None`
    /// when this process cannot make network namespaces (unprivileged).
    pub fn start(capacity: usize) -> Option<NetnsStock> {
        if capacity == 0 {
            return None;
        }
        let (tx, rx) = sync_channel::<OwnedFd>(capacity);
        let (probe_tx, probe_rx) = std::sync::mpsc::channel::<io::Error>();
        let stopped = Arc::new(AtomicBool::new(false));
        let stop = stopped.clone();
        let maker = move || {
            let home = match zsys::open(c"/proc/thread-self/ns/net", libc::O_RDONLY, 0) {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = probe_tx.send(e);
                    return;
                }
            };
            // The first namespace doubles as the probe: an unprivileged
            // daemon fails here and the children make their own.
            match make_one(home.as_fd()) {
                Ok(fd) => {
                    drop(probe_tx);
                    if tx.send(fd).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = probe_tx.send(e);
                    return;
                }
            }
            while !stop.load(Ordering::Acquire) {
                match make_one(home.as_fd()) {
                    // Blocks while the stock is full.
                    Ok(fd) => {
                        if tx.send(fd).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("making a network namespace failed: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
        };
        let handle = std::thread::Builder::new()
            .name("forkd-netns".into())
            .spawn(maker)
            .ok()?;
        match probe_rx.recv() {
            Ok(e) => {
                tracing::info!("network namespaces are made by each child ({e})");
                None
            }
            // The maker dropped the probe sender: it works.
            Err(_) => Some(NetnsStock {
                ready: Mutex::new(rx),
                stopped,
                maker: Mutex::new(Some(handle)),
            }),
        }
    }

    /// Stops the maker thread and closes every stocked namespace (at
    /// shutdown: nothing of the daemon may outlive it).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let Some(maker) = self.maker.lock().ok().and_then(|mut m| m.take()) else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        // Draining frees a slot for a maker blocked in send; it then sees
        // the flag and exits.
        while !maker.is_finished() && Instant::now() < deadline {
            self.drain();
            std::thread::sleep(Duration::from_millis(1));
        }
        if maker.is_finished() {
            let _ = maker.join();
        }
        self.drain();
    }

    fn drain(&self) {
        if let Ok(rx) = self.ready.lock() {
            while rx.try_recv().is_ok() {}
        }
    }

    /// A fresh namespace, or `None` when the stock is empty right now.
    pub fn take(&self) -> Option<OwnedFd> {
        self.ready.lock().ok()?.try_recv().ok()
    }
}

fn make_one(home: std::os::fd::BorrowedFd<'_>) -> io::Result<OwnedFd> {
    zsys::unshare(libc::CLONE_NEWNET)?;
    let made = zsys::loopback_up()
        .and_then(|()| zsys::open(c"/proc/thread-self/ns/net", libc::O_RDONLY, 0));
    // Return home whatever happened: the next namespace must be made from
    // the daemon's own, not nested in a sandbox's.
    zsys::setns(home, libc::CLONE_NEWNET)?;
    made
}
