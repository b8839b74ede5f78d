//! `pagehint-uffd`: a Firecracker-compatible userfaultfd page-fault handler that loads guest
//! memory with pagehint's scheduler. A thin shell: cli → options → run → export; and, for
//! `serve`, what Firecracker's example handler does when it fails: kill the VMM.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Parser;
use pagehint_migrate::sys::hugepages::HugePages;
use pagehint_uffd::cli::{Action, Cli, OnFatal, ServeOptions, SourceSpec};
use pagehint_uffd::compare::{compare, table};
use pagehint_uffd::export::svg;
use pagehint_uffd::handler::{handle_connection, Control};
use pagehint_uffd::protocol::peer_pid;
use pagehint_uffd::remote::{serve_memory, RemoteError, RemoteSource};
use pagehint_uffd::source::{FileSource, PageSource};
use pagehint_uffd::vmm::{restore, take_snapshot, RestoreOptions, Snapshot};

fn main() -> ExitCode {
    let action = match Cli::parse().action() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(action) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(o: ServeOptions) -> Result<(), String> {
    let src: Box<dyn PageSource> = match &o.source {
        SourceSpec::File(p) => {
            Box::new(FileSource::open(p).map_err(|e| format!("{}: {e}", p.display()))?)
        }
        // One connection per prefetcher and one for the fault thread, so that a fault's
        // fetch never waits behind a prefetch.
        // A memory server still starting refuses the connection: try again for as long as
        // a fetch may wait.
        SourceSpec::Remote { addr, timeout } => {
            let deadline = std::time::Instant::now() + *timeout;
            let src = loop {
                match RemoteSource::connect(addr.as_str(), o.handler.prefetchers + 1, *timeout) {
                    Err(RemoteError::Connect { error, .. })
                        if error.kind() == std::io::ErrorKind::ConnectionRefused
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    r => break r.map_err(|e| e.to_string())?,
                }
            };
            Box::new(src)
        }
    };
    let _ = std::fs::remove_file(&o.socket);
    let listener =
        UnixListener::bind(&o.socket).map_err(|e| format!("{}: {e}", o.socket.display()))?;
    eprintln!(
        "pagehint-uffd: policy {}, {} prefetcher(s), listening on {}",
        o.handler.policy,
        o.handler.prefetchers,
        o.socket.display()
    );
    let (conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let _ = std::fs::remove_file(&o.socket);
    let vmm = peer_pid(&conn);
    if o.on_fatal == OnFatal::Kill {
        // A panic must not leave the VMM's vCPUs waiting forever either.
        if let Some(pid) = vmm {
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                kill_vmm(pid);
                hook(info);
            }));
        }
    }
    let report = handle_connection(&conn, &*src, &o.handler, &Control::default());
    let report = report.map_err(|e| {
        let what = match (o.on_fatal, vmm) {
            (OnFatal::Kill, Some(pid)) if kill_vmm(pid) => {
                format!("; killed the VMM (pid {pid}) so that its vCPUs do not wait forever")
            }
            (OnFatal::Kill, Some(pid)) => format!("; the VMM (pid {pid}) could not be killed"),
            (OnFatal::Kill, None) => "; the VMM's pid is unknown (no SO_PEERCRED)".into(),
            (OnFatal::Notify, _) => "; the VMM was left running (--on-fatal notify)".into(),
        };
        format!("{e}{what}")
    })?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    match o.json {
        Some(p) => std::fs::write(&p, json).map_err(|e| format!("{}: {e}", p.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

/// `SIGKILL` to the VMM's process (not to this one, which a VMM in-process would be).
fn kill_vmm(pid: i32) -> bool {
    if pid as u32 == std::process::id() {
        return false;
    }
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|p| rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok())
}

fn mem_server(listen: &str, mem_file: &Path, idle: Duration) -> Result<(), String> {
    let src = FileSource::open(mem_file).map_err(|e| format!("{}: {e}", mem_file.display()))?;
    let listener = TcpListener::bind(listen).map_err(|e| format!("{listen}: {e}"))?;
    eprintln!(
        "pagehint-uffd mem-server: {} ({} bytes) on {}",
        mem_file.display(),
        src.size().unwrap_or(0),
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let stop = AtomicBool::new(false); // runs until the process is interrupted
    let st = serve_memory(&listener, &src, &stop, idle).map_err(|e| e.to_string())?;
    eprintln!("{st:?}");
    Ok(())
}

fn run(action: Action) -> Result<(), String> {
    match action {
        Action::Serve(o) => serve(o),
        Action::MemServer {
            listen,
            mem_file,
            idle,
        } => mem_server(&listen, &mem_file, idle),
        Action::Snapshot {
            dir,
            mem,
            vcpus,
            workload,
            host_page,
            warm,
        } => {
            let s = take_snapshot(&dir, mem, host_page, vcpus, workload, 7, warm)?;
            println!(
                "snapshot of {} ({} bytes, {} vCPUs) in {}",
                s.workload,
                mem,
                vcpus,
                dir.display()
            );
            Ok(())
        }
        Action::Restore {
            dir,
            socket,
            run_for,
            handshake,
        } => {
            let snap = Snapshot::load(&dir)?;
            let huge = snap.layout.host_page().bytes() > 4096;
            let _h = if huge {
                Some(HugePages::reserve(snap.layout.host_pages())?)
            } else {
                None
            };
            let restored = restore(
                &snap,
                &RestoreOptions {
                    socket,
                    hugetlb: huge,
                    run_for,
                    linger: std::time::Duration::ZERO,
                    handshake,
                    connect_wait: Duration::from_secs(5),
                },
                &|| true,
            )?;
            let out = &restored.outcome;
            // Guest memory stays mapped until the process exits, as a VMM's does: the
            // handler may still be placing pages (then it finds the address space gone).
            let out = {
                let o = out.clone();
                std::mem::forget(restored);
                o
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
            );
            if out.errors > 0 {
                return Err(format!("the guest found {} bad pages", out.errors));
            }
            Ok(())
        }
        Action::Compare(o, json, svg_path) => {
            let _h = if o.host_page.bytes() > 4096 {
                Some(HugePages::reserve(o.mem / o.host_page.bytes() + 8)?)
            } else {
                None
            };
            let c = compare(&o, &|r| {
                eprintln!(
                    "{} / {} / run {}: work {} in {:.0} ms, first op {}, {} faults in the window, blocktime {:.1} ms in it, {:.1} ms after",
                    r.case,
                    r.policy,
                    r.repetition + 1,
                    r.work,
                    r.window_ms,
                    r.first_op_ms
                        .map_or("none".into(), |t| format!("{t:.1} ms")),
                    r.faults_window,
                    r.blocktime_window_ms,
                    r.blocktime_after_ms,
                )
            })?;
            print!("{}", table(&c));
            if let Some(p) = json {
                let j = serde_json::to_string_pretty(&c).map_err(|e| e.to_string())?;
                std::fs::write(&p, j).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            if let Some(p) = svg_path {
                std::fs::write(&p, svg(&c)).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            if c.rows
                .iter()
                .any(|r| r.guest_errors > 0 || r.eexist > 0 || !r.placed_once)
            {
                return Err("a restore had guest check errors or pages placed twice".into());
            }
            Ok(())
        }
    }
}
