//! `cortexflow-workload`: the demo workload of the lab (what the image `cortexflow/workload`
//! runs), in the spirit of agnhost.
//!
//! ```text
//! cortexflow-workload serve [--tcp PORT]... [--udp PORT]... [--http PORT] [--name NAME]
//!                           [--drain-ms MS] [--http-fail-after-ms MS]
//!     TCP: sends "NAME\n" on every connection, then echoes what it reads.
//!     UDP: answers every datagram with "NAME".
//!     HTTP (for probes): every request is answered "200 OK" with body NAME — or, once
//!     --http-fail-after-ms has passed since the start, "503 Service Unavailable".
//!     NAME defaults to $POD_NAME, then $HOSTNAME. On SIGTERM it goes on serving for MS
//!     (default 2000) — long enough for the Service to stop sending it new connections — then
//!     exits 0.
//! cortexflow-workload probe tcp|udp HOST:PORT [--timeout-ms MS] [--source IP] [--bytes N]
//!     One attempt; prints one line and exits 0 on success:
//!     "success NAME" | "refused" | "timeout" | "error WHAT". `--source` binds the socket to
//!     that local address first. `--bytes` (TCP): after the greeting, sends N bytes and reads
//!     the echo back, each read and write within the timeout ("success NAME bytes=N ms=T").
//! cortexflow-workload exit CODE [--after-ms MS]
//!     Sleeps MS (default 0), prints "exit CODE" and exits with CODE (init containers, crash
//!     loops).
//! cortexflow-workload forge udp SOURCE HOST:PORT [--tag TAG]
//!     Sends one UDP datagram (payload TAG) with the source address SOURCE through a raw
//!     socket, as a pod with CAP_NET_RAW can; prints "sent".
//! cortexflow-workload send HOST:PORT LINE... [--timeout-ms MS]
//!     Connects over TCP and, for each LINE, writes it with a newline and reads one line back,
//!     printing each answer on a line of its own (the mTLS proxy's message port).
//! cortexflow-workload get HOST:PORT PATH [--timeout-ms MS]
//!     One HTTP/1.0 GET; prints the body and exits 0 on a 2xx answer, else prints the status
//!     line and exits 1 (a daemon's /metrics or /readyz inside a pod).
//! cortexflow-workload cat FILE | write FILE TEXT | ls DIR
//!     Prints a file; writes TEXT and a newline to a file; prints a directory's entries, one
//!     per line, sorted (what a pod sees of its volumes). Exit 1 on an error, printed.
//! cortexflow-workload resolve SERVER:PORT NAME [--tcp] [--timeout-ms MS]
//!     One DNS query (type A, recursion desired) over UDP (or TCP) to SERVER:PORT; prints
//!     "RCODE ADDR…" (e.g. "NOERROR 10.96.0.12", "NXDOMAIN") and exits 0 once answered.
//! cortexflow-workload load tcp|udp HOST:PORT [--rate N] [--timeout-ms MS]
//!     N new attempts per second (default 100), each a probe as above in its own thread, on a
//!     fixed schedule whatever the answers take, until SIGTERM or SIGINT; then waits for the
//!     attempts in flight and prints "ok=N refused=N timeout=N error=N" and up to ten failure
//!     lines, and exits 0.
//! ```
#![forbid(unsafe_code)]

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("probe") => probe(&args[1..]),
        Some("load") => load(&args[1..]),
        Some("forge") => forge(&args[1..]),
        Some("exit") => exit(&args[1..]),
        Some("send") => send(&args[1..]),
        Some("get") => get(&args[1..]),
        Some("cat" | "write" | "ls") => files(&args[0], &args[1..]),
        Some("resolve") => resolve(&args[1..]),
        _ => {
            eprintln!(
                "usage: cortexflow-workload serve [--tcp PORT]... [--udp PORT]... [--name NAME]\n       cortexflow-workload probe tcp|udp HOST:PORT [--timeout-ms MS]"
            );
            ExitCode::from(2)
        }
    }
}

fn serve(args: &[String]) -> ExitCode {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut name = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "workload".into());
    let mut drain = Duration::from_millis(2000);
    let mut http = Vec::new();
    let mut http_fail_after: Option<Duration> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next();
        match (a.as_str(), v) {
            ("--drain-ms", Some(ms)) => match ms.parse::<u64>() {
                Ok(ms) => drain = Duration::from_millis(ms),
                Err(e) => return usage(&format!("--drain-ms {ms}: {e}")),
            },
            ("--tcp", Some(p)) => match p.parse::<u16>() {
                Ok(p) => tcp.push(p),
                Err(e) => return usage(&format!("--tcp {p}: {e}")),
            },
            ("--udp", Some(p)) => match p.parse::<u16>() {
                Ok(p) => udp.push(p),
                Err(e) => return usage(&format!("--udp {p}: {e}")),
            },
            ("--http", Some(p)) => match p.parse::<u16>() {
                Ok(p) => http.push(p),
                Err(e) => return usage(&format!("--http {p}: {e}")),
            },
            ("--http-fail-after-ms", Some(ms)) => match ms.parse::<u64>() {
                Ok(ms) => http_fail_after = Some(Duration::from_millis(ms)),
                Err(e) => return usage(&format!("--http-fail-after-ms {ms}: {e}")),
            },
            ("--name", Some(n)) => name = n.clone(),
            _ => return usage(&format!("unexpected argument {a}")),
        }
    }
    if tcp.is_empty() && udp.is_empty() && http.is_empty() {
        return usage("serve needs at least one --tcp, --udp or --http port");
    }
    let started = std::time::Instant::now();
    // SIGTERM is blocked here (and in every thread spawned below) and awaited at the end.
    let mut term = nix::sys::signal::SigSet::empty();
    term.add(nix::sys::signal::Signal::SIGTERM);
    term.add(nix::sys::signal::Signal::SIGINT);
    if let Err(e) = term.thread_block() {
        return fail(&format!("block SIGTERM: {e}"));
    }
    let mut threads = Vec::new();
    for port in tcp {
        let l = match TcpListener::bind(("0.0.0.0", port)) {
            Ok(l) => l,
            Err(e) => return fail(&format!("bind tcp {port}: {e}")),
        };
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || echo(c, &name));
            }
        }));
    }
    for port in udp {
        let s = match UdpSocket::bind(("0.0.0.0", port)) {
            Ok(s) => s,
            Err(e) => return fail(&format!("bind udp {port}: {e}")),
        };
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(name.as_bytes(), from);
            }
        }));
    }
    for port in http {
        let l = match TcpListener::bind(("0.0.0.0", port)) {
            Ok(l) => l,
            Err(e) => return fail(&format!("bind http {port}: {e}")),
        };
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let failing = http_fail_after.is_some_and(|d| started.elapsed() >= d);
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let (status, body) = if failing {
                    ("503 Service Unavailable", "failing".to_string())
                } else {
                    ("200 OK", name.clone())
                };
                let _ = c.write_all(
                    format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        }));
    }
    println!("serving as {name}");
    drop(threads);
    match term.wait() {
        Ok(sig) => println!("{sig}: serving {} ms more, then exiting", drain.as_millis()),
        Err(e) => return fail(&format!("wait for a signal: {e}")),
    }
    std::thread::sleep(drain);
    ExitCode::SUCCESS
}

fn exit(args: &[String]) -> ExitCode {
    let Some(code) = args.first().and_then(|c| c.parse::<u8>().ok()) else {
        return usage("exit needs a code 0-255");
    };
    let after = match args.get(1..) {
        Some([flag, ms]) if flag == "--after-ms" => match ms.parse::<u64>() {
            Ok(ms) => ms,
            Err(e) => return usage(&format!("--after-ms {ms}: {e}")),
        },
        Some([]) | None => 0,
        Some(other) => return usage(&format!("unexpected arguments {other:?}")),
    };
    std::thread::sleep(Duration::from_millis(after));
    println!("exit {code}");
    ExitCode::from(code)
}

fn echo(mut c: TcpStream, name: &str) {
    let _ = c.set_nodelay(true);
    if c.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = c.read(&mut buf) {
        if n == 0 || c.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn probe(args: &[String]) -> ExitCode {
    let (Some(proto), Some(target)) = (args.first(), args.get(1)) else {
        return usage("probe needs a protocol and HOST:PORT");
    };
    let mut timeout = Duration::from_millis(1000);
    let mut opts = TcpOptions::default();
    let mut it = args[2..].iter();
    while let Some(a) = it.next() {
        let v = it.next();
        match (a.as_str(), v) {
            ("--timeout-ms", Some(v)) => match v.parse() {
                Ok(ms) => timeout = Duration::from_millis(ms),
                Err(e) => return usage(&format!("--timeout-ms {v}: {e}")),
            },
            ("--source", Some(v)) => match v.parse() {
                Ok(ip) => opts.source = Some(ip),
                Err(e) => return usage(&format!("--source {v}: {e}")),
            },
            ("--bytes", Some(v)) => match v.parse() {
                Ok(n) => opts.bytes = n,
                Err(e) => return usage(&format!("--bytes {v}: {e}")),
            },
            _ => return usage(&format!("unexpected argument {a}")),
        }
    }
    let addr: SocketAddr = match target.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        Ok(None) => return report(Err(format!("error no address for {target}"))),
        Err(e) => return report(Err(format!("error {target}: {e}"))),
    };
    let result = match proto.as_str() {
        "tcp" => probe_tcp_with(addr, timeout, &opts),
        "udp" => probe_udp(addr, timeout),
        other => return usage(&format!("unknown protocol {other}")),
    };
    report(result)
}

fn load(args: &[String]) -> ExitCode {
    let (Some(proto), Some(target)) = (args.first(), args.get(1)) else {
        return usage("load needs tcp|udp and HOST:PORT");
    };
    let mut rate = 100u32;
    let mut timeout = Duration::from_millis(1000);
    let mut it = args[2..].iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next().map(|v| v.parse::<u64>())) {
            ("--rate", Some(Ok(n))) if n > 0 => rate = n.min(10_000) as u32,
            ("--timeout-ms", Some(Ok(ms))) => timeout = Duration::from_millis(ms),
            _ => return usage(&format!("unexpected argument {a}")),
        }
    }
    let addr = match target.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        _ => return usage(&format!("{target} is not an address")),
    };
    let attempt: fn(SocketAddr, Duration) -> Result<String, String> = match proto.as_str() {
        "tcp" => probe_tcp,
        "udp" => probe_udp,
        other => return usage(&format!("unknown protocol {other}")),
    };
    // SIGTERM and SIGINT end the run: blocked here and in every thread, awaited by a waiter.
    let mut term = nix::sys::signal::SigSet::empty();
    term.add(nix::sys::signal::Signal::SIGTERM);
    term.add(nix::sys::signal::Signal::SIGINT);
    if let Err(e) = term.thread_block() {
        return fail(&format!("block SIGTERM: {e}"));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = term.wait();
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    let (tx, rx) = std::sync::mpsc::channel::<Result<String, String>>();
    let every = Duration::from_secs(1) / rate;
    let start = std::time::Instant::now();
    let mut n: u32 = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send(attempt(addr, timeout));
        });
        n = n.saturating_add(1);
        let next = start + every * n;
        if let Some(wait) = next.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    drop(tx);
    let (mut ok, mut refused, mut timed_out, mut error) = (0u64, 0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    for r in rx {
        match r {
            Ok(_) => ok += 1,
            Err(what) => {
                match what.as_str() {
                    "refused" => refused += 1,
                    "timeout" => timed_out += 1,
                    _ => error += 1,
                }
                if failures.len() < 10 {
                    failures.push(what);
                }
            }
        }
    }
    println!("ok={ok} refused={refused} timeout={timed_out} error={error}");
    for f in failures {
        println!("{f}");
    }
    ExitCode::SUCCESS
}

fn probe_tcp(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    probe_tcp_with(addr, timeout, &TcpOptions::default())
}

#[derive(Default)]
struct TcpOptions {
    source: Option<std::net::Ipv4Addr>,
    bytes: usize,
}

fn probe_tcp_with(addr: SocketAddr, timeout: Duration, o: &TcpOptions) -> Result<String, String> {
    let s = match o.source {
        None => TcpStream::connect_timeout(&addr, timeout).map_err(classify)?,
        Some(ip) => {
            let sock = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .map_err(classify)?;
            sock.bind(&SocketAddr::from((ip, 0)).into())
                .map_err(classify)?;
            sock.connect_timeout(&addr.into(), timeout)
                .map_err(classify)?;
            sock.into()
        }
    };
    s.set_read_timeout(Some(timeout)).map_err(classify)?;
    s.set_write_timeout(Some(timeout)).map_err(classify)?;
    let mut reader = BufReader::new(s.try_clone().map_err(classify)?);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(classify)?;
    let name = line.trim().to_string();
    if o.bytes == 0 {
        return Ok(name);
    }
    // Send and read back concurrently: the echo comes back while we send.
    let start = std::time::Instant::now();
    let n = o.bytes;
    let mut w = s;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len());
            w.write_all(&chunk[..k])?;
            left -= k;
        }
        Ok(())
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while got < n {
        match reader.read(&mut buf) {
            Ok(0) => return Err(format!("error closed after {got} of {n} bytes")),
            Ok(k) => got += k,
            Err(e) => return Err(format!("{} after {got} of {n} bytes", classify(e))),
        }
    }
    writer
        .join()
        .map_err(|_| "error the writer panicked".to_string())?
        .map_err(classify)?;
    Ok(format!(
        "{name} bytes={n} ms={}",
        start.elapsed().as_millis()
    ))
}

/// `--timeout-ms MS` among `args` (default 3 s) and the other arguments.
fn timeout_and_rest(args: &[String]) -> Result<(Duration, Vec<String>), String> {
    let mut timeout = Duration::from_secs(3);
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--timeout-ms" {
            let ms = it.next().ok_or("--timeout-ms needs a value")?;
            timeout =
                Duration::from_millis(ms.parse().map_err(|e| format!("--timeout-ms {ms}: {e}"))?);
        } else {
            rest.push(a.clone());
        }
    }
    Ok((timeout, rest))
}

fn send(args: &[String]) -> ExitCode {
    let (timeout, rest) = match timeout_and_rest(args) {
        Ok(r) => r,
        Err(e) => return usage(&e),
    };
    let [target, lines @ ..] = rest.as_slice() else {
        return usage("send needs HOST:PORT and at least one LINE");
    };
    if lines.is_empty() {
        return usage("send needs at least one LINE");
    }
    let Ok(Some(addr)) = target.to_socket_addrs().map(|mut a| a.next()) else {
        return usage(&format!("send: {target} is not HOST:PORT"));
    };
    let run = || -> std::io::Result<()> {
        let mut c = TcpStream::connect_timeout(&addr, timeout)?;
        c.set_read_timeout(Some(timeout))?;
        let mut r = BufReader::new(c.try_clone()?);
        for l in lines {
            c.write_all(format!("{l}\n").as_bytes())?;
            let mut answer = String::new();
            if r.read_line(&mut answer)? == 0 {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "closed before answering",
                ));
            }
            println!("{}", answer.trim_end());
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("send: {}", classify(e))),
    }
}

fn files(cmd: &str, args: &[String]) -> ExitCode {
    let r = match (cmd, args) {
        ("cat", [f]) => std::fs::read_to_string(f).map(|t| print!("{t}")),
        ("write", [f, text]) => std::fs::write(f, format!("{text}\n")),
        ("ls", [d]) => std::fs::read_dir(d).map(|entries| {
            let mut names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for n in names {
                println!("{n}");
            }
        }),
        _ => return usage(&format!("{cmd}: unexpected arguments {args:?}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error {e}");
            ExitCode::FAILURE
        }
    }
}

fn get(args: &[String]) -> ExitCode {
    let (timeout, rest) = match timeout_and_rest(args) {
        Ok(r) => r,
        Err(e) => return usage(&e),
    };
    let [target, path] = rest.as_slice() else {
        return usage("get needs HOST:PORT and PATH");
    };
    let Ok(Some(addr)) = target.to_socket_addrs().map(|mut a| a.next()) else {
        return usage(&format!("get: {target} is not HOST:PORT"));
    };
    let run = || -> std::io::Result<String> {
        let mut c = TcpStream::connect_timeout(&addr, timeout)?;
        c.set_read_timeout(Some(timeout))?;
        c.write_all(format!("GET {path} HTTP/1.0\r\nHost: {target}\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    };
    match run() {
        Ok(out) => {
            let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
            let status = head.lines().next().unwrap_or_default();
            if status
                .split_whitespace()
                .nth(1)
                .is_some_and(|c| c.starts_with('2'))
            {
                print!("{body}");
                ExitCode::SUCCESS
            } else {
                println!("{status}");
                ExitCode::FAILURE
            }
        }
        Err(e) => fail(&format!("get: {}", classify(e))),
    }
}

fn resolve(args: &[String]) -> ExitCode {
    let (timeout, rest) = match timeout_and_rest(args) {
        Ok(r) => r,
        Err(e) => return usage(&e),
    };
    let tcp = rest.iter().any(|a| a == "--tcp");
    let rest: Vec<String> = rest.into_iter().filter(|a| a != "--tcp").collect();
    let [server, name] = rest.as_slice() else {
        return usage("resolve needs SERVER:PORT and NAME");
    };
    let Ok(server) = server.parse::<SocketAddr>() else {
        return usage(&format!("resolve: {server} is not IP:PORT"));
    };
    let id = (std::process::id() & 0xffff) as u16;
    let mut q = Vec::new();
    q.extend(id.to_be_bytes());
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return usage(&format!("resolve: {name:?} is not a DNS name"));
        }
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]); // root, type A, class IN
    let over_tcp = || -> Result<String, String> {
        let mut c = TcpStream::connect_timeout(&server, timeout).map_err(classify)?;
        c.set_read_timeout(Some(timeout)).map_err(classify)?;
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend(&q);
        c.write_all(&out).map_err(classify)?;
        let mut len = [0u8; 2];
        c.read_exact(&mut len).map_err(classify)?;
        let mut a = vec![0u8; usize::from(u16::from_be_bytes(len))];
        c.read_exact(&mut a).map_err(classify)?;
        if a.len() >= 12 && a[0..2] == id.to_be_bytes() && a[2] & 0x80 != 0 {
            dns_answer(&a).ok_or_else(|| "error garbled answer".to_string())
        } else {
            Err("error not the answer to the query".into())
        }
    };
    let run = || -> Result<String, String> {
        if tcp {
            return over_tcp();
        }
        let s = UdpSocket::bind("0.0.0.0:0").map_err(classify)?;
        s.set_read_timeout(Some(timeout)).map_err(classify)?;
        s.connect(server).map_err(classify)?;
        s.send(&q).map_err(classify)?;
        let mut buf = [0u8; 4096];
        loop {
            let n = s.recv(&mut buf).map_err(classify)?;
            let a = &buf[..n];
            if n >= 12 && a[0..2] == id.to_be_bytes() && a[2] & 0x80 != 0 {
                return dns_answer(a).ok_or_else(|| "error garbled answer".to_string());
            }
        }
    };
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// "RCODE A-records…" of a DNS answer.
fn dns_answer(a: &[u8]) -> Option<String> {
    let rcode = match a[3] & 0x0f {
        0 => "NOERROR".to_string(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    };
    let count = |i: usize| usize::from(u16::from_be_bytes([a[i], a[i + 1]]));
    let (qd, an) = (count(4), count(6));
    // Skips a name (labels, ending in a zero or a compression pointer).
    let skip = |mut i: usize| -> Option<usize> {
        loop {
            let l = *a.get(i)?;
            if l == 0 {
                return Some(i + 1);
            }
            if l & 0xc0 == 0xc0 {
                return Some(i + 2);
            }
            i += 1 + usize::from(l);
        }
    };
    let mut i = 12;
    for _ in 0..qd {
        i = skip(i)? + 4;
    }
    let mut out = vec![rcode];
    for _ in 0..an {
        i = skip(i)?;
        let rr = a.get(i..i + 10)?;
        let (kind, len) = (
            u16::from_be_bytes([rr[0], rr[1]]),
            usize::from(u16::from_be_bytes([rr[8], rr[9]])),
        );
        let data = a.get(i + 10..i + 10 + len)?;
        if kind == 1 && len == 4 {
            out.push(std::net::Ipv4Addr::new(data[0], data[1], data[2], data[3]).to_string());
        }
        i += 10 + len;
    }
    Some(out.join(" "))
}

fn forge(args: &[String]) -> ExitCode {
    let (Some(proto), Some(source), Some(target)) = (args.first(), args.get(1), args.get(2)) else {
        return usage("forge needs udp, a source address and HOST:PORT");
    };
    if proto != "udp" {
        return usage(&format!("forge: unknown protocol {proto}"));
    }
    let tag = match (args.get(3).map(String::as_str), args.get(4)) {
        (Some("--tag"), Some(t)) => t.clone(),
        (None, _) => "forged".into(),
        _ => return usage("forge: unexpected arguments"),
    };
    let Ok(source) = source.parse() else {
        return usage(&format!("forge: {source} is not an IPv4 address"));
    };
    let Ok(Some(SocketAddr::V4(to))) = target.to_socket_addrs().map(|mut a| a.next()) else {
        return usage(&format!("forge: {target} is not an IPv4 address and port"));
    };
    match cortexflow_testkit::net::forge_udp(source, 40000, *to.ip(), to.port(), tag.as_bytes()) {
        Ok(()) => {
            println!("sent");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("forge: {e}")),
    }
}

fn probe_udp(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(classify)?;
    s.set_read_timeout(Some(timeout)).map_err(classify)?;
    // Connected, so that an ICMP port-unreachable comes back as "refused".
    s.connect(addr).map_err(classify)?;
    s.send(b"probe").map_err(classify)?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).map_err(classify)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn classify(e: std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout".into(),
        _ => format!("error {e}"),
    }
}

fn report(r: Result<String, String>) -> ExitCode {
    match r {
        Ok(name) => {
            println!("success {name}");
            ExitCode::SUCCESS
        }
        Err(what) => {
            println!("{what}");
            ExitCode::FAILURE
        }
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("cortexflow-workload: {msg}");
    ExitCode::from(2)
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("cortexflow-workload: {msg}");
    ExitCode::FAILURE
}
