#![forbid(unsafe_code)]
//! Full-mesh TCP all-to-all-v.
//!
//! Rank `i` connects to every rank `j < i` and accepts from every `j > i`; each connection starts
//! with a hello (magic, rank, world, group generation) that the acceptor answers (an ack) only for
//! the generation it is building. One sender thread per peer writes frames (`[seq u64][len u64]`
//! then the payload, straight from the caller's buffer, in one vectored write) so large exchanges in
//! both directions cannot deadlock on full socket buffers. Frames are received from all peers at
//! once: the calling thread reads one peer itself and a reader thread per other peer reads the rest.
//! Payloads are read straight into their destination without zero-filling, and buffers the sender
//! threads hand back are reused as the next collective's receive buffers.
//! Reads and writes time out; a closed connection is reported as [`TransportError::PeerClosed`].

use super::{InterruptHandle, Transport, TransportError};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x5359_4132; // "SYA2"
/// Hello: magic, rank, world (u32 each), generation (u64).
const HELLO_LEN: usize = 20;
/// The acceptor's answer: magic (u32), generation (u64).
const ACK_LEN: usize = 12;
/// Largest frame a peer may announce.
const MAX_FRAME: u64 = 1 << 40;
/// Spare buffers bigger than this are dropped instead of kept for reuse.
const MAX_SPARE: usize = 256 << 20;
/// Frames up to this size are written by the calling thread (see `all_to_all_v`).
const INLINE_SEND: usize = 16 << 10;

/// What a reader thread is asked to do: read the frame of collective `seq` into `buf`.
struct RecvJob {
    seq: u64,
    buf: Vec<u8>,
}

struct Peer {
    /// The connection (also used for shutdown).
    sock: TcpStream,
    jobs: Option<mpsc::Sender<([u8; 16], Vec<u8>)>>,
    done: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
    /// Reader thread (every peer but the one the calling thread reads itself).
    recv_jobs: Option<mpsc::Sender<RecvJob>>,
    recv_done: Option<mpsc::Receiver<Result<Vec<u8>, TransportError>>>,
    recv_thread: Option<JoinHandle<()>>,
}

/// A connected full mesh. See the module docs.
pub struct TcpTransport {
    rank: usize,
    world: usize,
    peers: Vec<Option<Peer>>,
    timeout: Duration,
    seq: u64,
    failed: Option<String>,
    /// Buffers handed back by the sender threads, reused as receive buffers.
    spare: Vec<Vec<u8>>,
    /// Bytes sent to other ranks so far.
    pub bytes_sent: u64,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

fn io_err(rank: usize, peer: usize, timeout: Duration, e: std::io::Error) -> TransportError {
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            TransportError::PeerClosed { rank, peer }
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => TransportError::Timeout { rank, peer, timeout },
        _ => TransportError::Io { rank, peer, source: e },
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, TransportError> {
    addr.to_socket_addrs()
        .map_err(|e| TransportError::Setup(format!("bad peer address {addr:?}: {e}")))?
        .next()
        .ok_or_else(|| TransportError::Setup(format!("peer address {addr:?} resolves to nothing")))
}

/// Header and payload in as few syscalls (and segments) as possible.
fn write_frame(w: &mut TcpStream, hdr: &[u8; 16], payload: &[u8]) -> std::io::Result<()> {
    let mut bufs = [IoSlice::new(hdr), IoSlice::new(payload)];
    let mut slices: &mut [IoSlice<'_>] = if payload.is_empty() { &mut bufs[..1] } else { &mut bufs[..] };
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read `[seq][len]` then the payload into `buf` (reused: its old contents are overwritten, the
/// part beyond its old length is read into spare capacity without zero-filling).
fn read_frame(
    r: &mut TcpStream,
    rank: usize,
    j: usize,
    timeout: Duration,
    seq: u64,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, TransportError> {
    let mut hdr = [0u8; 16];
    r.read_exact(&mut hdr).map_err(|e| io_err(rank, j, timeout, e))?;
    let got_seq = u64::from_le_bytes(hdr[0..8].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
    if got_seq != seq {
        return Err(TransportError::Protocol { rank, peer: j, msg: format!("collective {got_seq} arrived during {seq}") });
    }
    if len > MAX_FRAME {
        return Err(TransportError::Protocol { rank, peer: j, msg: format!("frame of {len} bytes") });
    }
    let len = len as usize;
    // Overwrite the initialised prefix in place, then read the rest into the spare capacity.
    buf.truncate(len);
    r.read_exact(&mut buf).map_err(|e| io_err(rank, j, timeout, e))?;
    let rest = len - buf.len();
    if rest > 0 {
        buf.reserve_exact(rest);
        let n = (&mut *r).take(rest as u64).read_to_end(&mut buf).map_err(|e| io_err(rank, j, timeout, e))?;
        if n != rest {
            return Err(TransportError::PeerClosed { rank, peer: j });
        }
    }
    Ok(buf)
}

/// Connect to lower rank `j` for `generation`: hello, then wait for the acceptor's ack. A peer
/// that refuses (closes: it is building another generation, or has not started this one and an
/// older build saw us) is tried again until `deadline`.
fn connect_peer(
    rank: usize,
    world: usize,
    j: usize,
    sa: &SocketAddr,
    generation: u64,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<TcpStream, TransportError> {
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(&MAGIC.to_le_bytes());
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    hello.extend_from_slice(&generation.to_le_bytes());
    let mut last = String::from("no attempt");
    loop {
        if cancelled() {
            return Err(TransportError::Cancelled { generation });
        }
        if Instant::now() >= deadline {
            return Err(TransportError::Setup(format!("rank {rank}: cannot connect to rank {j} at {sa} (generation {generation}): {last}")));
        }
        match TcpStream::connect_timeout(sa, Duration::from_millis(500)) {
            Ok(mut s) => {
                if let Err(e) = s.write_all(&hello) {
                    last = format!("hello: {e}");
                } else {
                    match wait_ack(&mut s, generation, deadline, cancelled) {
                        Ok(true) => return Ok(s),
                        Ok(false) => last = "refused (another generation)".into(),
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait for the acceptor's ack: `Ok(false)` when it closed the connection (refused).
fn wait_ack(s: &mut TcpStream, generation: u64, deadline: Instant, cancelled: &dyn Fn() -> bool) -> Result<bool, TransportError> {
    // Short read timeouts: the acceptor may not be accepting yet (the connection waits in its
    // backlog), and a cancelled build must notice soon.
    s.set_read_timeout(Some(Duration::from_millis(100))).ok();
    let mut ack = [0u8; ACK_LEN];
    let mut got = 0;
    while got < ACK_LEN {
        match s.read(&mut ack[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                if cancelled() {
                    return Err(TransportError::Cancelled { generation });
                }
                if Instant::now() >= deadline {
                    return Ok(false);
                }
            }
            Err(_) => return Ok(false),
        }
    }
    let magic = u32::from_le_bytes(ack[0..4].try_into().unwrap_or_default());
    let g = u64::from_le_bytes(ack[4..12].try_into().unwrap_or_default());
    Ok(magic == MAGIC && g == generation)
}

impl TcpTransport {
    /// Build the mesh. `listener` is this rank's bound listener (its address is `peers[rank]`);
    /// `peers` lists every rank's address. Waits at most `connect_timeout` for the others;
    /// `timeout` bounds every later read and write.
    pub fn connect(
        rank: usize,
        listener: TcpListener,
        peers: &[String],
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<TcpTransport, TransportError> {
        Self::connect_generation(rank, &listener, peers, 0, connect_timeout, timeout, &|| false)
    }

    /// Build the mesh of group generation `generation`. The listener is borrowed: a worker keeps
    /// one for its lifetime and builds one mesh per generation from it. Connections whose hello
    /// names another generation are refused (closed without an answer; a connector retries until
    /// its own deadline, so a peer that is still on an older generation is waited for, not lost).
    /// `cancelled` is polled while waiting: when it says yes the build gives up with
    /// [`TransportError::Cancelled`] (a newer generation superseded this one).
    pub fn connect_generation(
        rank: usize,
        listener: &TcpListener,
        peers: &[String],
        generation: u64,
        connect_timeout: Duration,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<TcpTransport, TransportError> {
        let world = peers.len();
        if rank >= world {
            return Err(TransportError::Setup(format!("rank {rank} outside a world of {world}")));
        }
        let deadline = Instant::now() + connect_timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        // Connect to lower ranks.
        for (j, addr) in peers.iter().enumerate().take(rank) {
            let sa = resolve(addr)?;
            streams[j] = Some(connect_peer(rank, world, j, &sa, generation, deadline, cancelled)?);
        }
        // Accept from higher ranks.
        listener.set_nonblocking(true).map_err(|e| TransportError::Setup(e.to_string()))?;
        let mut missing = world - rank - 1;
        while missing > 0 {
            if cancelled() {
                return Err(TransportError::Cancelled { generation });
            }
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false).map_err(|e| TransportError::Setup(e.to_string()))?;
                    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                    let mut hello = [0u8; HELLO_LEN];
                    if let Err(e) = s.read_exact(&mut hello) {
                        tracing::warn!("rank {rank}: dropping connection from {from}: {e}");
                        continue;
                    }
                    let magic = u32::from_le_bytes(hello[0..4].try_into().unwrap_or_default());
                    let r = u32::from_le_bytes(hello[4..8].try_into().unwrap_or_default()) as usize;
                    let w = u32::from_le_bytes(hello[8..12].try_into().unwrap_or_default()) as usize;
                    let g = u64::from_le_bytes(hello[12..20].try_into().unwrap_or_default());
                    if magic != MAGIC || g != generation || w != world || r <= rank || r >= world || streams[r].is_some() {
                        // Closing it without an answer tells the connector to try again.
                        tracing::warn!("rank {rank}: refusing hello from {from} (rank {r}, world {w}, generation {g}; building {generation})");
                        continue;
                    }
                    let mut ack = Vec::with_capacity(ACK_LEN);
                    ack.extend_from_slice(&MAGIC.to_le_bytes());
                    ack.extend_from_slice(&generation.to_le_bytes());
                    if let Err(e) = s.write_all(&ack) {
                        tracing::warn!("rank {rank}: dropping connection from {from}: ack: {e}");
                        continue;
                    }
                    streams[r] = Some(s);
                    missing -= 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let absent: Vec<usize> = (rank + 1..world).filter(|&r| streams[r].is_none()).collect();
                        return Err(TransportError::Setup(format!(
                            "rank {rank}: ranks {absent:?} did not connect within {connect_timeout:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(TransportError::Setup(format!("rank {rank}: accept: {e}"))),
            }
        }
        let direct = Self::direct_peer(rank, world);
        let mut peers_v = Vec::with_capacity(world);
        for (j, s) in streams.into_iter().enumerate() {
            let Some(s) = s else {
                peers_v.push(None);
                continue;
            };
            let setup = |e: std::io::Error| TransportError::Setup(format!("rank {rank}: socket to rank {j}: {e}"));
            s.set_nodelay(true).map_err(setup)?;
            s.set_read_timeout(Some(timeout)).map_err(setup)?;
            s.set_write_timeout(Some(timeout)).map_err(setup)?;
            let mut writer = s.try_clone().map_err(setup)?;
            let (jobs_tx, jobs_rx) = mpsc::channel::<([u8; 16], Vec<u8>)>();
            let (done_tx, done_rx) = mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("a2a-send-{rank}->{j}"))
                .spawn(move || {
                    while let Ok((hdr, buf)) = jobs_rx.recv() {
                        // The header, then the payload straight from the caller's buffer.
                        let r = write_frame(&mut writer, &hdr, &buf).map(|_| buf);
                        if done_tx.send(r).is_err() {
                            break;
                        }
                    }
                })
                .map_err(setup)?;
            let (mut recv_jobs, mut recv_done, mut recv_thread) = (None, None, None);
            if Some(j) != direct {
                let mut reader = s.try_clone().map_err(setup)?;
                let (rj_tx, rj_rx) = mpsc::channel::<RecvJob>();
                let (rd_tx, rd_rx) = mpsc::channel();
                let t = std::thread::Builder::new()
                    .name(format!("a2a-recv-{rank}<-{j}"))
                    .spawn(move || {
                        while let Ok(job) = rj_rx.recv() {
                            let r = read_frame(&mut reader, rank, j, timeout, job.seq, job.buf);
                            if rd_tx.send(r).is_err() {
                                break;
                            }
                        }
                    })
                    .map_err(setup)?;
                recv_jobs = Some(rj_tx);
                recv_done = Some(rd_rx);
                recv_thread = Some(t);
            }
            peers_v.push(Some(Peer {
                sock: s,
                jobs: Some(jobs_tx),
                done: done_rx,
                thread: Some(thread),
                recv_jobs,
                recv_done,
                recv_thread,
            }));
        }
        Ok(TcpTransport { rank, world, peers: peers_v, timeout, seq: 0, failed: None, spare: Vec::new(), bytes_sent: 0 })
    }

    /// The peer the calling thread reads itself (no reader thread): the next rank.
    fn direct_peer(rank: usize, world: usize) -> Option<usize> {
        (world > 1).then(|| (rank + 1) % world)
    }

    /// Bind a listener for [`TcpTransport::connect`] on `addr` (port 0: any free port).
    pub fn bind(addr: &str) -> Result<TcpListener, TransportError> {
        TcpListener::bind(addr).map_err(|e| TransportError::Setup(format!("bind {addr}: {e}")))
    }

    /// Build a whole mesh of `world` ranks inside this process over 127.0.0.1 (tests, benchmarks).
    pub fn local_mesh(world: usize, timeout: Duration) -> Result<Vec<TcpTransport>, TransportError> {
        let listeners: Vec<TcpListener> =
            (0..world).map(|_| Self::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.to_string()).map_err(|e| TransportError::Setup(e.to_string())))
            .collect::<Result<_, _>>()?;
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = addrs.clone();
                std::thread::spawn(move || TcpTransport::connect(r, l, &addrs, Duration::from_secs(10), timeout))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| TransportError::Setup("mesh thread panicked".into()))?)
            .collect()
    }

    /// A handle that shuts every connection of this mesh down from another thread: a collective
    /// blocked on a dead or frozen peer then fails at once instead of waiting for its timeout.
    pub fn interrupt_handle(&self) -> Option<InterruptHandle> {
        let socks: Vec<TcpStream> = self.peers.iter().flatten().filter_map(|p| p.sock.try_clone().ok()).collect();
        Some(InterruptHandle::new(move || {
            for s in &socks {
                let _ = s.shutdown(Shutdown::Both);
            }
        }))
    }

    fn fail(&mut self, e: TransportError) -> TransportError {
        self.failed = Some(e.to_string());
        // Make every peer notice at once instead of waiting for its timeout.
        for p in self.peers.iter().flatten() {
            let _ = p.sock.shutdown(Shutdown::Both);
        }
        e
    }

    fn keep_spare(&mut self, buf: Vec<u8>) {
        if buf.capacity() > 0 && buf.capacity() <= MAX_SPARE && self.spare.len() < self.world {
            self.spare.push(buf);
        }
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn kind(&self) -> &'static str {
        "tcp"
    }
    fn interrupt_handle(&self) -> Option<InterruptHandle> {
        TcpTransport::interrupt_handle(self)
    }

    fn all_to_all_v(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, TransportError> {
        if let Some(f) = &self.failed {
            return Err(TransportError::Failed(f.clone()));
        }
        if send.len() != self.world {
            return Err(TransportError::Usage {
                rank: self.rank,
                msg: format!("{} buffers for a world of {}", send.len(), self.world),
            });
        }
        let (rank, seq, timeout) = (self.rank, self.seq, self.timeout);
        let direct = Self::direct_peer(rank, self.world);
        let mut recv: Vec<Vec<u8>> = (0..self.world).map(|_| Vec::new()).collect();
        let mut posted = vec![false; self.world];
        let mut inline = Vec::new();
        // Start sending to everyone.
        for (j, payload) in send.into_iter().enumerate() {
            if j == rank {
                recv[j] = payload;
                continue;
            }
            let mut hdr = [0u8; 16];
            hdr[0..8].copy_from_slice(&seq.to_le_bytes());
            hdr[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            self.bytes_sent += payload.len() as u64;
            if payload.len() <= INLINE_SEND {
                inline.push((j, hdr, payload));
                continue;
            }
            let ok =
                self.peers[j].as_ref().and_then(|p| p.jobs.as_ref()).is_some_and(|tx| tx.send((hdr, payload)).is_ok());
            if !ok {
                let e = TransportError::PeerClosed { rank, peer: j };
                return Err(self.fail(e));
            }
            posted[j] = true;
        }
        // Small frames are written here, sparing a thread hand-off: they always fit the socket
        // buffers (the peer has read every earlier frame of ours before we got here, and the sender
        // thread of this peer is idle), so this cannot block on a peer that is writing to us.
        for (j, hdr, payload) in inline {
            let r = match self.peers[j].as_mut() {
                Some(p) => write_frame(&mut p.sock, &hdr, &payload).map_err(|e| io_err(rank, j, timeout, e)),
                None => Err(TransportError::PeerClosed { rank, peer: j }),
            };
            if let Err(e) = r {
                return Err(self.fail(e));
            }
            self.keep_spare(payload);
        }
        // Start receiving from everyone but the direct peer on the reader threads.
        let mut reading = vec![false; self.world];
        for j in 0..self.world {
            if j == rank || Some(j) == direct {
                continue;
            }
            let buf = self.spare.pop().unwrap_or_default();
            let ok = self.peers[j]
                .as_ref()
                .and_then(|p| p.recv_jobs.as_ref())
                .is_some_and(|tx| tx.send(RecvJob { seq, buf }).is_ok());
            if !ok {
                let e = TransportError::PeerClosed { rank, peer: j };
                return Err(self.fail(e));
            }
            reading[j] = true;
        }
        // Read the direct peer here.
        if let Some(j) = direct {
            let buf = self.spare.pop().unwrap_or_default();
            let r = match self.peers[j].as_mut() {
                Some(p) => read_frame(&mut p.sock, rank, j, timeout, seq, buf),
                None => Err(TransportError::Usage { rank, msg: format!("no connection to rank {j}") }),
            };
            match r {
                Ok(b) => recv[j] = b,
                Err(e) => return Err(self.fail(e)),
            }
        }
        for j in 0..self.world {
            if !reading[j] {
                continue;
            }
            let r = match self.peers[j].as_ref().and_then(|p| p.recv_done.as_ref()) {
                Some(rx) => match rx.recv_timeout(timeout + Duration::from_secs(1)) {
                    Ok(r) => r,
                    Err(mpsc::RecvTimeoutError::Timeout) => Err(TransportError::Timeout { rank, peer: j, timeout }),
                    Err(mpsc::RecvTimeoutError::Disconnected) => Err(TransportError::PeerClosed { rank, peer: j }),
                },
                None => continue,
            };
            match r {
                Ok(b) => recv[j] = b,
                Err(e) => return Err(self.fail(e)),
            }
        }
        for j in 0..self.world {
            if !posted[j] {
                continue;
            }
            let r = match self.peers[j].as_ref() {
                Some(p) => p.done.recv_timeout(timeout + Duration::from_secs(1)),
                None => continue,
            };
            match r {
                Ok(Ok(buf)) => self.keep_spare(buf),
                Ok(Err(e)) => {
                    let e = io_err(rank, j, timeout, e);
                    return Err(self.fail(e));
                }
                Err(_) => {
                    let e = TransportError::Timeout { rank, peer: j, timeout };
                    return Err(self.fail(e));
                }
            }
        }
        self.seq += 1;
        Ok(recv)
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        for p in self.peers.iter_mut().flatten() {
            let _ = p.sock.shutdown(Shutdown::Both);
            p.jobs.take();
            p.recv_jobs.take();
            if let Some(t) = p.thread.take() {
                let _ = t.join();
            }
            if let Some(t) = p.recv_thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Encode `[u32 count][count × u32][f32 rows]` helpers used by the expert-parallel dispatch.
pub fn put_u32s(buf: &mut Vec<u8>, v: &[u32]) {
    for x in v {
        buf.extend_from_slice(&x.to_le_bytes());
    }
}

pub fn put_f32s(buf: &mut Vec<u8>, v: &[f32]) {
    for x in v {
        buf.extend_from_slice(&x.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(from: usize, to: usize, round: usize) -> Vec<u8> {
        let n = ((from * 7 + to * 13 + round * 5) % 5) * 1000 + if (from + to + round) % 3 == 0 { 0 } else { 17 };
        (0..n).map(|i| (i + from * 31 + to * 17 + round) as u8).collect()
    }

    #[test]
    fn all_to_all_v_delivers_every_buffer_across_ranks() {
        for world in [1usize, 2, 3, 4] {
            let mesh = TcpTransport::local_mesh(world, Duration::from_secs(20)).expect("mesh");
            let handles: Vec<_> = mesh
                .into_iter()
                .map(|mut t| {
                    std::thread::spawn(move || {
                        let r = t.rank();
                        for round in 0..5 {
                            let send: Vec<Vec<u8>> = (0..t.world()).map(|j| pattern(r, j, round)).collect();
                            let recv = t.all_to_all_v(send).expect("a2a");
                            for (j, b) in recv.iter().enumerate() {
                                assert_eq!(b, &pattern(j, r, round), "world {} rank {r} from {j} round {round}", t.world());
                            }
                        }
                        // A large exchange both ways (bigger than socket buffers).
                        let big: Vec<Vec<u8>> = (0..t.world()).map(|j| vec![(r * 10 + j) as u8; 8 << 20]).collect();
                        let recv = t.all_to_all_v(big).expect("big a2a");
                        for (j, b) in recv.iter().enumerate() {
                            assert_eq!(b.len(), 8 << 20);
                            assert!(b.iter().all(|&x| x == (j * 10 + r) as u8));
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("rank thread");
            }
        }
    }

    #[test]
    fn reused_buffers_never_leak_old_bytes_across_growing_and_shrinking_frames() {
        // Sizes straddle the inline-send threshold and the reuse of returned buffers (which were
        // bigger or smaller than the next frame), with the returned buffers sent again.
        let sizes = [0usize, 100 << 10, 10, INLINE_SEND, INLINE_SEND + 1, 3 << 20, 1, 0, 200 << 10, 5];
        for world in [2usize, 3] {
            let mesh = TcpTransport::local_mesh(world, Duration::from_secs(20)).expect("mesh");
            let handles: Vec<_> = mesh
                .into_iter()
                .map(|mut t| {
                    std::thread::spawn(move || {
                        let (r, w) = (t.rank(), t.world());
                        let fill = |from: usize, to: usize, round: usize| -> Vec<u8> {
                            let n = sizes[(round + from + to) % sizes.len()];
                            (0..n).map(|i| (i * 7 + from * 3 + to * 5 + round) as u8).collect()
                        };
                        let mut prev: Vec<Vec<u8>> = Vec::new();
                        for round in 0..2 * sizes.len() {
                            // Reuse what came back: overwrite it with this round's content.
                            let mut send = std::mem::take(&mut prev);
                            send.resize_with(w, Vec::new);
                            for (j, b) in send.iter_mut().enumerate() {
                                b.clear();
                                b.extend_from_slice(&fill(r, j, round));
                            }
                            let recv = t.all_to_all_v(send).expect("a2a");
                            for (j, b) in recv.iter().enumerate() {
                                assert!(b == &fill(j, r, round), "world {w} rank {r} from {j} round {round}");
                            }
                            prev = recv;
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("rank thread");
            }
        }
    }

    #[test]
    fn a_dead_peer_is_reported_not_hung() {
        let mut mesh = TcpTransport::local_mesh(3, Duration::from_secs(30)).expect("mesh");
        let dead = mesh.pop().expect("rank 2");
        drop(dead); // rank 2 dies
        let handles: Vec<_> = mesh
            .into_iter()
            .map(|mut t| {
                std::thread::spawn(move || {
                    let send = vec![vec![1u8; 100]; 3];
                    let err = t.all_to_all_v(send).expect_err("peer is dead");
                    let msg = err.to_string();
                    assert!(matches!(err, TransportError::PeerClosed { .. }), "{msg}");
                    // Poisoned afterwards.
                    assert!(t.all_to_all_v(vec![vec![]; 3]).is_err());
                    msg
                })
            })
            .collect();
        for h in handles {
            let msg = h.join().expect("rank thread");
            assert!(msg.contains("closed the connection"), "{msg}");
        }
    }

    #[test]
    fn silent_peer_times_out() {
        let mut mesh = TcpTransport::local_mesh(2, Duration::from_millis(300)).expect("mesh");
        let _silent = mesh.pop();
        let mut t = mesh.pop().expect("rank 0");
        let err = t.all_to_all_v(vec![vec![], vec![]]).expect_err("timeout");
        assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
    }

    #[test]
    fn wrong_buffer_count_is_a_usage_error() {
        let mut mesh = TcpTransport::local_mesh(2, Duration::from_secs(5)).expect("mesh");
        let err = mesh[0].all_to_all_v(vec![vec![]]).expect_err("usage");
        assert!(matches!(err, TransportError::Usage { .. }), "{err}");
    }
}
