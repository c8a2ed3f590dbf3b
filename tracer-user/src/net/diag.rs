//! sock_diag (NETLINK_SOCK_DIAG): the target's listening sockets with their accept-queue
//! length, backlog and drop counter, read from inside the target's network namespace.
use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const INET_DIAG_SKMEMINFO: u16 = 7;
const SK_MEMINFO_DROPS: usize = 8;
const NLMSG_HDR: usize = 16;
const DIAG_MSG: usize = 72;
const SOCKID: usize = 48;

/// One socket as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSocket {
    pub inode: u64,
    pub addr: IpAddr,
    pub port: u16,
    /// Listeners: connections waiting in the accept queue. Other sockets: unread bytes.
    pub queue: u32,
    /// The accept queue's limit (listen's backlog, capped by somaxconn).
    pub backlog: u32,
    /// sk_drops: SYNs and final ACKs the listener dropped (a full accept queue, on a sane host).
    pub drops: u64,
}

/// A NETLINK_SOCK_DIAG socket bound to the network namespace of `pid`.
pub struct Diag {
    fd: OwnedFd,
    /// Each request's sequence number: a reply left over from an earlier request is skipped.
    seq: AtomicU32,
}

impl Diag {
    pub fn open(pid: u32) -> Result<Self> {
        let ns = File::open(format!("/proc/{pid}/ns/net")).with_context(|| format!("opening PID {pid}'s netns"))?;
        // setns changes only the calling thread: a short-lived thread creates the socket
        // there, and the socket keeps that namespace for good.
        let fd = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<OwnedFd> {
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                let fd = unsafe {
                    libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG)
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .join()
            .expect("netns thread")
        })
        .context("sock_diag socket in the target's netns")?;
        Ok(Self { fd, seq: AtomicU32::new(0) })
    }

    /// Every TCP listening socket in the namespace, IPv4 and IPv6.
    pub fn listeners(&self) -> Result<Vec<ListenSocket>> {
        self.dump_both(1 << TCP_LISTEN)
    }

    /// Every other TCP socket (connected, closing...): `queue` holds its unread bytes.
    pub fn connections(&self) -> Result<Vec<ListenSocket>> {
        self.dump_both(!(1 << TCP_LISTEN) & 0xfff)
    }

    /// The TCP listening sockets of one family (`libc::AF_INET` or `libc::AF_INET6`).
    pub fn listeners_in(&self, family: i32) -> Result<Vec<ListenSocket>> {
        self.dump(family as u8, 1 << TCP_LISTEN)
    }

    /// `known` looked up by its address and port alone, without walking the listening hash
    /// as a dump does: `None` once it is gone (closed, or another socket holds its address).
    pub fn listener(&self, known: &ListenSocket) -> Result<Option<ListenSocket>> {
        let family = if known.addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        let seq = self.send(libc::NLM_F_REQUEST, family as u8, 1 << TCP_LISTEN, &sockid(known.addr, known.port))?;
        // The answer is one datagram of a few hundred bytes: the socket, or an error. Reading
        // exactly one never blocks on an answer that will not come.
        let mut buf = [0u8; 8192];
        let mut out = Vec::new();
        let end = parse_messages(self.recv(&mut buf)?, seq, &mut out)?;
        match (out.pop(), end) {
            (Some(s), _) => Ok(Some(s).filter(|s| s.inode == known.inode)),
            (None, End::Error(0 | libc::ENOENT)) => Ok(None),
            (None, End::Error(e)) => bail!("sock_diag lookup: error {e}"),
            (None, End::Done | End::More) => bail!("sock_diag lookup: no answer"),
        }
    }

    fn dump_both(&self, states: u32) -> Result<Vec<ListenSocket>> {
        let mut out = self.dump(libc::AF_INET as u8, states)?;
        out.extend(self.dump(libc::AF_INET6 as u8, states)?);
        Ok(out)
    }

    fn dump(&self, family: u8, states: u32) -> Result<Vec<ListenSocket>> {
        let seq = self.send(libc::NLM_F_REQUEST | libc::NLM_F_DUMP, family, states, &[0; SOCKID])?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match parse_messages(self.recv(&mut buf)?, seq, &mut out)? {
                End::More => {}
                End::Done => return Ok(out),
                End::Error(e) => bail!("sock_diag: error {e}"),
            }
        }
    }

    /// Sends one request; returns its sequence number.
    fn send(&self, flags: i32, family: u8, states: u32, id: &[u8; SOCKID]) -> Result<u32> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let req = request(flags, seq, family, states, id);
        if unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
            bail!("sock_diag send: {}", io::Error::last_os_error());
        }
        Ok(seq)
    }

    fn recv<'a>(&self, buf: &'a mut [u8]) -> Result<&'a [u8]> {
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            bail!("sock_diag recv: {}", io::Error::last_os_error());
        }
        Ok(&buf[..n as usize])
    }
}

fn request(flags: i32, seq: u32, family: u8, states: u32, id: &[u8; SOCKID]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(NLMSG_HDR + 8 + SOCKID);
    let len = (NLMSG_HDR + 8 + SOCKID) as u32;
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&(flags as u16).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    // inet_diag_req_v2: family, protocol, extensions wanted, pad, states, then the sockid.
    msg.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 1 << (INET_DIAG_SKMEMINFO - 1), 0]);
    msg.extend_from_slice(&states.to_ne_bytes());
    msg.extend_from_slice(id);
    msg
}

/// inet_diag_sockid of a listener: sport, dport, src, dst, if, cookie. The remote end stays
/// zero, so the kernel's lookup falls through its established table to the listeners.
fn sockid(addr: IpAddr, port: u16) -> [u8; SOCKID] {
    let mut id = [0u8; SOCKID];
    id[..2].copy_from_slice(&port.to_be_bytes());
    match addr {
        IpAddr::V4(a) => id[4..8].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => id[4..20].copy_from_slice(&a.octets()),
    }
    // INET_DIAG_NOCOOKIE: the socket is matched by address; the caller checks its inode.
    id[40..].fill(0xff);
    id
}

/// How a datagram ended.
enum End {
    /// More datagrams to come.
    More,
    Done,
    /// NLMSG_ERROR with its errno; 0 is an ACK.
    Error(i32),
}

/// Appends the sockets in one datagram that answer request `seq`.
fn parse_messages(mut data: &[u8], seq: u32, out: &mut Vec<ListenSocket>) -> Result<End> {
    while data.len() >= NLMSG_HDR {
        let len = u32_at(data, 0) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if len < NLMSG_HDR || len > data.len() {
            bail!("sock_diag: truncated message");
        }
        if u32_at(data, 8) == seq {
            match kind {
                NLMSG_DONE => return Ok(End::Done),
                NLMSG_ERROR if len >= NLMSG_HDR + 4 => return Ok(End::Error(-(u32_at(data, NLMSG_HDR) as i32))),
                SOCK_DIAG_BY_FAMILY => out.extend(parse_socket(&data[NLMSG_HDR..len])),
                _ => {}
            }
        }
        data = &data[align4(len).min(data.len())..];
    }
    Ok(End::More)
}

fn parse_socket(msg: &[u8]) -> Option<ListenSocket> {
    if msg.len() < DIAG_MSG {
        return None;
    }
    let family = msg[0];
    let port = u16::from_be_bytes([msg[4], msg[5]]);
    let addr = if family == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(msg[8], msg[9], msg[10], msg[11]))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&msg[8..24]).ok()?))
    };
    Some(ListenSocket {
        inode: u64::from(u32_at(msg, 68)),
        addr,
        port,
        queue: u32_at(msg, 56),
        backlog: u32_at(msg, 60),
        drops: meminfo_drops(&msg[DIAG_MSG..]).unwrap_or(0),
    })
}

/// The drop counter from the INET_DIAG_SKMEMINFO attribute.
fn meminfo_drops(mut attrs: &[u8]) -> Option<u64> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == INET_DIAG_SKMEMINFO && len >= 4 + 4 * (SK_MEMINFO_DROPS + 1) {
            return Some(u64::from(u32_at(attrs, 4 + 4 * SK_MEMINFO_DROPS)));
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::fd::AsRawFd};

    use super::*;

    #[test]
    fn sees_our_own_listener_with_its_backlog_and_queue() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 7) }, 0);
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let diag = Diag::open(std::process::id()).unwrap();
        let found = diag.listeners().unwrap();
        let me = found.iter().find(|s| s.port == port).expect("our listener");
        assert_eq!(me.backlog, 7);
        assert_eq!(me.queue, 1);
        assert_eq!(me.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(me.inode > 0);
    }

    fn inode(fd: &impl AsRawFd) -> u64 {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        st.st_ino
    }

    #[test]
    fn looks_up_one_listener_and_sees_it_gone() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 7) }, 0);
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let diag = Diag::open(std::process::id()).unwrap();
        let addr = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let known = ListenSocket { inode: inode(&l), addr, port, queue: 0, backlog: 0, drops: 0 };
        let me = diag.listener(&known).unwrap().expect("our listener");
        assert_eq!((me.inode, me.addr, me.port, me.backlog, me.queue), (known.inode, addr, port, 7, 1));
        drop(l);
        assert_eq!(diag.listener(&known).unwrap(), None);
        // A new socket on the same address is not the listener we knew.
        let again = TcpListener::bind(("127.0.0.1", port)).unwrap();
        assert_eq!(diag.listener(&known).unwrap(), None);
        let now = ListenSocket { inode: inode(&again), ..known };
        assert_eq!(diag.listener(&now).unwrap().map(|s| s.inode), Some(now.inode));
    }
}
