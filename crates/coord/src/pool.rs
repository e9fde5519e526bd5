//! The threads a node's leaf reads run on: a fixed pool (`search_threads`),
//! first come first served, at a lower CPU priority than the async runtime.
//!
//! Why not tokio's blocking pool: it grows a thread per concurrent read (up
//! to 512), so a burst of searches oversubscribes the cores and every search
//! and every Raft heartbeat waits on the OS scheduler. A fixed pool queues
//! the excess instead. Why the lower priority: searches are long and
//! CPU-bound, while the runtime's work (Raft heartbeats, sending a
//! fan-out's leaf requests, receiving and merging answers) is short and
//! latency-critical; at nice +10 a waking runtime thread gets the core first,
//! and the searches use what is left.
//!
//! A job whose caller has gone (a hedge that lost, a request past its
//! deadline) is skipped rather than run; a full queue refuses new reads.

use std::panic::AssertUnwindSafe;
use tonic::Status;

/// How much lower than the runtime's the search threads' priority is.
pub const SEARCH_NICE: i32 = 10;
/// Reads waiting for a thread beyond this are refused (UNAVAILABLE: the
/// coordinator tries another replica) instead of queueing without bound.
pub const QUEUE_PER_THREAD: usize = 256;

type Job = Box<dyn FnOnce() + Send>;

/// Plain threads on a channel rather than rayon: a leaf read is one coarse
/// job, and rayon's idle workers spin (sched_yield) after every job, taking
/// CPU from the runtime and the other searches.
pub struct SearchPool {
    tx: Option<crossbeam_channel::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SearchPool {
    /// A pool of `threads` threads named `sovra-search-<node>-<i>`.
    pub fn new(node: u64, threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (tx, rx) = crossbeam_channel::bounded::<Job>(threads * QUEUE_PER_THREAD);
        let handles = (0..threads)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new().name(format!("sovra-search-{node}-{i}")).spawn(move || {
                    lower_priority();
                    for job in rx {
                        job();
                    }
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            tx: Some(tx),
            threads: handles,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Reads waiting for a thread.
    pub fn queued(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.len())
    }

    /// Runs `f` on the pool once a thread is free; a panic in it is an
    /// INTERNAL error for this request only.
    pub async fn run<R, F>(&self, f: F) -> Result<R, Status>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if tx.is_closed() {
                return; // nobody waits for it any more
            }
            let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(f)));
        });
        let queue = self.tx.as_ref().ok_or_else(|| Status::unavailable("the node is stopping"))?;
        queue.try_send(job).map_err(|e| match e {
            crossbeam_channel::TrySendError::Full(_) => Status::unavailable(format!(
                "this node's search queue is full ({} reads waiting for {} threads); another replica may answer, or retry",
                queue.len(),
                self.threads.len()
            )),
            crossbeam_channel::TrySendError::Disconnected(_) => Status::unavailable("the node is stopping"),
        })?;
        match rx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(panic)) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".into());
                Err(Status::internal(format!("a leaf read panicked: {why}")))
            }
            Err(_) => Err(Status::internal("the search pool dropped the read")),
        }
    }
}

impl Drop for SearchPool {
    /// Closes the queue; the threads finish what is queued and exit (not
    /// joined: a long search must not hold up the node's shutdown).
    fn drop(&mut self) {
        self.tx.take();
    }
}

/// Lowers the calling thread's scheduling priority by [`SEARCH_NICE`]
/// (Linux: `setpriority` on a thread id sets that thread's niceness alone).
/// Best effort: where it is refused the thread runs at normal priority.
/// Also the node's index build threads' start: graph building must not keep
/// Raft's messages (each with one heartbeat interval to be answered) waiting.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread's own id; no memory is shared.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid, (now + SEARCH_NICE).min(19));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_turns_a_panic_into_an_internal_error() {
        let pool = SearchPool::new(1, 2).unwrap();
        assert_eq!(pool.threads(), 2);
        assert_eq!(pool.run(|| 40 + 2).await.unwrap(), 42);
        let e = pool.run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        assert!(e.message().contains("boom"), "{}", e.message());
        // The pool survives the panic.
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_reads_as_unavailable_and_the_queued_ones_still_run() {
        let pool = std::sync::Arc::new(SearchPool::new(1, 1).unwrap());
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(move || {
                    let _ = started_tx.send(());
                    wait.recv().is_ok()
                })
                .await
            }
        });
        // The one thread holds the busy read before the queue fills.
        started.await.unwrap();
        let mut queued = Vec::new();
        for i in 0..QUEUE_PER_THREAD {
            let pool = pool.clone();
            queued.push(tokio::spawn(async move { pool.run(move || i).await }));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pool.queued() < QUEUE_PER_THREAD {
            assert!(std::time::Instant::now() < deadline, "only {} queued", pool.queued());
            tokio::task::yield_now().await;
        }
        let e = pool.run(|| 0).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("search queue is full"), "{}", e.message());
        release.send(()).unwrap();
        assert!(busy.await.unwrap().unwrap());
        for (i, q) in queued.into_iter().enumerate() {
            assert_eq!(q.await.unwrap().unwrap(), i);
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn search_threads_run_below_the_callers_priority() {
        let pool = SearchPool::new(1, 1).unwrap();
        // SAFETY: reads the calling thread's own priority.
        let mine = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t) };
        let theirs = pool
            .run(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t) })
            .await
            .unwrap();
        assert_eq!(theirs, (mine + SEARCH_NICE).min(19));
    }
}
