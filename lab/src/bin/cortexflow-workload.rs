//! `cortexflow-workload`: the demo workload of the lab (what the image `cortexflow/workload`
//! runs), in the spirit of agnhost.
//!
//! ```text
//! cortexflow-workload serve [--tcp PORT]... [--udp PORT]... [--name NAME] [--drain-ms MS]
//!     TCP: sends "NAME\n" on every connection, then echoes what it reads.
//!     UDP: answers every datagram with "NAME".
//!     NAME defaults to $POD_NAME, then $HOSTNAME. On SIGTERM it goes on serving for MS
//!     (default 2000) — long enough for the Service to stop sending it new connections — then
//!     exits 0.
//! cortexflow-workload probe tcp|udp HOST:PORT [--timeout-ms MS]
//!     One attempt; prints one line and exits 0 on success:
//!     "success NAME" | "refused" | "timeout" | "error WHAT".
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
            ("--name", Some(n)) => name = n.clone(),
            _ => return usage(&format!("unexpected argument {a}")),
        }
    }
    if tcp.is_empty() && udp.is_empty() {
        return usage("serve needs at least one --tcp or --udp port");
    }
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
    println!("serving as {name}");
    drop(threads);
    match term.wait() {
        Ok(sig) => println!("{sig}: serving {} ms more, then exiting", drain.as_millis()),
        Err(e) => return fail(&format!("wait for a signal: {e}")),
    }
    std::thread::sleep(drain);
    ExitCode::SUCCESS
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
    let mut it = args[2..].iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next().map(|v| v.parse::<u64>())) {
            ("--timeout-ms", Some(Ok(ms))) => timeout = Duration::from_millis(ms),
            _ => return usage(&format!("unexpected argument {a}")),
        }
    }
    let addr: SocketAddr = match target.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        Ok(None) => return report(Err(format!("error no address for {target}"))),
        Err(e) => return report(Err(format!("error {target}: {e}"))),
    };
    let result = match proto.as_str() {
        "tcp" => probe_tcp(addr, timeout),
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
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(classify)?;
    s.set_read_timeout(Some(timeout)).map_err(classify)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(classify)?;
    Ok(line.trim().to_string())
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
