//! A shard's memory bound: the bytes of COPY rows it may hold awaiting their commit.
//!
//! Acquired on the shard before a frame's rows are encoded (so a frame waiting for room costs
//! no rows memory, only the read buffer that holds its wire bytes); the [`Permit`] travels
//! with the rows to the writer thread and is released there the moment the writer answers
//! the frame, whatever the connection it came from is doing (a device that never reads its
//! acks cannot hold the shard's budget). Hence a `Mutex` and wakers rather than a glommio
//! semaphore: release happens on another thread.
//!
//! Waiters are served first come, first served, so a large frame is not starved by small ones.
//! A request larger than the whole budget is granted the whole budget (it waits until the
//! shard holds nothing else).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// The budget of one shard; cheap to clone.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    used: usize,
    /// Waiting acquirers in arrival order: (ticket, waker).
    waiters: VecDeque<(u64, Waker)>,
    next_ticket: u64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn wake_front(&self) {
        if let Some((_, w)) = self.waiters.front() {
            w.wake_by_ref();
        }
    }
}

impl ByteBudget {
    pub fn new(limit: usize) -> ByteBudget {
        ByteBudget {
            inner: Arc::new(Inner {
                limit: limit.max(1),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Bytes held now (rows awaiting their commit).
    pub fn used(&self) -> usize {
        self.inner.lock().used
    }

    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// `bytes` of room now, if there is room and nobody waits before us.
    pub fn try_acquire(&self, bytes: usize) -> Option<Permit> {
        let bytes = bytes.min(self.inner.limit);
        let mut st = self.inner.lock();
        if st.waiters.is_empty() && st.used + bytes <= self.inner.limit {
            st.used += bytes;
            return Some(Permit {
                inner: self.inner.clone(),
                bytes,
            });
        }
        None
    }

    /// Waits for `bytes` of room, in arrival order. Dropping the future gives up its place.
    pub fn acquire(&self, bytes: usize) -> Acquire {
        Acquire {
            inner: self.inner.clone(),
            bytes: bytes.min(self.inner.limit),
            ticket: None,
        }
    }
}

/// Room for one frame's rows; released when dropped (by the writer, once it answered).
#[derive(Debug)]
pub struct Permit {
    inner: Arc<Inner>,
    bytes: usize,
}

impl Permit {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        st.used -= self.bytes;
        st.wake_front();
    }
}

/// The future of [`ByteBudget::acquire`].
#[derive(Debug)]
pub struct Acquire {
    inner: Arc<Inner>,
    bytes: usize,
    ticket: Option<u64>,
}

impl Future for Acquire {
    type Output = Permit;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit> {
        let this = &mut *self;
        let mut st = this.inner.lock();
        let first = match this.ticket {
            None => st.waiters.is_empty(),
            Some(t) => st.waiters.front().is_some_and(|(f, _)| *f == t),
        };
        if first && st.used + this.bytes <= this.inner.limit {
            st.used += this.bytes;
            if let Some(t) = this.ticket.take() {
                st.waiters.retain(|(w, _)| *w != t);
            }
            // Room may be left for the next one in line.
            st.wake_front();
            return Poll::Ready(Permit {
                inner: this.inner.clone(),
                bytes: this.bytes,
            });
        }
        match this.ticket {
            Some(t) => {
                if let Some(slot) = st.waiters.iter_mut().find(|(w, _)| *w == t) {
                    if !slot.1.will_wake(cx.waker()) {
                        slot.1 = cx.waker().clone();
                    }
                }
            }
            None => {
                let t = st.next_ticket;
                st.next_ticket += 1;
                st.waiters.push_back((t, cx.waker().clone()));
                this.ticket = Some(t);
            }
        }
        Poll::Pending
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if let Some(t) = self.ticket {
            let mut st = self.inner.lock();
            st.waiters.retain(|(w, _)| *w != t);
            st.wake_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn room_is_granted_in_arrival_order_and_released_from_another_thread() {
        let b = ByteBudget::new(100);
        let p60 = b.try_acquire(60).unwrap();
        assert!(b.try_acquire(50).is_none());
        let mut big = b.acquire(50);
        assert!((&mut big).now_or_never().is_none());
        // A small request that would fit must not overtake the waiting one.
        assert!(b.try_acquire(10).is_none());
        let mut small = b.acquire(10);
        assert!((&mut small).now_or_never().is_none());

        std::thread::spawn(move || drop(p60)).join().unwrap();
        let p50 = (&mut big).now_or_never().expect("room after the release");
        let p10 = (&mut small).now_or_never().expect("then the next in line");
        assert_eq!(b.used(), 60);
        drop((p50, p10));
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_request_larger_than_the_budget_gets_all_of_it_and_giving_up_frees_the_line() {
        let b = ByteBudget::new(100);
        let p = b.try_acquire(1).unwrap();
        let mut huge = b.acquire(10_000);
        assert!((&mut huge).now_or_never().is_none());
        let mut next = b.acquire(5);
        assert!((&mut next).now_or_never().is_none());
        drop(huge);
        assert!((&mut next).now_or_never().is_some());
        drop(p);
        assert_eq!(b.try_acquire(10_000).unwrap().bytes(), 100);
    }
}
