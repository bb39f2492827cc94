//! Per-shard read buffers. Runs on a shard (`Rc`, no locks).
//!
//! A connection holds a buffer only while it has bytes in it: [`ReadBuf::fill`] takes one from
//! the pool just before reading and gives it back when a read would wait with nothing
//! buffered, so tens of thousands of idle devices cost no read memory. This relies on glommio's
//! readiness-based socket reads, which do not keep the caller's slice while pending.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;

use futures::io::AsyncRead;

/// Free fixed-size buffers of one shard.
pub struct BufferPool {
    free: RefCell<Vec<Box<[u8]>>>,
    size: usize,
    max_free: usize,
}

impl BufferPool {
    /// Buffers of `size` bytes (the largest frame must fit one); keeps at most `max_free` idle.
    pub fn new(size: usize, max_free: usize) -> Rc<BufferPool> {
        Rc::new(BufferPool {
            free: RefCell::new(Vec::new()),
            size,
            max_free,
        })
    }

    fn take(&self) -> Box<[u8]> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size].into_boxed_slice())
    }

    fn put(&self, b: Box<[u8]>) {
        let mut free = self.free.borrow_mut();
        if free.len() < self.max_free {
            free.push(b);
        }
    }

    /// Idle buffers held by the pool.
    pub fn idle(&self) -> usize {
        self.free.borrow().len()
    }
}

/// A connection's view of the bytes it has read and not yet consumed.
pub struct ReadBuf {
    pool: Rc<BufferPool>,
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    pub fn new(pool: Rc<BufferPool>) -> ReadBuf {
        ReadBuf {
            pool,
            buf: None,
            start: 0,
            end: 0,
        }
    }

    /// A buffer that starts with `bytes` (a connection handed over from another shard).
    ///
    /// # Panics
    /// If `bytes` does not fit a pool buffer (the sender never reads more than one).
    pub fn with_bytes(pool: Rc<BufferPool>, bytes: &[u8]) -> ReadBuf {
        let mut rb = ReadBuf::new(pool);
        if !bytes.is_empty() {
            let mut b = rb.pool.take();
            b[..bytes.len()].copy_from_slice(bytes);
            rb.buf = Some(b);
            rb.end = bytes.len();
        }
        rb
    }

    /// The unconsumed bytes.
    pub fn data(&self) -> &[u8] {
        self.buf
            .as_deref()
            .map_or(&[], |b| &b[self.start..self.end])
    }

    /// Marks `n` bytes used; an emptied buffer goes back to the pool.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
            self.release();
        }
    }

    /// Whether a buffer is held now.
    pub fn holds_buffer(&self) -> bool {
        self.buf.is_some()
    }

    fn release(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.put(b);
        }
    }

    /// Reads once from `rd`, appending to the unconsumed bytes. Returns the bytes read (0: end
    /// of stream).
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> io::Result<usize> {
        poll_fn(|cx| {
            let buf = self.buf.get_or_insert_with(|| self.pool.take());
            if self.end == buf.len() && self.start > 0 {
                buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == buf.len() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "read buffer full",
                )));
            }
            match Pin::new(&mut *rd).poll_read(cx, &mut buf[self.end..]) {
                Poll::Pending => {
                    if self.start == self.end {
                        self.release();
                    }
                    Poll::Pending
                }
                Poll::Ready(Ok(n)) => {
                    self.end += n;
                    if self.start == self.end {
                        self.release();
                    }
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            }
        })
        .await
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::AsyncWriteExt;
    use std::time::Duration;

    #[test]
    fn an_idle_connection_holds_no_buffer() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let mut client = glommio::net::TcpStream::connect(listener.local_addr().unwrap())
                    .await
                    .unwrap();
                let mut server = listener.accept().await.unwrap();
                let pool = BufferPool::new(1024, 8);
                let mut rb = ReadBuf::new(pool.clone());

                // Nothing to read: the pending read gives its buffer back.
                let waited =
                    crate::shard::with_timeout(Duration::from_millis(50), rb.fill(&mut server))
                        .await;
                assert!(waited.is_none());
                assert!(!rb.holds_buffer());
                assert_eq!(pool.idle(), 1);

                client.write_all(b"abcd").await.unwrap();
                assert_eq!(rb.fill(&mut server).await.unwrap(), 4);
                assert!(rb.holds_buffer());
                assert_eq!(pool.idle(), 0);
                rb.consume(2);
                assert_eq!(rb.data(), b"cd");
                rb.consume(2);
                assert!(!rb.holds_buffer(), "an emptied buffer goes back");
                assert_eq!(pool.idle(), 1);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
