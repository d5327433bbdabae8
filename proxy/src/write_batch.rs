//! One TLS record per burst of HTTP/2 frames instead of one per response.
//!
//! h2 writes a response's DATA frame (any payload of 256 bytes or more) by flushing
//! everything it has buffered, so each response of a multiplexed connection became its own
//! `flush`: its own TLS record (an AEAD seal with its fixed cost, 22 bytes of overhead) and
//! its own `writev`. Ten streams answered in one poll of the connection meant ten records.
//!
//! [`WriteBatch`] sits between hyper and the TLS stream of an HTTP/2 connection. Writes are
//! copied into a buffer of up to [`BATCH_BYTES`]; a `flush` only notes that one is due. The
//! task that polls the connection calls [`BatchFlusher::flush`] each time hyper's poll
//! returns `Pending`, which is when hyper has written everything it can for now: the whole
//! burst then goes to TLS as one write. Nothing waits longer than that poll, so no latency
//! is added. Writes of [`BATCH_BYTES`] or more (large downloads) bypass the buffer.
//!
//! The buffer exists only while it holds data, so an idle connection costs nothing extra.
//! HTTP/1.1 connections are not wrapped: hyper already sends each response in one write.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest burst collected before it is written: one full TLS record of plaintext.
pub const BATCH_BYTES: usize = 16 * 1024;

/// The I/O hyper sees for an HTTP/2 connection. Shares its state with a [`BatchFlusher`]
/// held by the task that polls the connection (both live in that one task, so the lock is
/// never contended; it is there because tasks must be `Send`).
pub struct WriteBatch<I> {
    shared: Arc<Mutex<Batch<I>>>,
}

/// Writes out what [`WriteBatch`] collected; see the module docs.
pub struct BatchFlusher<I> {
    shared: Arc<Mutex<Batch<I>>>,
}

struct Batch<I> {
    io: I,
    /// Collected bytes; `buf[written..]` is still to be written.
    buf: Vec<u8>,
    written: usize,
    /// hyper asked for a flush that has not reached the socket yet.
    flush_due: bool,
}

/// Wraps `io`; the flusher must be polled after every poll of the connection that uses it.
pub fn write_batch<I>(io: I) -> (WriteBatch<I>, BatchFlusher<I>) {
    let shared = Arc::new(Mutex::new(Batch { io, buf: Vec::new(), written: 0, flush_due: false }));
    (WriteBatch { shared: shared.clone() }, BatchFlusher { shared })
}

fn lock<I>(shared: &Mutex<Batch<I>>) -> MutexGuard<'_, Batch<I>> {
    // A panic while holding the lock can only come from the inner I/O; its state is what
    // it was, so carry on with it rather than poisoning the connection's every call.
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<I: AsyncWrite + Unpin> Batch<I> {
    /// Writes the collected bytes to `io` (not flushing it). Ready once the buffer is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        // Free rather than keep: thousands of idle keep-alive connections would each hold
        // a buffer otherwise.
        self.buf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.flush_due = false;
        Poll::Ready(Ok(()))
    }

    /// Collects `bufs` (total `len` bytes), writing out earlier bytes first when they would
    /// not fit; writes of a batch's size or more go straight through.
    fn poll_collect(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>], len: usize) -> Poll<io::Result<usize>> {
        if self.buf.len() + len > BATCH_BYTES {
            ready!(self.poll_drain(cx))?;
        }
        if len >= BATCH_BYTES {
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(BATCH_BYTES);
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }
}

impl<I: AsyncWrite + Unpin> BatchFlusher<I> {
    /// Sends a flush hyper asked for during the poll that just ended, with everything
    /// collected before it. Never waits: if the socket is full, it wakes the task when it
    /// drains and the flush (still due) goes on at the end of that poll. A write error is
    /// left for hyper to meet on its next call.
    pub fn flush(&self, cx: &mut Context<'_>) {
        let mut batch = lock(&self.shared);
        if !batch.flush_due {
            return;
        }
        if let Poll::Ready(Err(e)) = batch.poll_flush_all(cx) {
            tracing::debug!(error = %e, "writing a batch of HTTP/2 frames failed");
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteBatch<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.shared).io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteBatch<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        lock(&self.shared).poll_collect(cx, &[io::IoSlice::new(buf)], buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        lock(&self.shared).poll_collect(cx, bufs, len)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Noted, not done: see [`BatchFlusher::flush`]. With nothing collected it goes
    /// straight through.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut batch = lock(&self.shared);
        if batch.buf.is_empty() {
            return batch.poll_flush_all(cx);
        }
        batch.flush_due = true;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut batch = lock(&self.shared);
        ready!(batch.poll_flush_all(cx))?;
        Pin::new(&mut batch.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    //! The inner I/O here is an in-process recorder: what these tests check is how many
    //! writes and flushes reach the layer below (TLS), which no real socket shows. The
    //! proxy suite runs the real thing (`many_http2_streams_at_once_each_get_their_own_whole_response`).
    use super::*;
    use std::future::poll_fn;
    use tokio::io::AsyncWriteExt;

    /// Records every write and flush; can refuse writes (`Pending`) to act as a full socket.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        full: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            if self.full {
                return Poll::Pending;
            }
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn recorded(flusher: &BatchFlusher<Recorder>) -> (Vec<Vec<u8>>, usize) {
        let batch = lock(&flusher.shared);
        (batch.io.writes.clone(), batch.io.flushes)
    }

    async fn end_of_poll(flusher: &BatchFlusher<Recorder>) {
        poll_fn(|cx| {
            flusher.flush(cx);
            Poll::Ready(())
        })
        .await
    }

    #[tokio::test]
    async fn a_burst_of_flushed_frames_reaches_tls_as_one_write() {
        let (mut io, flusher) = write_batch(Recorder::default());
        let mut sent = Vec::new();
        for i in 0..10u8 {
            let frame = vec![i; 1000];
            io.write_all(&frame).await.unwrap();
            io.flush().await.unwrap(); // what h2 does after every DATA frame
            sent.extend_from_slice(&frame);
        }
        assert_eq!(recorded(&flusher), (vec![], 0), "nothing goes out before the poll ends");
        end_of_poll(&flusher).await;
        assert_eq!(recorded(&flusher), (vec![sent], 1), "one write and one flush for the burst");
        end_of_poll(&flusher).await;
        assert_eq!(recorded(&flusher).1, 1, "no second flush without new data");
    }

    #[tokio::test]
    async fn a_burst_larger_than_a_batch_goes_out_in_order() {
        let (mut io, flusher) = write_batch(Recorder::default());
        let a = vec![1u8; 12 * 1024];
        let b = vec![2u8; 8 * 1024];
        io.write_all(&a).await.unwrap();
        io.write_all(&b).await.unwrap(); // does not fit: `a` is written first
        io.flush().await.unwrap();
        end_of_poll(&flusher).await;
        assert_eq!(recorded(&flusher), (vec![a, b], 1));
    }

    #[tokio::test]
    async fn large_writes_bypass_the_buffer_after_what_came_before() {
        let (mut io, flusher) = write_batch(Recorder::default());
        let small = vec![1u8; 100];
        let large = vec![2u8; 64 * 1024];
        io.write_all(&small).await.unwrap();
        io.write_all(&large).await.unwrap();
        assert_eq!(recorded(&flusher).0, vec![small, large], "the large write went straight through, in order");
        // Nothing is left collected, so a flush goes straight through too.
        io.flush().await.unwrap();
        assert_eq!(recorded(&flusher).1, 1);
    }

    #[tokio::test]
    async fn shutdown_sends_what_was_collected() {
        let (mut io, flusher) = write_batch(Recorder::default());
        io.write_all(b"GOAWAY").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(recorded(&flusher), (vec![b"GOAWAY".to_vec()], 1));
    }

    #[tokio::test]
    async fn a_full_socket_keeps_the_batch_until_it_drains() {
        let (mut io, flusher) = write_batch(Recorder { full: true, ..Recorder::default() });
        io.write_all(b"frames").await.unwrap();
        io.flush().await.unwrap();
        end_of_poll(&flusher).await; // the write is refused: kept, still due
        assert_eq!(recorded(&flusher), (vec![], 0));
        lock(&flusher.shared).io.full = false;
        end_of_poll(&flusher).await;
        assert_eq!(recorded(&flusher), (vec![b"frames".to_vec()], 1));
    }
}
