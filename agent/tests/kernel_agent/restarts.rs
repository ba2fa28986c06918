//! Twenty agent restarts (SIGTERM and SIGKILL) under traffic lose nothing.
use super::*;

/// Traffic from pod 0 to pod 1 (allowed) and from pod 2 to pod 1 (denied) while the agent is
/// restarted: counts what went wrong.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// New connections that completed an exchange, and those that failed.
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// Round trips on long-lived connections, and their errors (resets, timeouts).
    long_rtts: Arc<AtomicU64>,
    long_errors: Arc<AtomicU64>,
    /// Denied connection attempts, and those that got through.
    denied_tries: Arc<AtomicU64>,
    denied_through: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Traffic {
    fn start(node: &AgentNode, port: u16, rate: u32, long_lived: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counters: [Arc<AtomicU64>; 6] = Default::default();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let dst = SocketAddrV4::new(node.topo.pods[1].ip, port);
        let note = |errors: &Arc<Mutex<Vec<String>>>, e: String| {
            if let Ok(mut v) = errors.lock()
                && v.len() < 20
            {
                v.push(e);
            }
        };
        // New connections at `rate` per second from 4 threads: connect, read the tag, send and
        // read back, close.
        for _ in 0..4 {
            let (stop, ok, failed, errors) = (
                stop.clone(),
                counters[0].clone(),
                counters[1].clone(),
                errors.clone(),
            );
            let ns = node.topo.pods[0].ns.path();
            threads.push(std::thread::spawn(move || {
                enter(&ns).expect("enter");
                let period = Duration::from_secs(4) / rate;
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    match exchange(dst) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            note(&errors, format!("new connection: {e}"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    next += period;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                }
            }));
        }
        // Long-lived connections: a round trip every 20 ms each.
        for _ in 0..long_lived {
            let (stop, rtts, errs, errors) = (
                stop.clone(),
                counters[2].clone(),
                counters[3].clone(),
                errors.clone(),
            );
            let ns = node.topo.pods[0].ns.path();
            threads.push(std::thread::spawn(move || {
                enter(&ns).expect("enter");
                let conn = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(2))
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        s.set_nodelay(true)?;
                        let mut r = BufReader::new(s.try_clone()?);
                        let mut tag = String::new();
                        r.read_line(&mut tag)?;
                        Ok((s, r))
                    });
                let (mut s, mut r) = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        note(&errors, format!("long-lived connect: {e}"));
                        errs.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                let mut n = 0u64;
                let mut line = String::new();
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    line.clear();
                    let rt = s
                        .write_all(format!("{n}\n").as_bytes())
                        .and_then(|_| r.read_line(&mut line));
                    match rt {
                        Ok(_) if line.trim() == n.to_string() => {
                            rtts.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {
                            note(&errors, format!("long-lived: echo {line:?} for {n}"));
                            errs.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Err(e) => {
                            note(&errors, format!("long-lived: {e}"));
                            errs.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }));
        }
        // Denied: pod 2 tries every 50 ms; a dropped SYN times out after 150 ms.
        {
            let (stop, tries, through, errors) = (
                stop.clone(),
                counters[4].clone(),
                counters[5].clone(),
                errors.clone(),
            );
            let ns = node.topo.pods[2].ns.path();
            threads.push(std::thread::spawn(move || {
                enter(&ns).expect("enter");
                while !stop.load(Ordering::Relaxed) {
                    tries.fetch_add(1, Ordering::Relaxed);
                    if TcpStream::connect_timeout(&dst.into(), Duration::from_millis(150)).is_ok() {
                        note(&errors, "denied connection got through".into());
                        through.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        let [
            ok,
            failed,
            long_rtts,
            long_errors,
            denied_tries,
            denied_through,
        ] = counters;
        Self {
            stop,
            threads,
            ok,
            failed,
            long_rtts,
            long_errors,
            denied_tries,
            denied_through,
            errors,
        }
    }

    fn finish(mut self) -> Self {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One short connection: connect, read the server's tag, one round trip, close.
fn exchange(dst: SocketAddrV4) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_nodelay(true)?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    s.write_all(b"ping\n")?;
    line.clear();
    r.read_line(&mut line)?;
    if line != "ping\n" {
        return Err(std::io::Error::other(format!("echo {line:?}")));
    }
    Ok(())
}

pub(crate) fn restarts_under_traffic() {
    runtime().block_on(async {
        let op = ScriptedOperator::start("127.0.0.1:0".parse().expect("addr"), 1).await;
        let mut node = node(3, 73, &[]);
        let _srv = servers(&node, &[8080]);
        let policy = Policy {
            from: vec![0],
            port: 8080,
            generation: 1,
        };
        let v = op.set(&node_config(&node.topo, &policy, 1000));
        node.start_agent(&op.control()).expect("start agent");
        node.wait_ready(Duration::from_secs(20)).await.expect("ready");
        op.report("applied", Duration::from_secs(10), |r| r.applied_version == v)
            .await;
        let pinned = pinned(&node);
        let (eps, ipc, generation) = (
            pinned.endpoints().expect("endpoints"),
            pinned.ipcache().expect("ipcache"),
            pinned.generation().expect("generation"),
        );
        let before = pinned.counters().expect("counters");

        let traffic = Traffic::start(&node, 8080, 300, 8);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let ok_at_start = Traffic::get(&traffic.ok);
        let mut downtime = Vec::new();
        let mut ready_times = Vec::new();
        for i in 0..20 {
            let t0 = Instant::now();
            let graceful = i % 2 == 0;
            assert!(node.stop_agent(graceful), "SIGTERM exits cleanly");
            downtime.push(t0.elapsed());
            let t1 = Instant::now();
            node.start_agent(&op.control()).expect("start agent");
            node.wait_ready(Duration::from_secs(20)).await.expect("ready");
            ready_times.push(t1.elapsed());
            assert_eq!(
                pinned.generation().expect("generation"),
                generation,
                "restart {i} changed the policy generation"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The last agent applied the same config without changing anything.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let elapsed = started.elapsed();
        let ok_during = Traffic::get(&traffic.ok) - ok_at_start;
        let traffic = tokio::task::block_in_place(|| traffic.finish());
        let after = pinned.counters().expect("counters");
        let log = std::fs::read_to_string(node.log_path(node.starts())).unwrap_or_default();

        let get = Traffic::get;
        let (ok, failed) = (get(&traffic.ok), get(&traffic.failed));
        let (rtts, long_errors) = (get(&traffic.long_rtts), get(&traffic.long_errors));
        let (tries, through) = (get(&traffic.denied_tries), get(&traffic.denied_through));
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        let max_ready = ready_times.iter().map(ms).fold(0.0, f64::max);
        let mean_ready = ready_times.iter().map(ms).sum::<f64>() / ready_times.len() as f64;
        let dropped = |c: &cortexflow_agent::datapath::Counters| {
            c.samples
                .iter()
                .filter(|s| s.verdict == cortexflow_common::VERDICT_DROPPED)
                .map(|s| s.packets)
                .sum::<u64>()
        };
        eprintln!(
            "20 restarts (10 SIGTERM, 10 SIGKILL) in {:.1} s: {ok_during} new connections during \
             them ({:.0}/s), {ok} in all, {failed} failed; {rtts} round trips on 8 long-lived connections, {long_errors} \
             errors; {tries} denied attempts, {through} got through; kernel drops {} (denied \
             SYNs and their retries); generation {generation} unchanged; agent ready after \
             restart: mean {mean_ready:.0} ms, max {max_ready:.0} ms; stop took max {:.0} ms",
            elapsed.as_secs_f64(),
            ok_during as f64 / elapsed.as_secs_f64(),
            dropped(&after) - dropped(&before),
            downtime.iter().map(ms).fold(0.0, f64::max),
        );
        let errors = traffic.errors.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(failed, 0, "failed new connections: {errors:?}");
        assert_eq!(long_errors, 0, "long-lived connection errors: {errors:?}");
        assert_eq!(through, 0, "denied connections got through: {errors:?}");
        assert!(
            ok_during as f64 / elapsed.as_secs_f64() >= 200.0,
            "at least 200 new connections per second"
        );
        assert!(rtts > 0 && tries > 0);
        assert_eq!(pinned.endpoints().expect("endpoints"), eps);
        assert_eq!(pinned.ipcache().expect("ipcache"), ipc);
        assert!(
            log.contains("written=0") && log.contains("deleted=0"),
            "the last agent found the maps as they should be:\n{log}"
        );
        op.stop().await;
    });
}
