//! Processes over TCP: the rendezvous every multi-process run goes through (rank 0
//! listens on `MASTER_ADDR:MASTER_PORT`, the others connect) and a CPU collective on
//! the same connections (a star through rank 0: each rank sends its message, rank 0
//! sends everyone all of them back). NCCL uses it to hand out its unique id; without
//! GPUs it is the data-parallel transport itself.
//!
//! Failures are errors naming the rank: a rank that does not connect within the
//! timeout, that sends nothing within it, whose connection closes (the process died),
//! or that reports a failure ([`Collective::abort`]). Rank 0 relays whatever went
//! wrong to the other ranks before returning its error, so every rank stops.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{exchange_all_reduce, exchange_broadcast, Collective, Exchange, ReduceOp, Rendezvous};
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"KSTR";
const DATA: u8 = 0;
const ABORT: u8 = 1;

enum Links {
    /// Rank 0: a connection to every other rank (index = rank; 0 is `None`).
    Root(Vec<Option<TcpStream>>),
    /// Another rank: its connection to rank 0.
    Leaf(TcpStream),
}

struct State {
    links: Links,
    round: u64,
    broken: Option<String>,
}

/// One rank of a group of processes connected over TCP (see the module docs).
pub struct TcpComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
}

fn dist(msg: String) -> Error {
    Error::Distributed(msg)
}

fn io_what(e: &std::io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout",
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => "closed",
        _ => "error",
    }
}

fn write_frame(s: &mut TcpStream, kind: u8, what: &str, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut buf =
        Vec::with_capacity(16 + what.len() + parts.iter().map(|p| p.len() + 8).sum::<usize>());
    buf.push(kind);
    buf.extend((what.len() as u32).to_le_bytes());
    buf.extend(what.as_bytes());
    buf.extend((parts.len() as u32).to_le_bytes());
    for p in parts {
        buf.extend((p.len() as u64).to_le_bytes());
        buf.extend(*p);
    }
    s.write_all(&buf)?;
    s.flush()
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, String, Vec<Vec<u8>>)> {
    let mut k = [0u8; 1];
    s.read_exact(&mut k)?;
    let mut n4 = [0u8; 4];
    s.read_exact(&mut n4)?;
    let mut what = vec![0u8; u32::from_le_bytes(n4) as usize];
    s.read_exact(&mut what)?;
    s.read_exact(&mut n4)?;
    let n = u32::from_le_bytes(n4) as usize;
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        let mut n8 = [0u8; 8];
        s.read_exact(&mut n8)?;
        let mut p = vec![0u8; u64::from_le_bytes(n8) as usize];
        s.read_exact(&mut p)?;
        parts.push(p);
    }
    Ok((k[0], String::from_utf8_lossy(&what).into_owned(), parts))
}

fn list(ranks: &[usize]) -> String {
    let v: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    format!(
        "rank{} {}",
        if ranks.len() == 1 { "" } else { "s" },
        v.join(", ")
    )
}

impl TcpComm {
    /// Join the world `rdv` describes: rank 0 listens on `MASTER_PORT` (all
    /// interfaces) and waits for every other rank; the others connect to
    /// `MASTER_ADDR:MASTER_PORT`, retrying until rank 0 is up. Every step waits at
    /// most `timeout`; a rank missing then is an error naming it.
    pub fn connect(rdv: &Rendezvous, timeout: Duration) -> Result<TcpComm> {
        rdv.validate()?;
        let links = if rdv.world_size == 1 {
            Links::Root(vec![None])
        } else if rdv.rank == 0 {
            Links::Root(Self::accept_all(rdv, timeout)?)
        } else {
            Links::Leaf(Self::join(rdv, timeout)?)
        };
        Ok(TcpComm {
            rank: rdv.rank,
            world: rdv.world_size,
            timeout,
            state: Mutex::new(State {
                links,
                round: 0,
                broken: None,
            }),
        })
    }

    fn accept_all(rdv: &Rendezvous, timeout: Duration) -> Result<Vec<Option<TcpStream>>> {
        let at = format!("0.0.0.0:{}", rdv.master_port);
        let listener = TcpListener::bind(&at)
            .map_err(|e| dist(format!("rank 0 cannot listen on {at}: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| dist(format!("rendezvous: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..rdv.world_size).map(|_| None).collect();
        while peers.iter().skip(1).any(Option::is_none) {
            match listener.accept() {
                Ok((mut s, from)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(timeout));
                    let mut hello = [0u8; 12];
                    if s.read_exact(&mut hello).is_err() || &hello[..4] != MAGIC {
                        // Not a Kestrel rank (a port scanner, a stale process): ignore it.
                        continue;
                    }
                    let r = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes")) as usize;
                    let w = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
                    if w != rdv.world_size || r == 0 || r >= rdv.world_size {
                        return Err(dist(format!(
                            "rendezvous: {from} says it is rank {r} of {w}, this world has {} ranks",
                            rdv.world_size
                        )));
                    }
                    if peers[r].is_some() {
                        return Err(dist(format!(
                            "rendezvous: rank {r} arrived twice (from {from})"
                        )));
                    }
                    peers[r] = Some(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (1..rdv.world_size)
                            .filter(|&r| peers[r].is_none())
                            .collect();
                        // Tell those that came, so they do not wait in turn.
                        let msg = format!(
                            "rendezvous on port {}: {} did not arrive within {:.1} s",
                            rdv.master_port,
                            list(&missing),
                            timeout.as_secs_f64()
                        );
                        for s in peers.iter_mut().flatten() {
                            let _ = write_frame(s, ABORT, &msg, &[]);
                        }
                        return Err(dist(msg));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(dist(format!("rendezvous: accept failed: {e}"))),
            }
        }
        for s in peers.iter_mut().flatten() {
            write_frame(s, DATA, "welcome", &[]).map_err(|e| dist(format!("rendezvous: {e}")))?;
        }
        Ok(peers)
    }

    fn join(rdv: &Rendezvous, timeout: Duration) -> Result<TcpStream> {
        let deadline = Instant::now() + timeout;
        let target = format!("{}:{}", rdv.master_addr, rdv.master_port);
        let mut s = loop {
            let addrs: Vec<_> = target
                .to_socket_addrs()
                .map_err(|e| dist(format!("rendezvous: cannot resolve {target}: {e}")))?
                .collect();
            if let Some(s) = addrs
                .iter()
                .find_map(|a| TcpStream::connect_timeout(a, Duration::from_millis(500)).ok())
            {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(dist(format!(
                    "rank {}: rank 0 did not open the rendezvous at {target} within {:.1} s",
                    rdv.rank,
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = s.set_nodelay(true);
        let mut hello = MAGIC.to_vec();
        hello.extend((rdv.rank as u32).to_le_bytes());
        hello.extend((rdv.world_size as u32).to_le_bytes());
        s.write_all(&hello)
            .map_err(|e| dist(format!("rendezvous with {target}: {e}")))?;
        // Rank 0 answers once every rank is there, within its own timeout.
        let _ = s.set_read_timeout(Some(timeout + Duration::from_secs(5)));
        match read_frame(&mut s) {
            Ok((DATA, _, _)) => {}
            Ok((_, msg, _)) => return Err(dist(msg)),
            Err(e) => {
                return Err(dist(format!(
                    "rendezvous: rank 0 at {target} gave no welcome ({}: {e})",
                    io_what(&e)
                )))
            }
        }
        let _ = s.set_read_timeout(Some(timeout));
        Ok(s)
    }

    fn fail(st: &mut State, msg: String) -> Error {
        if let Links::Root(peers) = &mut st.links {
            for s in peers.iter_mut().flatten() {
                let _ = write_frame(s, ABORT, &msg, &[]);
            }
        }
        st.broken = Some(msg.clone());
        dist(msg)
    }
}

impl Exchange for TcpComm {
    fn exchange(&self, what: &str, data: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = &st.broken {
            return Err(dist(b.clone()));
        }
        let round = st.round;
        st.round += 1;
        let t = self.timeout.as_secs_f64();
        match &mut st.links {
            Links::Leaf(s) => {
                if let Err(e) = write_frame(s, DATA, what, &[&data]) {
                    let msg = format!(
                        "collective #{round} ({what}): rank 0 closed its connection (it stopped or died: {e})"
                    );
                    st.broken = Some(msg.clone());
                    return Err(dist(msg));
                }
                let r = read_frame(s);
                let msg = match r {
                    Ok((DATA, _, parts)) if parts.len() == self.world => {
                        return Ok(Arc::new(parts));
                    }
                    Ok((DATA, _, parts)) => {
                        format!("collective #{round}: rank 0 sent {} messages", parts.len())
                    }
                    Ok((_, m, _)) => m,
                    Err(e) => match io_what(&e) {
                        "timeout" => format!(
                            "collective #{round} ({what}): rank 0 sent nothing within {t:.1} s"
                        ),
                        "closed" => format!(
                            "collective #{round} ({what}): rank 0 closed its connection (it stopped or died)"
                        ),
                        _ => format!("collective #{round} ({what}): rank 0: {e}"),
                    },
                };
                st.broken = Some(msg.clone());
                Err(dist(msg))
            }
            Links::Root(peers) => {
                let mut parts = vec![data];
                let mut failure = None;
                for (r, s) in peers.iter_mut().enumerate().skip(1) {
                    let Some(s) = s.as_mut() else { continue };
                    match read_frame(s) {
                        Ok((DATA, w, mut p)) if w == what && p.len() == 1 => {
                            parts.push(p.pop().expect("one part"))
                        }
                        Ok((DATA, w, _)) => {
                            failure = Some(format!(
                                "collective #{round}: rank {r} called {w} while rank 0 called {what}"
                            ));
                        }
                        Ok((_, m, _)) => failure = Some(format!("rank {r} failed: {m}")),
                        Err(e) => {
                            failure = Some(match io_what(&e) {
                                "timeout" => format!(
                                    "collective #{round} ({what}): rank {r} did not arrive within {t:.1} s"
                                ),
                                "closed" => format!(
                                    "collective #{round} ({what}): rank {r} closed its connection (it stopped or died)"
                                ),
                                _ => format!("collective #{round} ({what}): rank {r}: {e}"),
                            })
                        }
                    }
                    if failure.is_some() {
                        break;
                    }
                }
                if let Some(msg) = failure {
                    return Err(Self::fail(&mut st, msg));
                }
                let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                for (r, s) in peers.iter_mut().enumerate().skip(1) {
                    if let Some(s) = s.as_mut() {
                        if let Err(e) = write_frame(s, DATA, what, &refs) {
                            let msg = format!(
                                "collective #{round} ({what}): rank {r} closed its connection (it stopped or died: {e})"
                            );
                            return Err(Self::fail(&mut st, msg));
                        }
                    }
                }
                Ok(Arc::new(parts))
            }
        }
    }
}

impl Collective for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        exchange_all_reduce(self, buf, op)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        exchange_broadcast(self, buf, root, self.world)
    }
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(self.exchange("all_gather", data.to_vec())?.as_ref().clone())
    }
    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", Vec::new()).map(|_| ())
    }
    fn abort(&self, reason: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let msg = format!("rank {} failed: {reason}", self.rank);
        match &mut st.links {
            Links::Leaf(s) => {
                let _ = write_frame(s, ABORT, reason, &[]);
            }
            Links::Root(peers) => {
                for s in peers.iter_mut().flatten() {
                    let _ = write_frame(s, ABORT, &msg, &[]);
                }
            }
        }
        st.broken = Some(msg);
    }
}
