//! A coarse per-worker deadline for the common case: a bodiless request
//! waiting for its answer.
//!
//! A tokio `Sleep` per request costs a heap entry in the timer wheel plus its
//! registration and cancellation; measured with callgrind that was about 5 %
//! of floodgate's instructions per proxied request. Nearly every request
//! finishes long before its deadline, so this keeps deadlines in a
//! per-thread slab instead (insert and remove are a few instructions) and
//! one task per worker checks them every [`GRANULARITY`]. A deadline fires
//! at most that much late.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How late a coarse deadline may fire.
pub const GRANULARITY: Duration = Duration::from_millis(50);

struct Entry {
    at: Instant,
    waker: Waker,
}

#[derive(Default)]
struct Wheel {
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    live: usize,
    reaper: bool,
}

thread_local! {
    static WHEEL: RefCell<Wheel> = RefCell::default();
}

/// Completes once `after` has passed since it was created (give or take
/// [`GRANULARITY`]). Must be polled on an actix/tokio local runtime.
pub struct Deadline {
    at: Instant,
    slot: Option<usize>,
    /// Registered in this thread's slab: must not move to another thread.
    _local: std::marker::PhantomData<*const ()>,
}

impl Deadline {
    pub fn after(after: Duration) -> Self {
        Deadline {
            at: Instant::now() + after,
            slot: None,
            _local: std::marker::PhantomData,
        }
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        let at = self.at;
        let slot = self.slot;
        let registered = WHEEL.with_borrow_mut(|wheel| match slot {
            Some(slot) => {
                if let Some(entry) = &mut wheel.slots[slot]
                    && !entry.waker.will_wake(cx.waker())
                {
                    entry.waker = cx.waker().clone();
                }
                slot
            }
            None => {
                let entry = Some(Entry {
                    at,
                    waker: cx.waker().clone(),
                });
                wheel.live += 1;
                let slot = match wheel.free.pop() {
                    Some(slot) => {
                        wheel.slots[slot] = entry;
                        slot
                    }
                    None => {
                        wheel.slots.push(entry);
                        wheel.slots.len() - 1
                    }
                };
                if !wheel.reaper {
                    wheel.reaper = true;
                    // Moved into the task: if it is dropped (its runtime
                    // stops), the next deadline starts a new one.
                    actix_web::rt::spawn(reap(Reaper));
                }
                slot
            }
        });
        self.slot = Some(registered);
        Poll::Pending
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            WHEEL.with_borrow_mut(|wheel| {
                wheel.slots[slot] = None;
                wheel.free.push(slot);
                wheel.live -= 1;
            });
        }
    }
}

/// Marks the reaper as gone when its task ends, run to completion or not.
struct Reaper;

impl Drop for Reaper {
    fn drop(&mut self) {
        WHEEL.with_borrow_mut(|wheel| wheel.reaper = false);
    }
}

/// Wakes expired deadlines; stops when none is left (the next one restarts it).
async fn reap(_running: Reaper) {
    let mut ticks = actix_web::rt::time::interval(GRANULARITY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = Instant::now();
        let done = WHEEL.with_borrow_mut(|wheel| {
            for entry in wheel.slots.iter().flatten() {
                if entry.at <= now {
                    entry.waker.wake_by_ref();
                }
            }
            if wheel.live == 0 {
                wheel.slots.clear();
                wheel.free.clear();
                true
            } else {
                false
            }
        });
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_web::test]
    async fn fires_after_its_time_and_not_before() {
        let started = Instant::now();
        Deadline::after(Duration::from_millis(120)).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(120), "{took:?}");
        assert!(
            took < Duration::from_millis(120) + GRANULARITY * 4,
            "{took:?}"
        );
    }

    #[actix_web::test]
    async fn dropped_deadlines_free_their_slots() {
        for _ in 0..1000 {
            let mut d = Box::pin(Deadline::after(Duration::from_secs(60)));
            let waker = futures_util::task::noop_waker();
            assert!(
                d.as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
        }
        WHEEL.with_borrow(|wheel| {
            assert_eq!(wheel.live, 0);
            assert!(wheel.slots.len() <= 1, "slots are reused");
        });
        // The reaper stops once nothing is left, and restarts on demand.
        Deadline::after(Duration::from_millis(10)).await;
    }
}
