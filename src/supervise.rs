//! Noticing threads that end. Used on any thread.

/// Calls its function when dropped: at the end of a thread's body however it ends, a panic
/// included, so the main thread hears of every thread that stops.
pub struct OnExit<F: FnOnce()>(pub Option<F>);

impl<F: FnOnce()> Drop for OnExit<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_is_heard_of() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _exit = OnExit(Some(move || tx.send(std::thread::panicking()).unwrap()));
            panic!("a shard dies");
        });
        assert!(t.join().is_err());
        assert_eq!(rx.recv().unwrap(), true, "told, and told it panicked");
    }
}
