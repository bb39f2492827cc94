//! Per-shard read buffers. Runs on a shard (`Rc`, no locks).
//!
//! A connection holds a buffer only while it has bytes in it: [`ReadBuf::poll_fill`] takes one
//! from the pool just before reading and gives it back when a read would wait with nothing
//! buffered, so tens of thousands of idle devices cost no read memory. This relies on glommio's
//! readiness-based socket reads, which do not keep the caller's slice while pending.
//!
//! Pool buffers are small ([`BUFFER_SIZE`]: real frames are a few hundred bytes to 2 KiB); a
//! frame that does not fit grows its connection's buffer, up to the largest frame allowed,
//! and a grown buffer is freed rather than pooled once emptied. So `max_frame_len` costs memory
//! only for the frames that are that large.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use futures::io::AsyncRead;

/// Size of a pooled read buffer.
pub const BUFFER_SIZE: usize = 4096;

/// Free buffers a pool keeps. A buffer is held only while a frame is being read, so few are in
/// use at once even with a large fleet; a burst (a reconnect storm) that needed more allocates
/// them and frees the surplus, rather than leaving them resident for good (1,024 per shard, 8 MiB
/// on two shards, before: tuning/idle-memory.md).
pub const MAX_FREE: usize = 64;

/// Free fixed-size buffers of one shard.
pub struct BufferPool {
    free: RefCell<Vec<Box<[u8]>>>,
    size: usize,
    /// The largest a connection's buffer may grow (the largest frame with its header).
    max_size: usize,
}

impl BufferPool {
    /// Buffers of `size` bytes, growing up to `max_size`; keeps at most [`MAX_FREE`] idle.
    pub fn new(size: usize, max_size: usize) -> Rc<BufferPool> {
        Rc::new(BufferPool {
            free: RefCell::new(Vec::new()),
            size: size.min(max_size),
            max_size,
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
        if b.len() == self.size && free.len() < MAX_FREE {
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
    pub fn with_bytes(pool: Rc<BufferPool>, bytes: &[u8]) -> ReadBuf {
        let mut rb = ReadBuf::new(pool);
        if !bytes.is_empty() {
            let mut b = if bytes.len() <= rb.pool.size {
                rb.pool.take()
            } else {
                vec![0u8; bytes.len()].into_boxed_slice()
            };
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
        poll_fn(|cx| self.poll_fill(cx, rd)).await
    }

    /// [`ReadBuf::fill`] as a poll: makes room (compacting, or growing a full buffer up to the
    /// pool's largest size), then reads.
    pub fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        rd: &mut R,
    ) -> Poll<io::Result<usize>> {
        let buf = self.buf.get_or_insert_with(|| self.pool.take());
        if self.end == buf.len() && self.start > 0 {
            buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == buf.len() {
            if buf.len() >= self.pool.max_size {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "read buffer full",
                )));
            }
            let mut grown = vec![0u8; (buf.len() * 2).min(self.pool.max_size)].into_boxed_slice();
            grown[..self.end].copy_from_slice(&buf[..self.end]);
            let old = std::mem::replace(buf, grown);
            self.pool.put(old);
        }
        let buf = self.buf.as_mut().expect("a buffer");
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
                let pool = BufferPool::new(4, 64);
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

                // A frame larger than a pool buffer grows this connection's buffer, up to the
                // pool's largest size; the grown buffer is freed, not pooled.
                client.write_all(&[7u8; 70]).await.unwrap();
                while rb.data().len() < 64 {
                    rb.fill(&mut server).await.unwrap();
                }
                assert_eq!(rb.data(), &[7u8; 64][..]);
                let full = rb.fill(&mut server).await;
                assert_eq!(full.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
                rb.consume(64);
                assert!(!rb.holds_buffer());
                assert_eq!(pool.idle(), 1, "only pool-sized buffers are pooled");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_burst_of_buffers_leaves_at_most_64_free() {
        let pool = BufferPool::new(BUFFER_SIZE, 4 * BUFFER_SIZE);
        let held: Vec<ReadBuf> = (0..1000)
            .map(|_| ReadBuf::with_bytes(pool.clone(), b"half a frame"))
            .collect();
        drop(held);
        assert!(pool.idle() <= 64, "{} free buffers kept", pool.idle());
        assert!(pool.idle() > 0, "some are kept for the next frames");
    }
}
