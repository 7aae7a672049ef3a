//! Running device code safely: every call into a [`ottomato_actors::Workload`]
//! goes through [`guarded`], which bounds it in time and turns a panic into a value.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

/// How a guarded call ended.
pub(crate) enum Guarded<T> {
    Done(T),
    TimedOut(Duration),
    Panicked(String),
}

/// Runs `fut` for at most `limit`, catching a panic.
pub(crate) async fn guarded<T>(limit: Duration, fut: impl Future<Output = T>) -> Guarded<T> {
    match tokio::time::timeout(limit, AssertUnwindSafe(fut).catch_unwind()).await {
        Ok(Ok(v)) => Guarded::Done(v),
        Ok(Err(panic)) => Guarded::Panicked(panic_message(&*panic)),
        Err(_) => Guarded::TimedOut(limit),
    }
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
