//! Running device code safely: every call into a [`ottomato_actors::Workload`]
//! goes through [`guarded`], which bounds it in time, ends it when its
//! instance is abandoned or the node's lease runs out, and turns a panic into
//! a value.
//!
//! **Invariant:** when [`guarded`] returns, the device future has been
//! dropped: nothing of the call runs any more. So "the call ended" is a fact
//! the actor can build on (a release waits for it).

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a guarded call ended.
pub(crate) enum Guarded<T> {
    Done(T),
    TimedOut(Duration),
    Panicked(String),
    /// Ended before finishing: the instance was abandoned (fenced, failing)
    /// or the node's lease ran out. The string says which.
    Cancelled(&'static str),
}

impl<T> Guarded<T> {
    /// Whether device code ran to an end of its own (finished, timed out or
    /// panicked) rather than being cut off.
    pub(crate) fn ran(&self) -> bool {
        !matches!(self, Guarded::Cancelled(_))
    }
}

pub(crate) const LEASE_LOST: &str =
    "node lease expired (paused or cut off from the cluster): device call cancelled";
pub(crate) const ABANDONED: &str = "workload instance abandoned: device call cancelled";

/// Until when a node may do device work, on its own monotonic clock.
pub(crate) struct Lease {
    epoch: Instant,
    /// Nanoseconds after `epoch`; `u64::MAX`: no lease applies (embedded mode).
    until: AtomicU64,
}

impl Lease {
    pub(crate) fn unlimited() -> Lease {
        Lease {
            epoch: Instant::now(),
            until: AtomicU64::new(u64::MAX),
        }
    }

    /// Whether device work is allowed now (an atomic read, no I/O).
    pub(crate) fn valid(&self) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until == u64::MAX || (Instant::now() - self.epoch).as_nanos() < u128::from(until)
    }

    /// When the lease runs out (`None`: never).
    pub(crate) fn until(&self) -> Option<Instant> {
        match self.until.load(Ordering::Acquire) {
            u64::MAX => None,
            ns => Some(self.epoch + Duration::from_nanos(ns)),
        }
    }

    pub(crate) fn renew(&self, until: Instant) {
        let ns = until
            .saturating_duration_since(self.epoch)
            .as_nanos()
            .min(u128::from(u64::MAX - 1)) as u64;
        self.until.store(ns, Ordering::Release);
    }

    /// Ends the lease now (the node must stop touching devices).
    pub(crate) fn revoke(&self) {
        self.until.store(0, Ordering::Release);
    }

    /// The earlier of `deadline` and the end of the lease.
    fn cap(&self, deadline: Instant) -> Instant {
        self.until().map_or(deadline, |u| u.min(deadline))
    }
}

/// Runs `fut` for at most `limit`, and no longer than the node's lease
/// (renewals extend it) or until `cancel` fires; catches a panic.
///
/// Checked on every poll, before the device future is polled: a process
/// resuming from a pause past its lease never lets device code take another
/// step.
pub(crate) async fn guarded<T>(
    limit: Duration,
    lease: &Lease,
    cancel: &CancellationToken,
    fut: impl Future<Output = T>,
) -> Guarded<T> {
    let deadline = Instant::now() + limit;
    let mut fut = pin!(AssertUnwindSafe(fut).catch_unwind());
    let mut timer = pin!(tokio::time::sleep_until(lease.cap(deadline)));
    let mut cancelled = pin!(cancel.cancelled());
    std::future::poll_fn(|cx| {
        if !lease.valid() {
            return Poll::Ready(Guarded::Cancelled(LEASE_LOST));
        }
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Guarded::Cancelled(ABANDONED));
        }
        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
            return Poll::Ready(match r {
                Ok(v) => Guarded::Done(v),
                Err(panic) => Guarded::Panicked(panic_message(&*panic)),
            });
        }
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= deadline {
                return Poll::Ready(Guarded::TimedOut(limit));
            }
            if !lease.valid() {
                return Poll::Ready(Guarded::Cancelled(LEASE_LOST));
            }
            // The lease was renewed meanwhile: wait for its new end.
            timer.as_mut().reset(lease.cap(deadline));
        }
    })
    .await
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_ends_with_the_lease_unless_renewed() {
        let lease = Lease::unlimited();
        lease.renew(Instant::now() + Duration::from_secs(2));
        let never = CancellationToken::new();
        let started = Instant::now();
        let r = guarded(Duration::from_secs(60), &lease, &never, async {
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        assert!(matches!(r, Guarded::Cancelled(LEASE_LOST)));
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        // Renewed while the call runs: it goes on to its own end.
        lease.renew(Instant::now() + Duration::from_secs(2));
        let renewer = async {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                lease.renew(Instant::now() + Duration::from_secs(2));
            }
        };
        let call = guarded(Duration::from_secs(60), &lease, &never, async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            7
        });
        let (r, ()) = tokio::join!(call, renewer);
        assert!(matches!(r, Guarded::Done(7)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_resumed_past_the_lease_takes_no_further_step() {
        let lease = Lease::unlimited();
        lease.renew(Instant::now() + Duration::from_secs(2));
        let never = CancellationToken::new();
        let steps = std::sync::Mutex::new(Vec::new());
        let go = tokio::sync::Notify::new();
        let mut call = pin!(guarded(Duration::from_secs(60), &lease, &never, async {
            steps.lock().unwrap().push(1);
            go.notified().await;
            steps.lock().unwrap().push(2);
        }));
        // The device takes its first step and waits.
        assert!(futures::FutureExt::now_or_never(call.as_mut()).is_none());
        // The process is frozen past its lease: time passes with no poll,
        // and what the device waited for is ready when it resumes.
        tokio::time::advance(Duration::from_secs(5)).await;
        go.notify_one();
        assert!(matches!(call.await, Guarded::Cancelled(LEASE_LOST)));
        assert_eq!(
            *steps.lock().unwrap(),
            vec![1],
            "a step after the lease ran out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_and_deadline_end_a_call() {
        let lease = Lease::unlimited();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.cancel();
        });
        let r = guarded(
            Duration::from_secs(60),
            &lease,
            &cancel,
            std::future::pending::<()>(),
        )
        .await;
        assert!(matches!(r, Guarded::Cancelled(ABANDONED)));
        let r = guarded(
            Duration::from_secs(3),
            &lease,
            &CancellationToken::new(),
            std::future::pending::<()>(),
        )
        .await;
        assert!(matches!(r, Guarded::TimedOut(_)));
        let r = guarded(
            Duration::from_secs(3),
            &lease,
            &CancellationToken::new(),
            async { panic!("boom") },
        )
        .await;
        assert!(matches!(r, Guarded::Panicked(m) if m == "boom"));
    }
}
